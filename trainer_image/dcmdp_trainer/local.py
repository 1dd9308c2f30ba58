"""The in-process rollout source and runner: the trainer and one engine per rollout pool in one
Python process (tests, sweeps, ``dcmdp run --inprocess``).

:class:`LocalPools` is the :class:`~dcmdp_trainer.rollout_source.RolloutSource` whose pools are
engines called directly: each step's prompts are split between the pools in proportion to their
replicas (``work_split.py``), each pool samples its share with the weights its ``lag`` asks for,
rounded to its wire dtype (what a worker of the pool would receive). :func:`run_inprocess` drives
it with the same :class:`~dcmdp_trainer.run_loop.RunLoop` as the gRPC trainer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from dcmdp.engine import RolloutEngine, Sample, SamplingParams, make_engine
from dcmdp.precision import wire_dtype
from dcmdp.spec import DCMDPRun
from dcmdp.transport.buckets import loopback
from dcmdp_trainer.rollout_source import Batch
from dcmdp_trainer.run_loop import Callback, RunLoop
from dcmdp_trainer.session import Session, StepPrompt
from dcmdp_trainer.submission import require_plausible
from dcmdp_trainer.work_split import split_prompts


class LocalPools:
    """One engine per pool with replicas, kept at the weight version the pool's lag asks for."""

    def __init__(self, session: Session, options: Optional[dict[str, Any]] = None):
        self.session = session
        self.pools = [p for p in session.spec.rollout.pools if p.replicas > 0]
        self.engines: dict[str, RolloutEngine] = {}
        self.loaded: dict[str, int] = {}
        self._eval: list[StepPrompt] = []
        self.adaptive_lag = 0  # adaptive staleness: the lag every pool samples at (at least its own lag)
        for pool in self.pools:
            opts = (dict(options or {}, device=pool.device, quant_group_size=pool.quant_group_size)
                    if pool.engine == "hf" else options)
            self.engines[pool.name] = make_engine(pool.engine, str(session.model_dir), pool.precision,
                                                  noise=pool.noise, seed=session.spec.algorithm.seed, options=opts)

    def sync(self, pool: str, lag: int) -> int:
        """Load the version ``pool`` samples with (``lag`` behind) into its engine; returns it."""
        version = self.session.version_for(lag)
        if self.loaded.get(pool) != version:
            spec = next(p for p in self.pools if p.name == pool)
            # what a worker of the pool receives: the weights rounded to its wire dtype
            state = loopback(self.session.weights(version), wire_dtype(spec.precision))
            self.engines[pool].load_weights(state, version)
            self.loaded[pool] = version
        return version

    def _generate(self, pool, prompts: list[StepPrompt], n: int, step: int,
                  temperature: Optional[float] = None) -> list[Sample]:
        s = self.session
        return self.engines[pool.name].generate(
            [p.ids for p in prompts], [p.index for p in prompts],
            SamplingParams(n=n, max_new_tokens=s.task.max_new_tokens,
                           temperature=s.spec.algorithm.temperature if temperature is None else temperature,
                           seed=s.sampling_seed(step, pool.name)))

    # -- RolloutSource ---------------------------------------------------------------------------
    def start(self) -> None:
        pass

    def collect(self, step: int) -> Batch:
        s = self.session
        shares = split_prompts(s.prompts(step), {p.name: p.replicas for p in self.pools})
        rollouts, t_sample = [], 0.0
        for pool in self.pools:
            mine = shares.get(pool.name)
            if not mine:
                continue
            version = self.sync(pool.name, max(pool.lag, self.adaptive_lag))
            ts = time.perf_counter()
            # an in-process engine has no one to retry: an implausible sample stops the run
            samples = require_plausible(self._generate(pool, mine, s.spec.algorithm.group_size, step), pool.name,
                                        vocab_size=s.vocab_size, max_new_tokens=s.task.max_new_tokens)
            t_sample += time.perf_counter() - ts
            rollouts += s.rollouts(samples, {p.index: p for p in mine}, pool.name, version)
        return Batch(rollouts, {"time/sample_s": t_sample})

    def published(self) -> None:
        pass  # each engine loads the version it needs when it next samples

    def set_max_staleness(self, lag: int) -> None:
        self.adaptive_lag = lag  # in-process staleness is forced: the pools sample that far behind

    def request_eval(self, prompts: list[StepPrompt]) -> None:
        self._eval = prompts

    def eval_samples(self) -> dict[str, list[Sample]]:
        out = {}
        for pool in self.pools:
            self.sync(pool.name, pool.lag)
            out[pool.name] = self._generate(pool, self._eval, 1, -1)
        return out

    def eval_greedy_samples(self) -> dict[str, list[Sample]]:
        out = {}
        for pool in self.pools:
            self.sync(pool.name, pool.lag)
            out[pool.name] = self._generate(pool, self._eval, 1, -1, temperature=0.0)
        return out

    def finish(self) -> None:
        pass

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


def run_inprocess(run: DCMDPRun, out_dir: Path, *, steps: Optional[int] = None, resume: bool = False,
                  on_step: Optional[Callback] = None, on_eval: Optional[Callback] = None,
                  threads: int = 0) -> dict[str, Any]:
    """Run ``run`` in this process to its last step (or ``steps``), writing to ``out_dir``;
    returns the run's summary (summary.json)."""
    session = Session(run, Path(out_dir), resume=resume, steps=steps, threads=threads, serve_lags=True)
    pools = LocalPools(session)
    try:
        RunLoop(session, pools, on_step=on_step, on_eval=on_eval).run()
    finally:
        pools.close()
        summary = session.close()
    return summary
