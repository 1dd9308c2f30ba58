"""The trainer's run loop over remote rollouts: hand out prompts, collect groups, train, publish.

Work: each step's prompts are split between the pools in proportion to their replicas (as the
in-process runner does), and each pool's share into work items of ``rollout.batchPrompts``
prompts (default ``miniBatchSize``), each with its own sampling seed. A worker of the pool leases
an item (see ``leases.py``), samples ``groupSize`` responses per prompt with the weight version the
lease names, and submits them. A step is trained when every prompt of the step has its group.

Staleness: a rollout sampled with version u and trained in step s (at version s) lags s − u
versions. A pool may lag at most ``bound = max(maxStaleness, pool.lag)``. The prompts of step s are
leased to a pool only while s − (the version the pool samples with) ≤ bound, so with
``maxStaleness: 0`` the run is strictly on-policy: step s+1's prompts go out only once version s+1
is published. With ``maxStaleness: 1`` the workers sample step s+1 while the trainer trains step s.
A submission whose version is older than the bound allows (a slow or misbehaving worker) is dropped,
counted (``rollouts/dropped_stale``) and its prompts are leased again.

π_old is the trainer's weights at the start of the step (as in the in-process runner): the PPO
ratio and δ_t = |π_old − p_inf| both use it, so δ̄ includes the staleness of a lagging rollout.

Evaluation (at the start, every ``eval.everySteps`` and at the end) sends each pool one
evaluation item with the held-out prompts and records the same keys as the in-process runner.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from dcmdp.engine import Rollout, Sample
from dcmdp.precision import wire_dtype
from dcmdp.sample_check import Problem, check_response, check_timing
from dcmdp_trainer.leases import LeaseBook, LeaseRecord, WorkItem
from dcmdp_trainer.local import split_prompts
from dcmdp_trainer.session import Session, StepPrompt
from dcmdp_trainer.weights import WeightPublisher

Callback = Callable[[dict[str, Any]], None]


class Stopped(Exception):
    """The run was asked to stop (SIGTERM / Ctrl-C) before it finished."""


@dataclass
class WorkerState:
    worker_id: str
    pool: str
    engine: str = ""
    precision: str = ""
    version: int = -1
    last_seen: float = 0.0  # wall clock (time.time)
    told_finished: bool = False


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


class TooManyWorkers(Exception):
    """The worker registry is full (:data:`Coordinator.max_workers` workers heard from within
    :data:`WORKER_SILENT_S`): a new worker id is refused (the server answers RESOURCE_EXHAUSTED)."""


# a worker not heard from for this long (s) may be forgotten to make room for a new one
WORKER_SILENT_S = 300.0
# the malformed submissions of one cause, with nothing accepted in between, before the run fails
FAIL_AFTER_REJECTIONS = 3
# prompt indices a rejection message lists at most
LISTED_PROMPTS = 8


def _listed(indices) -> str:
    """``[0, 1, ...]`` with at most :data:`LISTED_PROMPTS` entries and the count of the rest."""
    indices = sorted(indices)
    head = ", ".join(str(i) for i in indices[:LISTED_PROMPTS])
    more = len(indices) - LISTED_PROMPTS
    return f"[{head}{f', ... ({more} more)' if more > 0 else ''}] ({len(indices)} prompts)"


class RunFailed(RuntimeError):
    """The run cannot make progress (every submission rejected for one cause, or none accepted for
    ``rollout.stallTimeoutSeconds``): the message names the cause."""


class Coordinator:
    def __init__(self, session: Session, publisher: WeightPublisher, *, log=None, runtime=None,
                 on_step: Optional[Callback] = None, on_eval: Optional[Callback] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.session = session
        spec = session.spec
        self.spec = spec
        self.algo = spec.algorithm
        self.publisher = publisher
        self.log = log
        self.runtime = runtime  # dcmdp_trainer.observability.TrainerMetrics (optional)
        self.on_step, self.on_eval = on_step, on_eval
        self.clock = clock
        self.pools = {p.name: p for p in spec.rollout.pools if p.replicas > 0}
        self.bound = {name: max(self.algo.max_staleness, p.lag) for name, p in self.pools.items()}
        self.batch = spec.rollout.batch_prompts or self.algo.mini_batch_size
        self.book = LeaseBook(spec.rollout.lease_timeout_seconds, clock=clock)
        self.cond = threading.Condition()
        self.version = session.version  # the newest *published* version
        self.issued_through = session.step - 1
        self.buffers: dict[int, StepBuffer] = {}
        self.eval_results: dict[str, list[Sample]] = {}
        self.eval_round = 0
        self.workers: dict[str, WorkerState] = {}
        # the registry's bound: room for every replica restarting several times over
        self.max_workers = max(64, 8 * sum(p.replicas for p in self.pools.values()))
        self.dropped_stale = 0
        self.dropped_by_pool: dict[str, int] = {p: 0 for p in self.pools}
        self.dropped_since_step = 0
        self.rejected: dict[str, int] = {}
        # malformed submissions since the last accepted one: cause -> (work item keys, submissions)
        self.failing: dict[str, tuple[set[str], int]] = {}
        self.last_accept = clock()
        self.last_rejection = ""
        self.phase = "Initializing"
        self.finished = False
        self.stop_requested = False
        self.message = ""
        self.last_row: dict[str, Any] = {}
        # steps whose row every sink (metrics.jsonl, Prometheus) holds: what GetStatus reports as
        # ``step``; session.step runs ahead of it while a trained step is published and logged
        self.steps_recorded = session.step
        self.lag_by_pool: dict[str, float] = {}
        self.checkpoint_step = session.step
        self.eval_accuracy: Optional[float] = None  # none until the first evaluation
        self.wait_s_total = 0.0
        self.train_s_total = 0.0
        self._held_out: Optional[list[StepPrompt]] = None
        self.updated = time.time()

    # -- versions and the staleness bound --------------------------------------------------------
    def pool_version(self, pool: str) -> int:
        """The version a pool samples with now (its ``lag`` versions behind, within what is kept)."""
        kept = self.publisher.versions()
        oldest = min(kept) if kept else self.version
        return max(oldest, self.version - self.pools[pool].lag)

    def _version_for(self, item: WorkItem) -> Optional[int]:
        v = self.pool_version(item.pool)
        return v if item.step - v <= self.bound[item.pool] else None

    # -- work ------------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Queue the steps the staleness bound allows to be sampled now (under ``cond``)."""
        s = self.session
        last = min(s.total_steps - 1, self.version + self.algo.max_staleness)
        while self.issued_through < last:
            step = self.issued_through + 1
            prompts = s.prompts(step)
            shares = split_prompts(prompts, {name: p.replicas for name, p in self.pools.items()})
            buf = self.buffers.setdefault(step, StepBuffer())
            for pool, share in shares.items():
                for c, start in enumerate(range(0, len(share), self.batch)):
                    chunk = share[start:start + self.batch]
                    self.book.add(WorkItem(f"s{step}/{pool}/{c}", pool, step, chunk,
                                           seed=s.sampling_seed(step, pool, c), n=self.algo.group_size,
                                           max_new_tokens=s.task.max_new_tokens))
                    buf.items += 1
            self.issued_through = step

    def held_out(self) -> list[StepPrompt]:
        if self._held_out is None:
            self._held_out = self.session.held_out_prompts()
        return self._held_out

    # -- RPC-facing operations (called from gRPC threads) ----------------------------------------
    def register(self, worker_id: str, pool: str, engine: str, precision: str) -> None:
        if pool not in self.pools:
            known = ", ".join(self.pools) or "none"
            raise KeyError(f"unknown rollout pool {pool!r} (pools with replicas: {known})")
        with self.cond:
            w = self._worker(worker_id, pool)
            w.pool, w.engine, w.precision, w.last_seen = pool, engine, precision, time.time()
        self._log("worker registered", worker=worker_id, pool=pool, engine=engine, precision=precision)

    def workers_receiving(self, dtype: str, within_s: float = 30.0) -> int:
        """Workers seen in the last ``within_s`` seconds whose pool receives weights in ``dtype``
        (the joiners a broadcast round of that dtype waits for)."""
        now = time.time()
        with self.cond:
            return sum(1 for w in self.workers.values() if w.pool in self.pools and now - w.last_seen <= within_s
                       and wire_dtype(self.pools[w.pool].precision) == dtype)

    def _worker(self, worker_id: str, pool: str) -> WorkerState:
        """The registry entry of ``worker_id``, added when new (under cond). When the registry holds
        :attr:`max_workers`, workers silent for :data:`WORKER_SILENT_S` s without a lease are
        forgotten first; raises :class:`TooManyWorkers` when that frees no room."""
        w = self.workers.get(worker_id)
        if w is not None:
            return w
        if len(self.workers) >= self.max_workers:
            now = time.time()
            for wid in [wid for wid, old in self.workers.items()
                        if now - old.last_seen > WORKER_SILENT_S and not self.book.outstanding(wid)]:
                del self.workers[wid]
            if len(self.workers) >= self.max_workers:
                raise TooManyWorkers(f"{len(self.workers)} rollout workers heard from in the last "
                                     f"{WORKER_SILENT_S:g} s (at most {self.max_workers}): worker "
                                     f"{worker_id[:64]!r} refused")
        w = self.workers[worker_id] = WorkerState(worker_id, pool)
        return w

    def _seen(self, worker_id: str, pool: str, version: int) -> WorkerState:
        w = self._worker(worker_id, pool)
        w.last_seen, w.version = time.time(), version
        return w

    def acquire(self, worker_id: str, pool: str, version: int, wait: float = 0.0) -> tuple[Optional[LeaseRecord], bool]:
        """(a lease or None, finished). Waits up to ``wait`` s for work (a long poll), so an idle
        worker hears of new work the moment it is queued."""
        if pool not in self.pools:
            raise KeyError(f"unknown rollout pool {pool!r}")
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                w = self._seen(worker_id, pool, version)
                if self.finished:
                    w.told_finished = True
                    self.cond.notify_all()
                    return None, True
                rec = None
                if self.phase == "Running":
                    for old in self.book.expire():
                        self._log("lease expired", lease=old.lease_id, worker=old.worker, item=old.item.key)
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
            self._seen(worker_id, pool, version)
            verdict = self.book.check(lease_id, worker_id)
            if not verdict.accepted:
                self.book.complete(lease_id, worker_id)  # counts the rejection reason
                self._reject(verdict.reason)
                raise Rejected(verdict.reason)
            rec = verdict.lease
            item = rec.item
            problem = self._malformed(item, pool, version, samples) or check_timing(sampling_s, tokens)
            if problem:
                self.book.release(lease_id, "malformed")
                self._reject("malformed")
                self._failing(item, problem if isinstance(problem, Problem) else Problem("malformed", problem))
                raise Rejected("malformed", str(problem))
            if not item.is_eval and item.step - version > self.bound[pool]:
                self.book.release(lease_id, "stale")
                self._reject("stale")
                self.dropped_stale += len(samples)
                self.dropped_by_pool[pool] += len(samples)
                self.dropped_since_step += len(samples)
                if self.runtime:
                    self.runtime.dropped(pool, len(samples))
                raise Rejected("stale", f"sampled with version {version}, step {item.step} allows "
                                        f"at most {self.bound[pool]} versions of lag")
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
        """Stop the run as Failed with ``message`` (under cond): the main loop raises RunFailed."""
        self.phase, self.message = "Failed", message
        self.cond.notify_all()

    def _check_progress(self) -> None:
        """Raise :class:`RunFailed` when the run failed or stalled (under cond, main thread)."""
        if self.phase == "Failed":
            raise RunFailed(self.message)
        stall = self.spec.rollout.stall_timeout_seconds
        idle = self.clock() - self.last_accept
        if stall and idle > stall:
            seen = len(self.workers)
            why = (f"last rejection: {self.last_rejection}" if self.last_rejection else
                   f"{seen} worker(s) registered" + ("" if seen else ": is any rollout worker running?"))
            self._fail(f"no rollout accepted for {idle:.0f} s (rollout.stallTimeoutSeconds {stall:g}); {why}")
            raise RunFailed(self.message)

    def _malformed(self, item: WorkItem, pool: str, version: int, samples: list[Sample]) -> "str | Problem":
        if pool != item.pool:
            return f"lease belongs to pool {item.pool!r}, submitted as {pool!r}"
        if version < 0 or version > self.version:
            return f"weight version {version} was never published (newest {self.version})"
        counts: dict[int, int] = {}
        for s in samples:
            counts[s.prompt_index] = counts.get(s.prompt_index, 0) + 1
            problem = check_response(s.response_ids, s.logprobs, vocab_size=self.session.vocab_size,
                                     max_new_tokens=item.max_new_tokens)
            if problem:
                return Problem(problem.cause, f"prompt {s.prompt_index}: {problem.detail}")
        want = {i: item.n for i in item.indices}
        if counts != want:
            wrong = sorted(i for i in want.keys() | counts.keys() if counts.get(i, 0) != want.get(i, 0))
            return (f"expected {item.n} samples for each of the lease's {len(want)} prompts; wrong count for "
                    f"prompts {_listed(wrong)}, e.g. prompt {wrong[0]}: {counts.get(wrong[0], 0)}")
        return ""

    # -- the loop (main thread) ------------------------------------------------------------------
    def stop(self) -> None:
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
                for rec in self.book.expire():
                    self._log("lease expired", lease=rec.lease_id, worker=rec.worker, item=rec.item.key)
                self.cond.wait(timeout=0.25)
        return time.perf_counter() - t0

    def run(self) -> None:
        s = self.session
        with self.cond:
            self.phase = "Running"
            self.last_accept = self.clock()
            self._fill()
            self.cond.notify_all()
        if s.step == 0:
            self._evaluate()
        t_step = time.perf_counter()
        while not s.finished:
            step = s.step
            wait_s = self._wait(lambda: self.buffers[step].complete)
            with self.cond:
                buf = self.buffers.pop(step)
                dropped, self.dropped_since_step = self.dropped_since_step, 0
                expired, reissued = self.book.expired_total, self.book.reissued_total
                self.book.forget(lambda r: r.item.step >= step)
            rollouts = [r for idx in sorted(buf.rollouts) for r in buf.rollouts[idx]]
            extra = {"time/sample_s": buf.sampling_s, "time/wait_s": wait_s,
                     "rollouts/dropped_stale": dropped, "leases/expired": expired, "leases/reissued": reissued,
                     "throughput/tokens": buf.tokens}
            row = s.train_step(rollouts, extra)
            self.train_s_total += row["time/train_s"]
            self.wait_s_total += wait_s
            self.publisher.publish(s.version, s.weights(s.version))
            with self.cond:
                self.version = s.version
                self.lag_by_pool = self._lags(rollouts)
                self.last_accept = self.clock()  # training time is not a stall
                self._fill()
                self.cond.notify_all()
            now = time.perf_counter()
            row["time/step_s"] = now - t_step
            row["throughput/tokens_per_s"] = buf.tokens / max(row["time/step_s"], 1e-9)
            every = self.spec.eval.every_steps
            if (every and s.step % every == 0) or s.finished:
                row.update(self._evaluate())
            t_step = time.perf_counter()
            ck = self.spec.checkpoint.every_steps
            if ck and s.step % ck == 0 and s.step < s.total_steps:
                self.checkpoint_step = s.step  # Session.train_step wrote it
            s.log(row)
            if self.runtime:
                self.runtime.step(row, self.lag_by_pool)
            with self.cond:  # only now does GetStatus report the step: its metrics are out
                self.last_row = row
                self.steps_recorded = s.step
                self.updated = time.time()
            self._log("step trained", step=row["step"], version=s.version, reward=row.get("reward/mean"),
                      prob_diff_mean=row.get("discrepancy/prob_diff_mean"), wait_s=round(wait_s, 4),
                      train_s=round(row["time/train_s"], 4), lag_max=row.get("version/lag_max"))
            if self.on_step:
                self.on_step(row)
        with self.cond:
            self.finished = True
            self.phase = "Succeeded"
            self.updated = time.time()
            self.cond.notify_all()

    def _lags(self, rollouts: list[Rollout]) -> dict[str, float]:
        out: dict[str, list[int]] = {}
        for r in rollouts:
            out.setdefault(r.pool, []).append(self.version - 1 - r.version)
        return {p: sum(v) / len(v) for p, v in out.items()}

    def _evaluate(self) -> dict[str, float]:
        s = self.session
        with self.cond:
            self.eval_round += 1
            keys = {}
            for pool in self.pools:
                item = WorkItem(f"eval{self.eval_round}/{pool}", pool, -1, self.held_out(),
                                seed=s.sampling_seed(-1, pool), n=1, max_new_tokens=s.task.max_new_tokens,
                                is_eval=True, version=self.pool_version(pool))
                self.book.add(item)
                keys[pool] = item.key
            self.cond.notify_all()
        values = {"eval/accuracy_greedy": s.evaluate_greedy()}
        self._wait(lambda: all(k in self.eval_results for k in keys.values()))
        with self.cond:
            for pool, key in keys.items():
                values[f"pool/{pool}/eval/accuracy_sampled"] = s.accuracy(self.eval_results.pop(key), self.held_out())
        sampled = [v for k, v in values.items() if k.endswith("accuracy_sampled")]
        values["eval/accuracy_sampled"] = sum(sampled) / len(sampled)
        s.record_eval(values)
        self.eval_accuracy = values["eval/accuracy_sampled"]
        self._log("evaluated", step=s.step, **{k.replace("/", "_"): round(v, 4) for k, v in values.items()})
        if self.on_eval:
            self.on_eval(s.eval_rows[-1])
        return values

    def wait_workers_told(self, timeout: float, silent_s: float = 6.0) -> bool:
        """After the run: give workers up to ``timeout`` s to hear that it finished. A worker
        holding no live lease and silent for ``silent_s`` s (an idle worker long-polls every ≤ 2 s)
        is taken as dead and not waited for."""
        deadline = time.monotonic() + timeout

        def alive(w: WorkerState) -> bool:
            return time.time() - w.last_seen < silent_s or self.book.outstanding(w.worker_id) > 0

        with self.cond:
            while any(not w.told_finished and alive(w) for w in self.workers.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(timeout=min(left, 0.25))
        return True

    # -- status ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything ``GetStatus`` reports (plain values, taken under the lock). A figure not known
        yet (no step finished, no constraint, ``auto`` still calibrating) is None: absent on the
        wire, never 0."""
        with self.cond:
            row = dict(self.last_row)

            def known(key: str) -> Optional[float]:
                v = row.get(key)
                return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

            queue = sum(len(b.rollouts) for b in self.buffers.values())
            pools = []
            for name in self.pools:
                pools.append({
                    "name": name,
                    "prob_diff_mean": known(f"pool/{name}/discrepancy/prob_diff_mean"),
                    "lambda": known(f"pool/{name}/constraint/lambda"),
                    "tolerance": known(f"pool/{name}/constraint/tolerance"),
                    "tokens": int(row.get(f"pool/{name}/discrepancy/tokens") or 0),
                    "workers": sum(1 for w in self.workers.values() if w.pool == name),
                    "reward_mean": known(f"pool/{name}/reward/mean"),
                    "version_lag_mean": self.lag_by_pool.get(name, 0.0),
                    "rollouts_dropped_stale": self.dropped_by_pool.get(name, 0),
                })
            workers = [{"worker_id": w.worker_id, "pool": w.pool, "weight_version": w.version,
                        "last_seen_unix_ms": int(w.last_seen * 1000),
                        "leases": self.book.outstanding(w.worker_id)} for w in self.workers.values()]
            return {
                "run_name": self.session.run.metadata.name, "phase": self.phase,
                "step": self.steps_recorded, "total_steps": self.session.total_steps,
                "weight_version": self.version, "reward_mean": known("reward/mean"),
                "prob_diff_mean": known("discrepancy/prob_diff_mean"),
                "run_lambda": known("constraint/run_lambda"), "tolerance": known("constraint/tolerance"),
                "pools": pools, "queue_depth": queue, "leases_outstanding": self.book.outstanding(),
                "leases_expired": self.book.expired_total, "rollouts_dropped_stale": self.dropped_stale,
                "workers": workers, "finished": self.finished, "message": self.message,
                "checkpoint_step": self.checkpoint_step, "eval_accuracy": self.eval_accuracy,
                "updated_unix_ms": int(self.updated * 1000),
            }

    def _log(self, msg: str, **fields: Any) -> None:
        if self.log:
            self.log.info(msg, extra={"fields": fields})
