"""A training session: everything the trainer owns for one run, whoever delivers the rollouts.

The in-process runner (``local.py``) and the gRPC trainer server call the same methods:

    s = Session(run, out_dir, resume=...)          # model, tokenizer, task, warm start, learner
    s.model_dir                                     # HF folder engines are built from
    s.prompts(step)                                 # the step's prompts, seeded from (seed, step)
    s.rollouts(samples, prompts, pool, version)     # rewards from the task's verifier
    row = s.train_step(rollouts, extra)             # one RL step: metrics row, checkpoint, new version
    s.weights(version)                              # a published weight snapshot (kept for lags)
    s.evaluate(...)                                 # held-out accuracy
    s.close()                                       # final checkpoint, plots, summary
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dcmdp.engine import Rollout, Sample
from dcmdp.generation import sample
from dcmdp.metrics import MetricsWriter, PrometheusSink, trim_jsonl
from dcmdp.models.tiny import build_model, num_parameters, save_model
from dcmdp.spec import DCMDPRun, dump_run
from dcmdp.tasks import Problem, build_task
from dcmdp_trainer import checkpoint
from dcmdp_trainer.learner import Learner
from dcmdp_trainer.warmstart import prompt_ids, warm_start


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


class Session:
    def __init__(self, run: DCMDPRun, out_dir: Path, *, resume: bool = False, steps: Optional[int] = None,
                 prometheus: Optional[PrometheusSink] = None, threads: int = 0,
                 learner_factory: Optional[Callable[..., Learner]] = None):
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
        self.pools = [p.name for p in self.spec.rollout.pools]
        self.max_lag = max([p.lag for p in self.spec.rollout.pools] + [self.spec.algorithm.max_staleness])
        self.history: "OrderedDict[int, dict[str, torch.Tensor]]" = OrderedDict()
        self.step = 0
        self.version = 0
        self.warmstart: dict[str, float] = {}
        self.eval_rows: list[dict[str, Any]] = []

        # the newest intact checkpoint (broken newer ones are skipped with a warning)
        ckpt, state = checkpoint.load_latest(self.out) if resume else (None, None)
        if ckpt is None:
            self.warmstart = warm_start(self.model, self.tokenizer, self.task, self.spec.model.warm_start, seed)
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
            if (self.out / "eval.jsonl").exists():
                trim_jsonl(self.out / "eval.jsonl")  # a torn last line would corrupt the next append
        else:
            self._publish()
        self.metrics = MetricsWriter(self.out, resume_step=self.step if ckpt is not None else None, prometheus=prometheus)
        self.started = time.time()

    # -- weights -------------------------------------------------------------------------------
    def _publish(self) -> None:
        """Snapshot the current weights as ``self.version``; keep as many as lags need."""
        self.history[self.version] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        while len(self.history) > self.max_lag + 1:
            self.history.popitem(last=False)

    def weights(self, version: int) -> dict[str, torch.Tensor]:
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
        return [StepPrompt(base + i, prompt_ids(self.tokenizer, p.prompt), p) for i, p in enumerate(self.task.sample(rng, n))]

    def decode(self, ids: list[int]) -> str:
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def rollouts(self, samples: list[Sample], prompts: dict[int, StepPrompt], pool: str, version: int,
                 worker: str = "") -> list[Rollout]:
        out = []
        for s in samples:
            p = prompts[s.prompt_index]
            reward = self.task.reward(self.decode(s.response_ids), p.problem.answer)
            out.append(Rollout(s.prompt_index, p.ids, list(s.response_ids), list(s.logprobs), reward, pool, version, worker))
        return out

    def sampling_seed(self, step: int, pool: str, replica: int = 0) -> int:
        return stable_seed(self.spec.algorithm.seed, step, pool, replica)

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, rollouts: list[Rollout], extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = self.learner.train_step(rollouts)
        lags = [self.version - r.version for r in rollouts]
        row = {"step": self.step, "version": self.version, **row,
               "version/lag_mean": sum(lags) / max(1, len(lags)), "version/lag_max": max(lags, default=0)}
        row.update(extra or {})
        row["time/train_s"] = time.perf_counter() - t0
        self.step += 1
        self.version += 1
        self._publish()
        every = self.spec.checkpoint.every_steps
        if every and self.step % every == 0 and self.step < self.total_steps:
            self.save_checkpoint()
        return row

    def log(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self.out, self.step, {
            "learner": self.learner.state_dict(), "version": self.version,
            "history": list(self.history.items()), "warmstart": self.warmstart,
        }, keep=self.spec.checkpoint.keep)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    # -- evaluation ----------------------------------------------------------------------------
    def held_out_prompts(self) -> list[StepPrompt]:
        return [StepPrompt(i, prompt_ids(self.tokenizer, p.prompt), p) for i, p in enumerate(self.task.held_out())]

    def accuracy(self, samples: list[Sample], prompts: list[StepPrompt]) -> float:
        by_index = {p.index: p for p in prompts}
        if not samples:
            return 0.0
        return sum(self.task.reward(self.decode(s.response_ids), by_index[s.prompt_index].problem.answer)
                   for s in samples) / len(samples)

    def evaluate_greedy(self) -> float:
        """Held-out accuracy of the trainer's own weights, greedy decoding."""
        prompts = self.held_out_prompts()
        self.model.eval()
        out = sample(self.model, [p.ids for p in prompts], n=1, max_new_tokens=self.task.max_new_tokens,
                     eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id, temperature=0.0)
        samples = [Sample(p.index, r, lp) for p, r, lp in zip(prompts, out.responses, out.logprobs)]
        return self.accuracy(samples, prompts)

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
            "eval": self.eval_rows,
        }

    def close(self) -> dict[str, Any]:
        if self.step > 0:
            self.save_checkpoint()
        self.metrics.close()
        summary = self.summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
