"""A rollout worker's Prometheus metrics: tokens, sampling and weight-sync time, bytes, errors."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from dcmdp.metrics import ServedRegistry

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class WorkerMetrics(ServedRegistry):
    def __init__(self, pool: str, worker_id: str) -> None:
        super().__init__()
        r = self.registry
        labels = {"pool": pool, "worker": worker_id}
        names = list(labels)

        def counter(name, doc, extra=()):
            return Counter(name, doc, names + list(extra), registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=r).labels(**labels)

        def hist(name, doc):
            return Histogram(name, doc, names, buckets=_SECONDS, registry=r).labels(**labels)

        self._labels = labels
        self.tokens = counter("dcmdp_worker_tokens", "Generated tokens").labels(**labels)
        self.tokens_per_s = gauge("dcmdp_worker_tokens_per_second", "Tokens/s of the last lease")
        self.sampling_s = hist("dcmdp_worker_sampling_seconds", "Seconds sampling one lease")
        self.leases = counter("dcmdp_worker_leases", "Leases sampled").labels(**labels)
        self._rejected = counter("dcmdp_worker_submissions_rejected", "Submissions the trainer rejected", ["reason"])
        self.sync_s = hist("dcmdp_worker_weight_sync_seconds", "Seconds per weight update (fetch + load)")
        self.sync_bytes = counter("dcmdp_worker_weight_sync_bytes", "Weight bytes received").labels(**labels)
        self.version = gauge("dcmdp_worker_weight_version", "Weight version loaded in the engine")
        self.crc_errors = counter("dcmdp_worker_chunk_crc_errors", "Weight chunks that failed their crc32").labels(**labels)
        self.resumes = counter("dcmdp_worker_stream_resumes", "Weight streams resumed after a break").labels(**labels)
        self.reconnects = counter("dcmdp_worker_reconnects", "Reconnections to the trainer").labels(**labels)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason=reason, **self._labels).inc()

