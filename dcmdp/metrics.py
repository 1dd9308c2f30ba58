"""Metric names and sinks: metrics.jsonl, TensorBoard event files, Prometheus gauges.

The key names are one contract across every sink; docs/metrics.md is their table (meaning, unit).
Each pool's applied λ is ``pool/<name>/constraint/lambda``; ``constraint/run_lambda`` is the
run-level multiplier, applied to no token with two or more pools. Prometheus
names replace ``/`` with ``_`` (``dcmdp_discrepancy_prob_diff_mean``); per-pool keys become
``dcmdp_pool_<key>`` with a ``pool`` label (``dcmdp_pool_constraint_lambda{pool="bf16"}``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from prometheus_client import CollectorRegistry, Gauge, start_http_server

REQUIRED_KEYS = (
    "step", "reward/mean", "discrepancy/prob_diff_mean", "discrepancy/prob_diff_max",
    "discrepancy/logprob_abs_diff_mean", "discrepancy/k3_kl", "constraint/run_lambda",
    "constraint/tolerance", "loss/policy", "loss/constraint", "time/step_s",
)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def split_pool_key(key: str) -> tuple[Optional[str], str]:
    """``pool/bf16/constraint/lambda`` → (``bf16``, ``constraint/lambda``)."""
    if key.startswith("pool/"):
        _, pool, rest = key.split("/", 2)
        return pool, rest
    return None, key


def prometheus_name(key: str) -> str:
    return "dcmdp_" + "".join(c if c.isalnum() else "_" for c in key)


class JsonlSink:
    def __init__(self, path: Path, truncate_from_step: Optional[int] = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_from_step is not None and path.exists():
            # resuming: drop rows written after the checkpoint we resume from (and a torn last line)
            trim_jsonl(path, before_step=truncate_from_step)
        elif truncate_from_step is None and path.exists():
            path.unlink()
        self._fh = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in row.items()}, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        # optional and heavy (torch, the ml extra): the operator imports this module without it
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir))

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.flush()
        self._w.close()


class PrometheusSink:
    """Gauges named after the metric keys, in a registry served by whoever owns it."""

    def __init__(self, registry=None, keys: Optional[Iterable[str]] = None):
        self.registry = registry or CollectorRegistry()
        self._gauges: dict[str, Any] = {}
        self.keys = set(keys) if keys is not None else None

    def _gauge(self, key: str, pooled: bool):
        name = prometheus_name(("pool/" if pooled else "") + key)
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, f"dcmdp metric {key}", ["pool"] if pooled else [], registry=self.registry)
        return self._gauges[name]

    def write(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            pool, key = split_pool_key(k)
            if self.keys is not None and key not in self.keys:
                continue
            g = self._gauge(key, pool is not None)
            (g.labels(pool=pool) if pool is not None else g).set(v)

    def close(self) -> None:
        pass


class ServedRegistry:
    """A Prometheus registry, served over HTTP (``/metrics``) from ``serve`` until ``close``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.port: Optional[int] = None
        self._server: Any = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (port 0 = any free port); returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_address[1]
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MetricsWriter:
    """Fan one row per step out to every sink."""

    def __init__(self, out_dir: Path, *, resume_step: Optional[int] = None, tensorboard: bool = True,
                 prometheus: Optional[PrometheusSink] = None):
        self.sinks: list[Any] = [JsonlSink(out_dir / "metrics.jsonl", resume_step)]
        if tensorboard:
            try:
                self.sinks.append(TensorBoardSink(out_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: jsonl and Prometheus still work
                pass
        if prometheus is not None:
            self.sinks.append(prometheus)

    def write(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.write(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def trim_jsonl(path: Path, before_step: Optional[int] = None) -> None:
    """Rewrite a JSON-lines file without its torn last line and, with ``before_step``, without the
    rows of that step or later (resuming from a checkpoint of that step)."""
    rows = [r for r in read_metrics(path) if before_step is None or r.get("step", -1) < before_step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file. A torn last line (the writer died mid-line) is dropped; a
    malformed line before it raises ValueError naming the file and line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            if i == len(lines):
                break  # torn last line
            raise ValueError(f"{path}: line {i} is not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    return rows
