"""DC-GRPO step time / GRPO step time on the same batch, side by side in one process.

Two learners on identical model copies take turns on the same 256-rollout batch (interleaved, so
machine noise hits both alike); the headline is the median of the paired (same-repetition) step-time ratios. Goal: ≤ 1.02.

    python bench/dcgrpo_overhead.py [--reps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from dcmdp.engine import SamplingParams
from dcmdp.models.tiny import build_model, save_model
from dcmdp.spec import parse_run
from dcmdp_rollout.engines.hf import HFEngine
from dcmdp_trainer.learner import Learner
from dcmdp_trainer.session import quiet_transformers, stable_seed
from dcmdp_trainer.warmstart import prompt_ids


def manifest(name: str, mode: str = "penalty") -> dict:
    return {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "bench"},
            "spec": {"model": {"warmStart": {"steps": 0}},
                     "algorithm": {"name": name, "groupSize": 8, "promptsPerStep": 32, "miniBatchSize": 16,
                                   "learningRate": 1e-5, "constraint": {"mode": mode, "tolerance": 0.001}},
                     "rollout": {"pools": [{"name": "bf16", "precision": "bf16"}]}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    import tempfile
    from pathlib import Path

    from dcmdp.engine import Rollout

    base = parse_run(manifest("grpo"))
    model, tok = build_model(base.spec.model, seed=0)
    folder = save_model(model, tok, Path(tempfile.mkdtemp()) / "model")
    engine = HFEngine(str(folder), precision="bf16")
    prompts = [prompt_ids(tok, f"{i:02d}+{(7 * i) % 100:02d}=") for i in range(32)]
    samples = engine.generate(prompts, list(range(32)), SamplingParams(n=8, max_new_tokens=4, seed=stable_seed(0)))
    rollouts = [Rollout(s.prompt_index, prompts[s.prompt_index], s.response_ids, s.logprobs, float(k % 3 == 0), "bf16", 0)
                for k, s in enumerate(samples)]

    learners = {
        "grpo": Learner(base, copy.deepcopy(model), tok.pad_token_id),
        "dc-grpo": Learner(parse_run(manifest("dc-grpo")), copy.deepcopy(model), tok.pad_token_id),
        "dc-grpo-shaping": Learner(parse_run(manifest("dc-grpo", "advantage-shaping")), copy.deepcopy(model), tok.pad_token_id),
    }
    times: dict[str, list[float]] = {k: [] for k in learners}
    for rep in range(args.reps + 3):
        order = list(learners) if rep % 2 == 0 else list(reversed(learners))
        for name in order:
            t0 = time.perf_counter()
            learners[name].train_step(rollouts)
            if rep >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:16s} median step {v * 1000:7.1f} ms  (n={len(times[k])}, 256 rollouts)")
    # paired ratios (the two ran back to back in the same repetition) are less noisy than a ratio of medians
    paired = statistics.median(d / g for d, g in zip(times["dc-grpo"], times["grpo"]))
    paired_shaping = statistics.median(d / g for d, g in zip(times["dc-grpo-shaping"], times["grpo"]))
    print(json.dumps({"ratio": round(paired, 4), "ratio_shaping": round(paired_shaping, 4),
                      "grpo_ms": round(med["grpo"] * 1000, 2), "dcgrpo_ms": round(med["dc-grpo"] * 1000, 2),
                      "reps": args.reps, "threads": args.threads}))


if __name__ == "__main__":
    main()
