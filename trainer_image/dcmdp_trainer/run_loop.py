"""The run loop: one loop for every runner, over a :class:`~dcmdp_trainer.rollout_source.RolloutSource`.

    evaluate (step 0 only)
    while steps remain:
        batch = source.collect(step)                 # the step's groups (in-process or remote)
        row = session.train_step(batch.rollouts)     # one DC-GRPO step: weights version + 1
        adaptive staleness: the next step's lag from the pools' λ (staleness.adaptive_lag)
        source.published()                           # the new version reaches the pools / workers
        evaluate on schedule (eval.everySteps, and after the last step)
        log the row (metrics.jsonl, TensorBoard, Prometheus)
        checkpoint on schedule (checkpoint.everySteps; the last one at Session.close)
        update the status, on_step(row)

The evaluation records ``eval/accuracy_greedy`` (the trainer's weights, greedy),
``pool/<p>/eval/accuracy_sampled`` (each pool's engine as deployed, sampled at the run's
temperature) and their mean ``eval/accuracy_sampled``, and ``pool/<p>/eval/accuracy_engine_greedy``
(each engine as deployed, greedy: the deployed policy's accuracy where the engine is the deployment)
and their mean ``eval/accuracy_engine_greedy``. The loop owns the run's
:class:`~dcmdp_trainer.run_state.RunState` (phase, recorded step, last row, checkpoint step,
evaluation accuracy): what the status snapshot reports. Metric names: docs/metrics.md.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from dcmdp.engine import Rollout
from dcmdp_trainer.rollout_source import RolloutSource, Stopped
from dcmdp_trainer.run_state import RunState
from dcmdp_trainer.session import Session, StepPrompt
from dcmdp_trainer.staleness import adaptive_lag

Callback = Callable[[dict[str, Any]], None]


def version_lags(rollouts: list[Rollout], version: int) -> dict[str, float]:
    """Mean lag of each pool's rollouts behind ``version`` (the weights the step trained from):
    {pool: mean(version − rollout.version)}, pools in order of first appearance."""
    out: dict[str, list[int]] = {}
    for r in rollouts:
        out.setdefault(r.pool, []).append(version - r.version)
    return {p: sum(v) / len(v) for p, v in out.items()}


class RunLoop:
    """Trains ``session`` to its last step with rollouts from ``source``.

    ``on_step(row)`` after each step's row is logged, ``on_eval(row)`` after each evaluation
    (``{"step", eval keys}``); ``runtime`` (``observability.TrainerMetrics``) and ``log`` (a JSON
    logger) are optional; ``state`` is shared with the status snapshot (a new one when None)."""

    def __init__(self, session: Session, source: RolloutSource, *, state: Optional[RunState] = None,
                 on_step: Optional[Callback] = None, on_eval: Optional[Callback] = None, runtime=None, log=None):
        self.session = session
        self.source = source
        self.state = state if state is not None else RunState(session.total_steps)
        self.state.update(total_steps=session.total_steps, step=session.step, checkpoint_step=session.step)
        self.on_step, self.on_eval = on_step, on_eval
        self.runtime, self.log = runtime, log
        self._held_out: Optional[list[StepPrompt]] = None
        self.adaptive = session.spec.algorithm.adaptive_staleness
        self.lag: Optional[int] = None  # adaptive staleness: the lag allowed for the step being sampled

    def adapt_staleness(self) -> Optional[int]:
        """Adaptive staleness: the lag the pools' λ now allows (``staleness.adaptive_lag``, λ the
        largest pool multiplier), handed to the source as its maxStaleness; None when off."""
        if not self.adaptive:
            return None
        algo = self.session.spec.algorithm
        lams = self.session.learner.constraints.lambdas().values()
        self.lag = adaptive_lag(max(lams, default=0.0), algo.constraint.lambda_max, algo.max_staleness)
        self.source.set_max_staleness(self.lag)
        return self.lag

    def run(self) -> None:
        """Train every remaining step. A failure sets the state's phase ``Failed`` with the
        exception as message and is raised; :class:`Stopped` leaves the phase as it was."""
        try:
            self._run()
        except Stopped:
            raise
        except Exception as exc:
            self.state.update(phase="Failed", message=f"{type(exc).__name__}: {exc}")
            raise

    def _run(self) -> None:
        s, spec = self.session, self.session.spec
        self.state.update(phase="Running")
        self.adapt_staleness()
        self.source.start()
        if s.step == 0:
            self.evaluate()
        while not s.finished:
            t0 = time.perf_counter()
            batch = self.source.collect(s.step)
            row = s.train_step(batch.rollouts, batch.metrics)
            if self.adaptive:  # the lag this step's rollouts were allowed, then the next step's
                row["staleness/lag"] = self.lag
                row["staleness/lag_next"] = self.adapt_staleness()
            self.source.published()
            lags = version_lags(batch.rollouts, s.version - 1)
            row["time/step_s"] = time.perf_counter() - t0
            row["throughput/steps_per_min"] = 60.0 / max(row["time/step_s"], 1e-9)
            if "throughput/tokens" in batch.metrics:
                row["throughput/tokens_per_s"] = batch.metrics["throughput/tokens"] / max(row["time/step_s"], 1e-9)
            every = spec.eval.every_steps
            if (every and s.step % every == 0) or s.finished:
                row.update(self.evaluate())
            s.log(row)
            # after the row: a kill in between resumes from the previous checkpoint and trims the rows
            # after it (the other order lost this step's row for good)
            checkpointed = s.checkpoint_due
            if checkpointed:
                s.save_checkpoint()
            if self.runtime:
                self.runtime.step(row, lags)
            # only now does the status report the step: its metrics are out
            self.state.update(last_row=row, step=s.step, lag_by_pool=lags,
                              **({"checkpoint_step": s.step} if checkpointed else {}))
            self._log("step trained", step=row["step"], version=s.version, reward=row.get("reward/mean"),
                      prob_diff_mean=row.get("discrepancy/prob_diff_mean"),
                      wait_s=round(row.get("time/wait_s", 0.0), 4), train_s=round(row["time/train_s"], 4),
                      lag_max=row.get("version/lag_max"))
            if self.on_step:
                self.on_step(row)
        self.state.update(phase="Succeeded", finished=True)
        self.source.finish()

    def held_out(self) -> list[StepPrompt]:
        if self._held_out is None:
            self._held_out = self.session.held_out_prompts()
        return self._held_out

    def evaluate(self) -> dict[str, float]:
        """Evaluate now (greedy on the trainer while the pools sample), record it in eval.jsonl,
        call ``on_eval``; returns the values."""
        s = self.session
        prompts = self.held_out()
        self.source.request_eval(prompts)
        values = {"eval/accuracy_greedy": s.evaluate_greedy()}
        for pool, samples in self.source.eval_samples().items():
            values[f"pool/{pool}/eval/accuracy_sampled"] = s.accuracy(samples, prompts)
        for pool, samples in self.source.eval_greedy_samples().items():
            values[f"pool/{pool}/eval/accuracy_engine_greedy"] = s.accuracy(samples, prompts)
        for key in ("accuracy_sampled", "accuracy_engine_greedy"):
            per_pool = [v for k, v in values.items() if k.startswith("pool/") and k.endswith(key)]
            values[f"eval/{key}"] = sum(per_pool) / len(per_pool)
        s.record_eval(values)
        self.state.update(eval_accuracy=values["eval/accuracy_sampled"])
        self._log("evaluated", step=s.step, **{k.replace("/", "_"): round(v, 4) for k, v in values.items()})
        if self.on_eval:
            self.on_eval(s.eval_rows[-1])
        return values

    def _log(self, msg: str, **fields: Any) -> None:
        if self.log:
            self.log.info(msg, extra={"fields": fields})
