"""The lease book: which prompts are waiting, which worker holds which, and what came back.

Work is handed out in fixed *work items* (a pool's chunk of a step's prompts, or a pool's held-out
evaluation prompts). A worker leases an item for ``timeout`` seconds; a lease that is not
returned in time expires and its item goes back to the front of its pool's queue, to be leased
again by any worker of that pool. A submission is accepted only for an active, unexpired lease,
by the worker that holds it, once: a late (expired), unknown or repeated one is rejected, so no
rollout is ever counted twice. The book knows nothing of gRPC or torch; the clock is injectable.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

ACTIVE, COMPLETED, EXPIRED, RELEASED = "active", "completed", "expired", "released"


@dataclass
class WorkItem:
    key: str  # unique: "s12/bf16/0" (step/pool/chunk) or "eval3/bf16"
    pool: str
    step: int  # the training step the prompts belong to (-1 for evaluation)
    prompts: list[Any]  # objects with .index and .ids (the trainer's StepPrompt)
    seed: int
    n: int  # samples per prompt
    max_new_tokens: int
    is_eval: bool = False
    version: Optional[int] = None  # fixed sampling version (evaluation); None = decided at lease time
    attempts: int = 0
    temperature: Optional[float] = None  # sampling temperature (None = algorithm.temperature; 0 = greedy)

    @property
    def indices(self) -> list[int]:
        return [p.index for p in self.prompts]


@dataclass
class LeaseRecord:
    lease_id: str
    item: WorkItem
    worker: str
    version: int  # the weight version the worker was told to sample with
    issued: float
    expires: float
    state: str = ACTIVE


@dataclass
class Verdict:
    accepted: bool
    reason: str = ""  # unknown | expired | duplicate | wrong-worker | released
    lease: Optional[LeaseRecord] = None


@dataclass
class LeaseBook:
    timeout: float
    clock: Callable[[], float] = time.monotonic
    pending: dict[str, deque] = field(default_factory=dict)  # pool -> WorkItems (front = first)
    leases: dict[str, LeaseRecord] = field(default_factory=dict)
    expired_total: int = 0
    reissued_total: int = 0
    completed_total: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def add(self, item: WorkItem) -> None:
        self.pending.setdefault(item.pool, deque()).append(item)

    def _requeue(self, item: WorkItem) -> None:
        item.attempts += 1
        self.reissued_total += 1
        self.pending.setdefault(item.pool, deque()).appendleft(item)

    def expire(self) -> list[LeaseRecord]:
        """Expire overdue leases; their items go back to the front of their pool's queue."""
        now = self.clock()
        out = []
        for rec in self.leases.values():
            if rec.state == ACTIVE and now > rec.expires:
                rec.state = EXPIRED
                self.expired_total += 1
                self._requeue(rec.item)
                out.append(rec)
        return out

    def acquire(self, pool: str, worker: str, version_for: Callable[[WorkItem], Optional[int]]) -> Optional[LeaseRecord]:
        """Lease the first item of ``pool`` that may be sampled now (evaluation first).

        ``version_for(item)`` gives the weight version to sample the item with, or None while the
        item may not be leased yet (its step is beyond the staleness bound)."""
        self.expire()
        queue = self.pending.get(pool)
        if not queue:
            return None
        order = sorted(range(len(queue)), key=lambda i: (not queue[i].is_eval, i))
        for i in order:
            item = queue[i]
            version = item.version if item.version is not None else version_for(item)
            if version is None:
                continue
            del queue[i]
            now = self.clock()
            rec = LeaseRecord(uuid.uuid4().hex, item, worker, version, now, now + self.timeout)
            self.leases[rec.lease_id] = rec
            return rec
        return None

    def check(self, lease_id: str, worker: str) -> Verdict:
        """May a submission for ``lease_id`` from ``worker`` be counted? (Changes nothing.)"""
        rec = self.leases.get(lease_id)
        if rec is None:
            return Verdict(False, "unknown")
        if rec.state == COMPLETED:
            return Verdict(False, "duplicate", rec)
        if rec.state == EXPIRED or (rec.state == ACTIVE and self.clock() > rec.expires):
            return Verdict(False, "expired", rec)
        if rec.state == RELEASED:
            return Verdict(False, "released", rec)
        if rec.worker != worker:
            return Verdict(False, "wrong-worker", rec)
        return Verdict(True, "", rec)

    def complete(self, lease_id: str, worker: str) -> Verdict:
        """Count the lease's submission (once): check, then mark it completed."""
        v = self.check(lease_id, worker)
        if v.accepted:
            v.lease.state = COMPLETED
            self.completed_total += 1
        else:
            self.rejected[v.reason] = self.rejected.get(v.reason, 0) + 1
        return v

    def release(self, lease_id: str, reason: str) -> None:
        """Give an active lease's item back (its submission was malformed or stale): re-issued."""
        rec = self.leases.get(lease_id)
        if rec is not None and rec.state == ACTIVE:
            rec.state = RELEASED
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            self._requeue(rec.item)

    def forget(self, keep: Callable[[LeaseRecord], bool]) -> None:
        """Drop finished lease records that ``keep`` says are no longer needed (bounded memory)."""
        for lid in [lid for lid, r in self.leases.items() if r.state != ACTIVE and not keep(r)]:
            del self.leases[lid]

    # -- views -----------------------------------------------------------------------------------
    def outstanding(self, worker: Optional[str] = None) -> int:
        now = self.clock()
        return sum(1 for r in self.leases.values()
                   if r.state == ACTIVE and now <= r.expires and (worker is None or r.worker == worker))

    def named_versions(self) -> set[tuple[str, int]]:
        """(pool, weight version) of every active lease and of every queued item with a fixed
        version (evaluation): the versions a worker may still be sent to fetch. An expired lease is
        counted until :meth:`expire` runs: its worker may still be fetching."""
        named = {(r.item.pool, r.version) for r in self.leases.values() if r.state == ACTIVE}
        named |= {(pool, item.version) for pool, queue in self.pending.items() for item in queue
                  if item.version is not None}
        return named

    def queued(self, pool: Optional[str] = None) -> int:
        if pool is not None:
            return len(self.pending.get(pool, ()))
        return sum(len(q) for q in self.pending.values())
