"""A training session: everything the trainer owns for one run, whoever delivers the rollouts.

The run loop (``run_loop.py``) calls these, whichever rollout source it drives:

    s = Session(run, out_dir, resume=...)          # model, tokenizer, task, warm start, learner
    s.model_dir                                     # HF folder engines are built from
    s.prompts(step)                                 # the step's prompts, seeded from (seed, step)
    s.rollouts(samples, prompts, pool, version)     # rewards from the task's verifier
    row = s.train_step(rollouts, extra)             # one RL step: metrics row, new version
    if s.checkpoint_due: s.save_checkpoint()        # on schedule (checkpoint.everySteps)
    s.weights(version)                              # a published weight snapshot (kept for lags)
    s.evaluate(...)                                 # held-out accuracy
    s.close()                                       # final checkpoint, plots, summary
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dcmdp.engine import Rollout, Sample
from dcmdp.metrics import MetricsWriter, PrometheusSink, read_metrics
from dcmdp.models.tiny import build_model, context_length, num_parameters, save_model, vocab_limit
from dcmdp.spec import DCMDPRun, dump_run
from dcmdp.tasks import Problem, build_task
from dcmdp.tasks.base import RewardError, check_reward
from dcmdp.tasks.prompt import prompt_format
from dcmdp_trainer import checkpoint
from dcmdp_trainer.learner import Learner
from dcmdp_trainer.warmstart import prompt_ids, warm_start

log = logging.getLogger("dcmdp.trainer")
# Warn when more than this fraction of a step's responses hit maxNewTokens.
TRUNCATED_WARNING = 0.5


@dataclass
class StepPrompt:
    index: int  # unique within the run: step * promptsPerStep + i
    ids: list[int]
    problem: Problem


def stable_seed(*parts: Any) -> int:
    """A seed derived from ``parts`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class NonFiniteWeights(RuntimeError):
    """The trainer's weights hold NaN or inf: they are never published or checkpointed."""


class Session:
    def __init__(self, run: DCMDPRun, out_dir: Path, *, resume: bool = False, steps: Optional[int] = None,
                 prometheus: Optional[PrometheusSink] = None, threads: int = 0,
                 learner_factory: Optional[Callable[..., Learner]] = None, serve_lags: bool = False):
        quiet_transformers()
        if threads:
            torch.set_num_threads(threads)
        self.run = run
        self.spec = run.spec
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.total_steps = steps or self.spec.algorithm.steps
        self.task = build_task(self.spec.task)
        seed = self.spec.algorithm.seed
        torch.manual_seed(seed)
        self.model, self.tokenizer = build_model(self.spec.model, seed=seed)
        self.vocab_size = vocab_limit(self.model)  # ids engines may sample (embedding rows)
        self.context = context_length(self.model)
        self.format = prompt_format(self.spec.task)
        self.verifier = self.spec.task.dataset.verifier if self.spec.task.dataset else self.task.name
        self.invalid_reward = self.spec.task.dataset.invalid_reward if self.spec.task.dataset else "error"
        self.invalid_rewards = 0  # verifier results scored 0 (invalidReward: zero), since the last step
        self.truncation_warned = False
        self.dropped_prompts = self._check_lengths()
        self.pools = [p.name for p in self.spec.rollout.pools]
        self.max_lag = max([p.lag for p in self.spec.rollout.pools] + [self.spec.algorithm.max_staleness])
        # versions kept besides the current one: what a feature needs, nothing more (docs/runtime.md,
        # "Trainer memory"): δ against the sampled version needs every version a rollout may come from;
        # the in-process runner (serve_lags) serves its lagged pools from here; the gRPC runtime's
        # weight publisher keeps what workers may still fetch itself
        older = 0
        if self.spec.algorithm.discrepancy_reference == "sampled":
            older = self.max_lag
        if serve_lags:  # (adaptive staleness: pools may sample up to maxStaleness behind)
            adaptive = self.spec.algorithm.max_staleness if self.spec.algorithm.adaptive_staleness else 0
            older = max(older, adaptive, max(p.lag for p in self.spec.rollout.pools))
        self.keep_versions = 1 + older
        self.history: "OrderedDict[int, dict[str, torch.Tensor]]" = OrderedDict()
        self.step = 0
        self.version = 0
        self.warmstart: dict[str, float] = {}
        self.eval_rows: list[dict[str, Any]] = []

        # the newest intact checkpoint (broken newer ones are skipped with a warning)
        ckpt, state = checkpoint.load_latest(self.out) if resume else (None, None)
        self.resumed_finished = False
        if ckpt is None:
            self.warmstart = warm_start(self.model, self.tokenizer, self.task, self.spec.model.warm_start, seed,
                                        steps=self.spec.model.warm_start_steps, fmt=self.format)
            self.model_dir = save_model(self.model, self.tokenizer, self.out / "model")
            (self.out / "run.json").write_text(json.dumps(dump_run(run), indent=2))
        # learner_factory: e.g. the DeepSpeed learner of dcmdp_trainer.distributed (same arguments)
        self.learner = (learner_factory or Learner)(run, self.model, self.tokenizer.pad_token_id, self.pools)
        self.learner.snapshot_of = lambda v: None if v == self.version else self.history.get(v)
        if state is not None:
            checkpoint.restore_rng(state)  # again: building the learner may have drawn numbers
            self.learner.load_state_dict(state["learner"])
            self.step, self.version = state["step"], state["version"]
            self.history = OrderedDict(state["history"])
            self.warmstart = state.get("warmstart", {})
            self.model_dir = self.out / "model"
            self.eval_rows = self._earlier_evals(self.step)
            self.resumed_finished = self.step >= self.total_steps
            if self.resumed_finished:
                log.warning("--resume: the run in %s already finished (step %d of %d); nothing to do",
                            self.out, self.step, self.total_steps)
        else:
            self._publish()
        self.metrics = MetricsWriter(self.out, resume_step=self.step if ckpt is not None else None, prometheus=prometheus)
        self.started = time.time()

    # -- lengths -------------------------------------------------------------------------------
    def _check_lengths(self) -> int:
        """Drop (or refuse, per ``task.overlongPrompts``) dataset prompts whose tokens plus
        ``maxNewTokens`` exceed the model's context; returns how many were dropped."""
        drop = getattr(self.task, "drop", None)
        if not self.context or drop is None:
            return 0
        budget = self.context - self.task.max_new_tokens
        too_long = {p.prompt for p in self.task.problems()
                    if len(self.format.ids(self.tokenizer, p.prompt)) > budget}
        if not too_long:
            return 0
        first = ", ".join(repr(p[:40]) for p in list(too_long)[:3])
        what = (f"{len(too_long)} prompt(s) longer than {budget} tokens (context {self.context} - "
                f"maxNewTokens {self.task.max_new_tokens}); first: {first}")
        if self.spec.task.overlong_prompts == "refuse":
            raise ValueError(f"spec.task.dataset.path: {what} (overlongPrompts: refuse)")
        drop(lambda p: p.prompt in too_long)
        log.warning("spec.task.dataset: dropped %s", what)
        return len(too_long)

    # -- weights -------------------------------------------------------------------------------
    def _publish(self) -> None:
        """Snapshot the current weights on the host as ``self.version``; keep ``keep_versions``.

        The learner hands the weights over one tensor at a time (ZeRO-3: one gathered parameter at
        a time), each copied to the host as it comes; a tied tensor is held once. Raises
        :class:`NonFiniteWeights` (naming a tensor) when any weight is NaN or inf: nothing is kept."""
        snapshot: dict[str, torch.Tensor] = {}
        bad = None
        for name, t, same_as in self.learner.weights():  # consumed whole: ZeRO-3 ranks gather together
            if bad is not None:
                continue
            if same_as is not None:
                snapshot[name] = snapshot[same_as]
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = name
            else:
                snapshot[name] = t.to("cpu", copy=True)
        if bad is not None:
            raise self._non_finite(bad)
        self.history[self.version] = snapshot
        while len(self.history) > self.keep_versions:
            self.history.popitem(last=False)

    def _non_finite(self, name: str) -> "NonFiniteWeights":
        return NonFiniteWeights(f"weights of version {self.version} hold NaN/inf (first: {name}); "
                                "not published or checkpointed")

    def _check_finite(self) -> None:
        """:class:`NonFiniteWeights` naming the first NaN/inf tensor of the live weights."""
        bad = None
        for name, t, _ in self.learner.weights():
            if bad is None and t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = name
        if bad is not None:
            raise self._non_finite(bad)

    def weights(self, version: int) -> dict[str, torch.Tensor]:
        """The CPU snapshot of ``version`` (never changed afterwards), or the oldest kept."""
        if version not in self.history:
            version = min(self.history)  # the oldest we still have
        return self.history[version]

    def version_for(self, lag: int) -> int:
        return max(min(self.history), self.version - lag)

    # -- prompts and rewards -------------------------------------------------------------------
    def prompts(self, step: int, count: Optional[int] = None) -> list[StepPrompt]:
        n = count or self.spec.algorithm.prompts_per_step
        rng = random.Random(stable_seed(self.spec.algorithm.seed, step, "prompts"))
        base = step * self.spec.algorithm.prompts_per_step
        return [StepPrompt(base + i, prompt_ids(self.tokenizer, p.prompt, self.format), p)
                for i, p in enumerate(self.task.sample(rng, n))]

    def decode(self, ids: list[int]) -> str:
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def reward(self, response_ids: list[int], problem: Problem) -> float:
        """The verifier's reward of a response, checked finite (:class:`RewardError` naming the
        verifier and prompt, or 0.0 counted in ``reward/invalid`` with ``invalidReward: zero``)."""
        try:
            try:
                value = self.task.reward(self.decode(response_ids), problem.answer)
            except RewardError:
                raise
            except Exception as exc:  # noqa: BLE001 - a user verifier may raise anything
                raise RewardError(f"verifier {self.verifier!r} raised {type(exc).__name__}: {exc} "
                                  f"for prompt {problem.prompt[:80]!r}") from exc
            return check_reward(value, self.verifier, problem.prompt)
        except RewardError:
            if self.invalid_reward != "zero":
                raise
            self.invalid_rewards += 1
            return 0.0

    def rollouts(self, samples: list[Sample], prompts: dict[int, StepPrompt], pool: str, version: int,
                 worker: str = "") -> list[Rollout]:
        out = []
        for s in samples:
            p = prompts[s.prompt_index]
            out.append(Rollout(s.prompt_index, p.ids, list(s.response_ids), list(s.logprobs),
                               self.reward(s.response_ids, p.problem), pool, version, worker,
                               {"finish_reason": s.finish_reason}))
        return out

    def sampling_seed(self, step: int, pool: str, replica: int = 0) -> int:
        return stable_seed(self.spec.algorithm.seed, step, pool, replica)

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, rollouts: list[Rollout], extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = self.learner.train_step(rollouts)
        lags = [self.version - r.version for r in rollouts]
        truncated = sum(r.extra.get("finish_reason") == "length" for r in rollouts) / max(1, len(rollouts))
        row = {"step": self.step, "version": self.version, **row,
               "version/lag_mean": sum(lags) / max(1, len(lags)), "version/lag_max": max(lags, default=0),
               "response/truncated_frac": truncated, "reward/invalid": self.invalid_rewards}
        self.invalid_rewards = 0
        if truncated > TRUNCATED_WARNING and not self.truncation_warned:
            self.truncation_warned = True
            log.warning("step %d: %.0f%% of responses hit maxNewTokens (%d) before EOS; their reward is "
                        "likely 0: raise spec.task.maxNewTokens", self.step, 100 * truncated, self.task.max_new_tokens)
        row.update(extra or {})
        row["time/train_s"] = time.perf_counter() - t0
        self.step += 1
        self.version += 1
        self._publish()
        return row

    @property
    def checkpoint_due(self) -> bool:
        """Whether a checkpoint is due after the step just trained: every ``checkpoint.everySteps``
        steps before the last (the last step's is written by :meth:`close`)."""
        every = self.spec.checkpoint.every_steps
        return bool(every and self.step % every == 0 and self.step < self.total_steps)

    def log(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)

    def save_checkpoint(self) -> Path:
        self._check_finite()
        return checkpoint.save(self.out, self.step, {
            "learner": self.learner.state_dict(), "version": self.version,
            "history": list(self.history.items()), "warmstart": self.warmstart,
        }, keep=self.spec.checkpoint.keep)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    # -- evaluation ----------------------------------------------------------------------------
    def held_out_prompts(self) -> list[StepPrompt]:
        return [StepPrompt(i, prompt_ids(self.tokenizer, p.prompt, self.format), p)
                for i, p in enumerate(self.task.held_out())]

    def accuracy(self, samples: list[Sample], prompts: list[StepPrompt]) -> float:
        by_index = {p.index: p for p in prompts}
        if not samples:
            return 0.0
        return sum(self.reward(s.response_ids, by_index[s.prompt_index].problem) for s in samples) / len(samples)

    def evaluate_greedy(self) -> float:
        """Held-out accuracy of the trainer's own weights, greedy decoding."""
        prompts = self.held_out_prompts()
        out = self.learner.generate([p.ids for p in prompts], n=1, max_new_tokens=self.task.max_new_tokens,
                                    eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                                    temperature=0.0)
        samples = [Sample(p.index, r, lp) for p, r, lp in zip(prompts, out.responses, out.logprobs)]
        return self.accuracy(samples, prompts)

    def _earlier_evals(self, step: int) -> list[dict[str, Any]]:
        """Evaluations up to ``step`` (the checkpoint resumed from); eval.jsonl is cut back to them."""
        path = self.out / "eval.jsonl"
        rows = read_metrics(path) if path.exists() else []  # a torn last line is dropped
        rows = [r for r in rows if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def record_eval(self, values: dict[str, float]) -> None:
        row = {"step": self.step, **values}
        self.eval_rows.append(row)
        with (self.out / "eval.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.step, "weight_version": self.version, "wall_s": time.time() - self.started,
            "parameters": num_parameters(self.model), "warmstart": self.warmstart,
            "lambdas": self.learner.constraints.lambdas() if self.spec.algorithm.uses_constraint else {},
            "tolerances": {p: m.tolerance for p, m in self.learner.constraints.pools.items()},
            "eval": self.eval_rows, "dropped_prompts": self.dropped_prompts,
        }

    def close(self) -> dict[str, Any]:
        """Final checkpoint and summary.json; a resumed run that was already finished changes nothing."""
        self.metrics.close()
        summary_file = self.out / "summary.json"
        if self.resumed_finished and summary_file.exists():
            return json.loads(summary_file.read_text())
        if self.step > 0:
            try:
                self.save_checkpoint()
            except NonFiniteWeights as exc:  # the run failed on them: keep the last good checkpoint
                log.error("%s", exc)
        summary = self.summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
