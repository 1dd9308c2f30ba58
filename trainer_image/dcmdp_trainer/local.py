"""The in-process runner: trainer and one engine per rollout pool in one Python process.

The same ``Session`` as the gRPC trainer server; only who generates the rollouts differs. Used by
tests, sweeps and ``dcmdp run --inprocess``. Each step's prompts are split between the pools in
proportion to their replicas; a pool with ``lag: K`` samples with the weights K versions old.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from dcmdp.engine import RolloutEngine, Sample, SamplingParams, make_engine
from dcmdp.precision import wire_dtype
from dcmdp.sample_check import check_response
from dcmdp.spec import DCMDPRun
from dcmdp.transport.buckets import loopback
from dcmdp_trainer.session import Session, StepPrompt

Callback = Callable[[dict[str, Any]], None]


def split_prompts(prompts: list[StepPrompt], weights: dict[str, int]) -> dict[str, list[StepPrompt]]:
    """Contiguous shares of the step's prompts, proportional to each pool's replicas (≥ 1 each)."""
    active = {k: w for k, w in weights.items() if w > 0}
    total = sum(active.values())
    out, start, names = {}, 0, list(active)
    for i, name in enumerate(names):
        share = len(prompts) - start if i == len(names) - 1 else round(len(prompts) * active[name] / total)
        out[name] = prompts[start:start + share]
        start += share
    return {k: v for k, v in out.items() if v}


class LocalPools:
    """One engine per pool, kept at the weight version the pool's lag asks for."""

    def __init__(self, session: Session, options: Optional[dict[str, Any]] = None):
        self.session = session
        self.engines: dict[str, RolloutEngine] = {}
        self.loaded: dict[str, int] = {}
        for pool in session.spec.rollout.pools:
            if pool.replicas == 0:
                continue
            opts = dict(options or {}, device=pool.device) if pool.engine == "hf" else options
            self.engines[pool.name] = make_engine(pool.engine, str(session.model_dir), pool.precision,
                                                  noise=pool.noise, seed=session.spec.algorithm.seed, options=opts)

    def sync(self, pool: str, lag: int) -> int:
        version = self.session.version_for(lag)
        if self.loaded.get(pool) != version:
            spec = next(p for p in self.session.spec.rollout.pools if p.name == pool)
            # what a worker of the pool receives: the weights rounded to its wire dtype
            state = loopback(self.session.weights(version), wire_dtype(spec.precision))
            self.engines[pool].load_weights(state, version)
            self.loaded[pool] = version
        return version

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


def checked(samples: list[Sample], session: Session, pool: str, max_new_tokens: int) -> list[Sample]:
    """The engine's samples, or ``RuntimeError`` naming the pool and the first implausible one (an
    in-process engine has no one to retry: its output is never trained on)."""
    for s in samples:
        problem = check_response(s.response_ids, s.logprobs, vocab_size=session.vocab_size,
                                 max_new_tokens=max_new_tokens)
        if problem:
            raise RuntimeError(f"rollout pool {pool!r}: implausible sample for prompt {s.prompt_index} "
                               f"({problem.cause}): {problem.detail}")
    return samples


def evaluate(session: Session, pools: LocalPools) -> dict[str, float]:
    """Held-out accuracy: greedy from the trainer, and sampled from each pool's engine as deployed."""
    values = {"eval/accuracy_greedy": session.evaluate_greedy()}
    prompts = session.held_out_prompts()
    algo = session.spec.algorithm
    for pool in session.spec.rollout.pools:
        if pool.name not in pools.engines:
            continue
        pools.sync(pool.name, pool.lag)
        samples = pools.engines[pool.name].generate(
            [p.ids for p in prompts], [p.index for p in prompts],
            SamplingParams(n=1, max_new_tokens=session.task.max_new_tokens, temperature=algo.temperature,
                           seed=session.sampling_seed(-1, pool.name)))
        values[f"pool/{pool.name}/eval/accuracy_sampled"] = session.accuracy(samples, prompts)
    sampled = [v for k, v in values.items() if k.endswith("accuracy_sampled")]
    values["eval/accuracy_sampled"] = sum(sampled) / len(sampled)
    return values


def run_inprocess(run: DCMDPRun, out_dir: Path, *, steps: Optional[int] = None, resume: bool = False,
                  on_step: Optional[Callback] = None, on_eval: Optional[Callback] = None,
                  threads: int = 0) -> dict[str, Any]:
    session = Session(run, Path(out_dir), resume=resume, steps=steps, threads=threads, serve_lags=True)
    pools = LocalPools(session)
    spec, algo = session.spec, session.spec.algorithm
    every_eval = spec.eval.every_steps
    try:
        if session.step == 0:
            session.record_eval(evaluate(session, pools))
            if on_eval:
                on_eval(session.eval_rows[-1])
        while not session.finished:
            t0 = time.perf_counter()
            step = session.step
            prompts = session.prompts(step)
            shares = split_prompts(prompts, {p.name: p.replicas for p in spec.rollout.pools})
            rollouts, t_sample = [], 0.0
            for pool in spec.rollout.pools:
                if pool.name not in shares:
                    continue
                version = pools.sync(pool.name, pool.lag)
                ts = time.perf_counter()
                mine = shares[pool.name]
                samples = checked(pools.engines[pool.name].generate(
                    [p.ids for p in mine], [p.index for p in mine],
                    SamplingParams(n=algo.group_size, max_new_tokens=session.task.max_new_tokens,
                                   temperature=algo.temperature, seed=session.sampling_seed(step, pool.name))),
                    session, pool.name, session.task.max_new_tokens)
                t_sample += time.perf_counter() - ts
                rollouts += session.rollouts(samples, {p.index: p for p in mine}, pool.name, version)
            row = session.train_step(rollouts, {"time/sample_s": t_sample})
            row["time/step_s"] = time.perf_counter() - t0
            if (every_eval and session.step % every_eval == 0) or session.finished:
                values = evaluate(session, pools)
                session.record_eval(values)
                row.update(values)
                if on_eval:
                    on_eval(session.eval_rows[-1])
            session.log(row)
            if on_step:
                on_step(row)
    finally:
        pools.close()
        summary = session.close()
    return summary
