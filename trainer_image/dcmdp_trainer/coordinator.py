"""The remote rollout source: work leased to rollout workers over gRPC, their groups collected.

The :class:`~dcmdp_trainer.rollout_source.RolloutSource` of the gRPC trainer (``server.py`` is its
wire face). Each step's prompts are split between the pools and cut into work items
(``work_split.py``); a worker of the pool leases an item (``leases.py``), samples ``groupSize``
responses per prompt with the weight version the lease names, and submits them; a submission is
validated (``submission.py``) and checked against the staleness rule (``staleness.py``: with
``maxStaleness: 0`` strictly on-policy, with 1 the workers sample step s+1 while the trainer
trains step s). A step's batch is complete when every prompt of the step has its group. An
evaluation is one work item per pool with the held-out prompts, at a fixed version.

π_old is the trainer's weights at the start of the step: the PPO ratio and δ_t = |π_old − p_inf|
both use it, so δ̄ includes the staleness of a lagging rollout.

Also here: the worker registry (``worker_registry.py``), the run's failure rules (a
malformed submission is rejected and its item leased again; the run fails after
:data:`FAIL_AFTER_REJECTIONS` rejections of one cause in a row that cover the step's items, or
when nothing is accepted for ``rollout.stallTimeoutSeconds``), and the status snapshot's inputs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from dcmdp.engine import Rollout, Sample
from dcmdp.precision import wire_dtype
from dcmdp.sample_check import Problem
from dcmdp_trainer.leases import LeaseBook, LeaseRecord, WorkItem
from dcmdp_trainer.rollout_source import Batch, RunFailed, Stopped
from dcmdp_trainer.run_state import RunState
from dcmdp_trainer.session import Session, StepPrompt
from dcmdp_trainer.staleness import Staleness
from dcmdp_trainer.status_snapshot import TrainerStatus, WorkerInfo, pool_status, snapshot
from dcmdp_trainer.submission import check_submission
from dcmdp_trainer.weights import WeightPublisher
from dcmdp_trainer.worker_registry import WorkerRegistry
from dcmdp_trainer.work_split import split_prompts, work_items


@dataclass
class StepBuffer:
    items: int = 0  # work items of the step
    done: int = 0
    rollouts: dict[int, list[Rollout]] = field(default_factory=dict)  # prompt index -> group
    sampling_s: float = 0.0
    tokens: int = 0

    @property
    def complete(self) -> bool:
        return self.items > 0 and self.done == self.items


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# the malformed submissions of one cause, with nothing accepted in between, before the run fails
FAIL_AFTER_REJECTIONS = 3


class Coordinator:
    """The remote rollout source. Its RPC-facing operations (:meth:`register`, :meth:`acquire`,
    :meth:`submit`) run on gRPC threads, its :class:`RolloutSource` methods on the loop's; all
    under :attr:`cond`. ``state`` is the run loop's (pass the same one to ``RunLoop``) and
    ``clock`` (monotonic seconds) times leases and the stall rule."""

    def __init__(self, session: Session, publisher: WeightPublisher, *, log=None, runtime=None,
                 state: Optional[RunState] = None, clock: Callable[[], float] = time.monotonic):
        self.session = session
        spec = session.spec
        self.spec = spec
        self.algo = spec.algorithm
        self.publisher = publisher
        self.log = log
        self.runtime = runtime  # dcmdp_trainer.observability.TrainerMetrics (optional)
        self.state = state if state is not None else RunState(session.total_steps, step=session.step,
                                                              checkpoint_step=session.step)
        self.clock = clock
        self.pools = {p.name: p for p in spec.rollout.pools if p.replicas > 0}
        self.staleness = Staleness(self.algo.max_staleness, {name: p.lag for name, p in self.pools.items()})
        self.batch = spec.rollout.batch_prompts or self.algo.mini_batch_size
        self.book = LeaseBook(spec.rollout.lease_timeout_seconds, clock=clock)
        self.cond = threading.Condition()
        self.version = session.version  # the newest *published* version
        self.issued_through = session.step - 1
        self.buffers: dict[int, StepBuffer] = {}
        self.eval_results: dict[str, list[Sample]] = {}
        self.eval_keys: dict[str, str] = {}  # pool -> the work item of the evaluation requested last
        self.eval_greedy_keys: dict[str, str] = {}  # pool -> the greedy (temperature 0) item of that evaluation
        self.eval_round = 0
        # room for every replica restarting several times over
        self.registry = WorkerRegistry(max(64, 8 * sum(p.replicas for p in self.pools.values())),
                                       leases=self.book.outstanding)
        self.workers = self.registry.workers
        self.dropped_stale = 0
        self.dropped_by_pool: dict[str, int] = {p: 0 for p in self.pools}
        self.dropped_since_step = 0
        self.rejected: dict[str, int] = {}
        # malformed submissions since the last accepted one: cause -> (work item keys, submissions)
        self.failing: dict[str, tuple[set[str], int]] = {}
        self.last_accept = clock()
        self.last_rejection = ""
        self.accepting = False  # leases are handed out (from start() on)
        self.finished = False  # every step trained: workers are told so
        self.failure = ""  # why the run cannot go on ("" while it can)
        self.stop_requested = False

    # -- versions and the staleness rule ---------------------------------------------------------
    def pool_version(self, pool: str) -> int:
        """The version a pool samples with now (its ``lag`` versions behind, within what is kept)."""
        kept = self.publisher.versions()
        return self.staleness.pool_version(pool, self.version, min(kept) if kept else None)

    def _version_for(self, item: WorkItem) -> Optional[int]:
        v = self.pool_version(item.pool)
        return v if self.staleness.may_sample(item.pool, item.step, v) else None

    # -- work ------------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Queue the steps the staleness rule allows to be sampled now (under ``cond``)."""
        s = self.session
        last = self.staleness.last_step(self.version, s.total_steps)
        while self.issued_through < last:
            step = self.issued_through + 1
            shares = split_prompts(s.prompts(step), {name: p.replicas for name, p in self.pools.items()})
            buf = self.buffers.setdefault(step, StepBuffer())
            for item in work_items(step, shares, self.batch, seed=s.sampling_seed, n=self.algo.group_size,
                                   max_new_tokens=s.task.max_new_tokens):
                self.book.add(item)
                buf.items += 1
            self.issued_through = step

    # -- RPC-facing operations (called from gRPC threads) ----------------------------------------
    def register(self, worker_id: str, pool: str, engine: str, precision: str) -> None:
        """Register a worker of ``pool``: KeyError for a pool without replicas, TooManyWorkers when
        the registry is full."""
        if pool not in self.pools:
            known = ", ".join(self.pools) or "none"
            raise KeyError(f"unknown rollout pool {pool!r} (pools with replicas: {known})")
        spec = self.pools[pool]  # a first Register comes before the worker has its pool's spec: say what it will run
        engine, precision = engine or spec.engine, precision or spec.precision
        with self.cond:
            w = self.registry.entry(worker_id, pool)
            w.pool, w.engine, w.precision, w.last_seen = pool, engine, precision, self.registry.clock()
        self._log("worker registered", worker=worker_id, pool=pool, engine=engine, precision=precision)

    def workers_receiving(self, dtype: str, within_s: float = 30.0) -> int:
        """Workers seen in the last ``within_s`` seconds whose pool receives weights in ``dtype``
        (the joiners a broadcast round of that dtype waits for)."""
        with self.cond:
            return sum(1 for w in self.registry.heard_within(within_s)
                       if w.pool in self.pools and wire_dtype(self.pools[w.pool].precision) == dtype)

    def acquire(self, worker_id: str, pool: str, version: int, wait: float = 0.0) -> tuple[Optional[LeaseRecord], bool]:
        """(a lease or None, finished). Waits up to ``wait`` s for work (a long poll), so an idle
        worker hears of new work the moment it is queued."""
        if pool not in self.pools:
            raise KeyError(f"unknown rollout pool {pool!r}")
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                w = self.registry.seen(worker_id, pool, version)
                if self.finished:
                    w.told_finished = True
                    self.cond.notify_all()
                    return None, True
                rec = None
                if self.accepting and self.state.phase == "Running":
                    self._expire()
                    rec = self.book.acquire(pool, worker_id, self._version_for)
                left = deadline - time.monotonic()
                if rec is not None or left <= 0 or self.stop_requested:
                    break
                self.cond.wait(timeout=min(left, 0.25))
        if self.runtime:
            self.runtime.leases(self.book)
        return rec, False

    def submit(self, worker_id: str, pool: str, lease_id: str, version: int, samples: list[Sample],
               sampling_s: float, tokens: int) -> int:
        """Count a lease's samples; raises :class:`Rejected` (with the reason) when they cannot be."""
        with self.cond:
            self.registry.seen(worker_id, pool, version)
            verdict = self.book.check(lease_id, worker_id)
            if not verdict.accepted:
                self.book.complete(lease_id, worker_id)  # counts the rejection reason
                self._reject(verdict.reason)
                raise Rejected(verdict.reason)
            item = verdict.lease.item
            problem = check_submission(item, pool, version, self.version, samples, vocab_size=self.session.vocab_size,
                                       sampling_s=sampling_s, tokens=tokens)
            if problem:
                self.book.release(lease_id, "malformed")
                self._reject("malformed")
                self._failing(item, problem)
                raise Rejected("malformed", problem.detail if problem.cause == "malformed"
                               else f"{problem.cause}: {problem.detail}")
            if not item.is_eval and self.staleness.is_stale(pool, item.step, version):
                self.book.release(lease_id, "stale")
                self._reject("stale")
                self.dropped_stale += len(samples)
                self.dropped_by_pool[pool] += len(samples)
                self.dropped_since_step += len(samples)
                if self.runtime:
                    self.runtime.dropped(pool, len(samples))
                raise Rejected("stale", f"sampled with version {version}, step {item.step} allows "
                                        f"at most {self.staleness.bound(pool)} versions of lag")
            self.book.complete(lease_id, worker_id)
            self.failing.clear()
            self.last_accept = self.clock()
            if item.is_eval:
                self.eval_results[item.key] = samples
            else:
                buf = self.buffers[item.step]
                by_index = {p.index: p for p in item.prompts}
                if any(i in buf.rollouts for i in by_index):  # never count a group twice
                    self._reject("duplicate")
                    raise Rejected("duplicate", "these prompts already have their groups")
                for r in self.session.rollouts(samples, by_index, pool, version, worker_id):
                    buf.rollouts.setdefault(r.prompt_index, []).append(r)
                buf.done += 1
                buf.sampling_s += sampling_s
                buf.tokens += tokens
            self.cond.notify_all()
        if self.runtime:
            self.runtime.leases(self.book)
        return len(samples)

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self.runtime:
            self.runtime.rejected(reason)

    def _failing(self, item: WorkItem, problem: Problem) -> None:
        """Remember a malformed submission (under cond; its item was released, so it is leased
        again). The run fails once :data:`FAIL_AFTER_REJECTIONS` submissions were rejected for the
        same cause with nothing accepted in between, and either every outstanding work item of the
        oldest pending step (or the evaluation item) was among them or there were twice as many
        rejections as such items (a worker that gets the same released item back each time)."""
        keys, count = self.failing.get(problem.cause, (set(), 0))
        keys.add(item.key)
        count += 1
        self.failing[problem.cause] = (keys, count)
        self.last_rejection = f"{problem.cause}: {problem.detail}"
        pending = [b for st, b in sorted(self.buffers.items()) if not b.complete]
        need = max(1, pending[0].items - pending[0].done if pending and not item.is_eval else 1)
        if count >= FAIL_AFTER_REJECTIONS and (len(keys) >= need or count >= 2 * need):
            self._fail(f"every submission of a step was rejected as malformed ({problem.cause}): "
                       f"{count} in a row, the last: {problem.detail}")

    def _fail(self, message: str) -> None:
        """Stop the run with ``message`` (under cond): the status says Failed at once, the loop's
        wait raises RunFailed."""
        self.failure = message
        self.state.update(phase="Failed", message=message)
        self.cond.notify_all()

    def _check_progress(self) -> None:
        """Raise :class:`RunFailed` when the run failed or stalled (under cond, the loop's thread)."""
        if self.failure:
            raise RunFailed(self.failure)
        stall = self.spec.rollout.stall_timeout_seconds
        idle = self.clock() - self.last_accept
        if stall and idle > stall:
            seen = len(self.workers)
            why = (f"last rejection: {self.last_rejection}" if self.last_rejection else
                   f"{seen} worker(s) registered" + ("" if seen else ": is any rollout worker running?"))
            self._fail(f"no rollout accepted for {idle:.0f} s (rollout.stallTimeoutSeconds {stall:g}); {why}")
            raise RunFailed(self.failure)

    def _expire(self) -> None:
        for rec in self.book.expire():
            self._log("lease expired", lease=rec.lease_id, worker=rec.worker, item=rec.item.key)

    def stop(self) -> None:
        """Ask the run to stop (a signal handler): the loop's wait raises Stopped."""
        with self.cond:
            self.stop_requested = True
            self.cond.notify_all()

    def _wait(self, done: Callable[[], bool]) -> float:
        """Block until ``done()`` (under cond), expiring leases meanwhile; returns seconds waited."""
        t0 = time.perf_counter()
        with self.cond:
            while not done():
                if self.stop_requested:
                    raise Stopped()
                self._check_progress()
                self._expire()
                self.cond.wait(timeout=0.25)
        return time.perf_counter() - t0

    # -- RolloutSource (the loop's thread) -------------------------------------------------------
    def start(self) -> None:
        with self.cond:
            self.accepting = True
            self.last_accept = self.clock()
            self._fill()
            self.cond.notify_all()

    def collect(self, step: int) -> Batch:
        wait_s = self._wait(lambda: self.buffers[step].complete)
        with self.cond:
            buf = self.buffers.pop(step)
            dropped, self.dropped_since_step = self.dropped_since_step, 0
            expired, reissued = self.book.expired_total, self.book.reissued_total
            self.book.forget(lambda r: r.item.step >= step)
        rollouts = [r for idx in sorted(buf.rollouts) for r in buf.rollouts[idx]]
        return Batch(rollouts, {"time/sample_s": buf.sampling_s, "time/wait_s": wait_s,
                                "rollouts/dropped_stale": dropped, "leases/expired": expired,
                                "leases/reissued": reissued, "throughput/tokens": buf.tokens})

    def published(self) -> None:
        s = self.session
        self.publisher.publish(s.version, s.weights(s.version))
        with self.cond:
            self.version = s.version
            self.last_accept = self.clock()  # training time is not a stall
            self._fill()
            self.cond.notify_all()

    def request_eval(self, prompts: list[StepPrompt]) -> None:
        s = self.session
        with self.cond:
            self.eval_round += 1
            self.eval_keys, self.eval_greedy_keys = {}, {}
            for pool in self.pools:
                # sampled at the run's temperature, and greedy (temperature 0): the engine as deployed
                for keys, suffix, temperature in ((self.eval_keys, "", None), (self.eval_greedy_keys, "/greedy", 0.0)):
                    item = WorkItem(f"eval{self.eval_round}/{pool}{suffix}", pool, -1, prompts,
                                    seed=s.sampling_seed(-1, pool), n=1, max_new_tokens=s.task.max_new_tokens,
                                    is_eval=True, version=self.pool_version(pool), temperature=temperature)
                    self.book.add(item)
                    keys[pool] = item.key
            self.cond.notify_all()

    def eval_samples(self) -> dict[str, list[Sample]]:
        return self._eval_results(self.eval_keys)

    def eval_greedy_samples(self) -> dict[str, list[Sample]]:
        return self._eval_results(self.eval_greedy_keys)

    def _eval_results(self, keys: dict[str, str]) -> dict[str, list[Sample]]:
        self._wait(lambda: all(k in self.eval_results for k in keys.values()))
        with self.cond:
            return {pool: self.eval_results.pop(key) for pool, key in keys.items()}

    def set_max_staleness(self, lag: int) -> None:
        with self.cond:
            self.staleness = self.staleness.with_max_staleness(lag)
            self.cond.notify_all()  # a larger bound may queue more steps

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def close(self) -> None:
        pass  # the workers are told by acquire(); the server is the caller's

    def wait_workers_told(self, timeout: float, silent_s: float = 6.0) -> bool:
        """After the run: give workers up to ``timeout`` s to hear that it finished. A worker
        holding no live lease and silent for ``silent_s`` s (an idle worker long-polls every ≤ 2 s)
        is taken as dead and not waited for."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.registry.waiting_to_be_told(silent_s):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(timeout=min(left, 0.25))
        return True

    # -- status ----------------------------------------------------------------------------------
    def snapshot(self) -> TrainerStatus:
        """Everything ``GetStatus`` reports, taken under the lock (``status_snapshot.py``)."""
        with self.cond:
            st = self.state.copy()
            pools = [pool_status(name, st.last_row, workers=self.registry.in_pool(name),
                                 lag=st.lag_by_pool.get(name, 0.0), dropped=self.dropped_by_pool.get(name, 0))
                     for name in self.pools]
            workers = [WorkerInfo(worker_id=w.worker_id, pool=w.pool, weight_version=w.version,
                                  last_seen_unix_ms=int(w.last_seen * 1000), leases=self.book.outstanding(w.worker_id))
                       for w in self.workers.values()]
            return snapshot(st, run_name=self.session.run.metadata.name, weight_version=self.version, pools=pools,
                            queue_depth=sum(len(b.rollouts) for b in self.buffers.values()),
                            leases_outstanding=self.book.outstanding(), leases_expired=self.book.expired_total,
                            rollouts_dropped_stale=self.dropped_stale, workers=workers)

    def _log(self, msg: str, **fields: Any) -> None:
        if self.log:
            self.log.info(msg, extra={"fields": fields})
