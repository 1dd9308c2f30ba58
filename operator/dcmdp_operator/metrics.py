"""Prometheus metrics of the operator (served by ``dcmdp-operator --metrics-port``)."""

from __future__ import annotations

import threading
from typing import Optional

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from dcmdp.status import PHASES

RECONCILES = Counter(
    "dcmdp_operator_reconciles_total", "Reconciles of DCMDPRuns, by trigger and result.", ["trigger", "result"]
)
ERRORS = Counter("dcmdp_operator_reconcile_errors_total", "Failed reconciles, by error type.", ["error"])
CHILD_WRITES = Counter(
    "dcmdp_operator_child_writes_total", "Children created or patched, by kind and action.", ["kind", "action"]
)
RECONCILE_SECONDS = Histogram(
    "dcmdp_operator_reconcile_seconds",
    "Duration of one reconcile (API reads and writes, trainer status read).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RUNS = Gauge("dcmdp_operator_runs", "DCMDPRuns this operator watches, by phase.", ["phase"])
for _phase in PHASES:
    RUNS.labels(_phase).set(0)


class PhaseBook:
    """The phase of every run seen, behind the ``dcmdp_operator_runs{phase}`` gauge."""

    def __init__(self) -> None:
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, key: str, phase: Optional[str]) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            self._publish()

    def forget(self, key: str) -> None:
        self.set(key, None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {p: 0 for p in PHASES}
            for phase in self._phases.values():
                out[phase] = out.get(phase, 0) + 1
            return out

    def _publish(self) -> None:
        out = {p: 0 for p in PHASES}
        for phase in self._phases.values():
            out[phase] = out.get(phase, 0) + 1
        for phase, n in out.items():
            RUNS.labels(phase).set(n)


BOOK = PhaseBook()


_SERVING: set[int] = set()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on ``addr:port`` (a daemon thread; once per port)."""
    if port in _SERVING:
        return
    start_http_server(port, addr=addr)
    _SERVING.add(port)
