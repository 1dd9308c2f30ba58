"""The trainer's Prometheus metrics: the per-step keys plus the runtime's own.

Per-step keys (reward, δ̄ and λ per pool, losses, ``time/step_s`` ...) go through
``dcmdp.metrics.PrometheusSink`` with the same names as metrics.jsonl (``/`` → ``_``). The runtime
adds leases outstanding/expired, submissions rejected by reason, rollouts dropped as stale, version
lag per pool, weight-sync bytes and seconds per pool and dtype, tokens/s and the idle fraction.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from dcmdp.metrics import PrometheusSink, ServedRegistry


class TrainerMetrics(ServedRegistry):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.sink = PrometheusSink(r)
        self.leases_outstanding = Gauge("dcmdp_leases_outstanding", "Active prompt leases", registry=r)
        self.leases_expired = Gauge("dcmdp_lease_expirations", "Leases expired so far (their prompts re-issued)", registry=r)
        self.leases_queued = Gauge("dcmdp_work_items_queued", "Work items waiting for a worker", registry=r)
        self.rejected_c = Counter("dcmdp_submissions_rejected", "Rollout submissions rejected", ["reason"], registry=r)
        self.dropped_c = Counter("dcmdp_stale_rollouts_dropped", "Rollouts dropped for staleness", ["pool"], registry=r)
        self.auth_c = Counter("dcmdp_auth_rejected", "Calls rejected for a missing or wrong token", ["reason"], registry=r)
        self.version_lag = Gauge("dcmdp_version_lag", "Mean weight-version lag of the last step's rollouts", ["pool"], registry=r)
        self.weight_bytes = Counter("dcmdp_weight_sync_bytes", "Weight bytes streamed to workers", ["pool", "dtype"], registry=r)
        self.weight_seconds = Histogram("dcmdp_weight_sync_seconds", "Seconds per weight stream served", ["pool"],
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r)
        self.tokens_per_s = Gauge("dcmdp_tokens_per_second", "Generated tokens per second (last step)", registry=r)
        self.step_seconds = Gauge("dcmdp_step_seconds", "Wall seconds of the last step", registry=r)
        self.idle_fraction = Gauge("dcmdp_trainer_idle_fraction", "Share of the last step spent waiting for rollouts", registry=r)
        self.weight_version = Gauge("dcmdp_weight_version", "Newest published weight version", registry=r)

    # -- updates ---------------------------------------------------------------------------------
    def leases(self, book) -> None:
        self.leases_outstanding.set(book.outstanding())
        self.leases_expired.set(book.expired_total)
        self.leases_queued.set(book.queued())

    def rejected(self, reason: str) -> None:
        self.rejected_c.labels(reason=reason).inc()

    def dropped(self, pool: str, n: int) -> None:
        self.dropped_c.labels(pool=pool).inc(n)

    def auth_rejected(self, method: str, reason: str) -> None:
        self.auth_c.labels(reason=reason).inc()

    def weights_served(self, pool: str, dtype: str, nbytes: int, seconds: float) -> None:
        self.weight_bytes.labels(pool=pool, dtype=dtype).inc(nbytes)
        self.weight_seconds.labels(pool=pool).observe(seconds)

    def step(self, row: dict[str, Any], lags: dict[str, float]) -> None:
        step_s = row.get("time/step_s") or 0.0
        self.step_seconds.set(step_s)
        self.tokens_per_s.set(row.get("throughput/tokens_per_s") or 0.0)
        self.idle_fraction.set((row.get("time/wait_s") or 0.0) / step_s if step_s else 0.0)
        self.weight_version.set(row.get("version", 0) + 1)
        for pool, lag in lags.items():
            self.version_lag.labels(pool=pool).set(lag)
