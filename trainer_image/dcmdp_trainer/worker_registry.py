"""The worker registry: the rollout workers the trainer has heard from, bounded.

Each worker (``header.worker_id``) is registered on its first call and its ``last_seen`` (wall
clock, s) and weight version refreshed on every call. The registry holds at most ``max_workers``
entries (the trainer sets ``max(64, 8 × replicas)``: room for every replica restarting several
times over): when it is full, workers silent for :data:`WORKER_SILENT_S` seconds and holding no
lease are forgotten first, and a new worker is refused (:class:`TooManyWorkers`, the server's
RESOURCE_EXHAUSTED) when that frees no room. The clock is injectable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

# a worker not heard from for this long (s) may be forgotten to make room for a new one
WORKER_SILENT_S = 300.0


class TooManyWorkers(Exception):
    """The registry is full: a new worker id is refused (the server answers RESOURCE_EXHAUSTED)."""


@dataclass
class WorkerState:
    worker_id: str
    pool: str
    engine: str = ""
    precision: str = ""
    version: int = -1  # the weight version the worker last said it holds
    last_seen: float = 0.0  # wall clock (s)
    told_finished: bool = False


class WorkerRegistry:
    """Workers by id. ``leases(worker_id)`` (the live leases a worker holds) keeps a busy worker
    from being forgotten. Not thread-safe: the caller holds its lock."""

    def __init__(self, max_workers: int, leases: Callable[[str], int], clock: Callable[[], float] = time.time):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1 (got {max_workers})")
        self.max_workers = max_workers
        self.leases = leases
        self.clock = clock
        self.workers: dict[str, WorkerState] = {}

    def entry(self, worker_id: str, pool: str) -> WorkerState:
        """The entry of ``worker_id``, added (for ``pool``) when new; raises :class:`TooManyWorkers`
        when the registry is full of live or busy workers."""
        w = self.workers.get(worker_id)
        if w is not None:
            return w
        if len(self.workers) >= self.max_workers:
            now = self.clock()
            for wid in [wid for wid, old in self.workers.items()
                        if now - old.last_seen > WORKER_SILENT_S and not self.leases(wid)]:
                del self.workers[wid]
            if len(self.workers) >= self.max_workers:
                raise TooManyWorkers(f"{len(self.workers)} rollout workers heard from in the last "
                                     f"{WORKER_SILENT_S:g} s (at most {self.max_workers}): worker "
                                     f"{worker_id[:64]!r} refused")
        w = self.workers[worker_id] = WorkerState(worker_id, pool)
        return w

    def seen(self, worker_id: str, pool: str, version: int) -> WorkerState:
        """Record a call from ``worker_id`` holding weight ``version`` (its entry, added when new)."""
        w = self.entry(worker_id, pool)
        w.last_seen, w.version = self.clock(), version
        return w

    def in_pool(self, pool: str) -> int:
        """Registered workers of ``pool``."""
        return sum(1 for w in self.workers.values() if w.pool == pool)

    def heard_within(self, within_s: float) -> list[WorkerState]:
        """Workers heard from in the last ``within_s`` seconds."""
        now = self.clock()
        return [w for w in self.workers.values() if now - w.last_seen <= within_s]

    def waiting_to_be_told(self, silent_s: float) -> list[WorkerState]:
        """Workers not yet told the run finished that are alive: heard from within ``silent_s``
        seconds or holding a lease (a silent worker without one is taken as dead)."""
        now = self.clock()
        return [w for w in self.workers.values()
                if not w.told_finished and (now - w.last_seen < silent_s or self.leases(w.worker_id) > 0)]
