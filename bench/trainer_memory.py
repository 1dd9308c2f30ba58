"""Peak trainer memory: flat in rollouts per step (micro-batch budget) and in staleness × pools.

Each configuration runs in its own process: the real trainer ``Session`` (model, learner, weight
history) and the real ``WeightPublisher`` set up as ``python -m dcmdp_trainer`` sets it up
(``keep = max lag + 1``, the pools' lag windows, versions pinned by leases), on a built-in Qwen3
model of ``--preset`` size. Every step trains on synthetic rollouts (prompts of 6–10 tokens,
responses of 4–8, random log-probs and rewards, versions up to maxStaleness behind), publishes the
new version, and streams it once per pool in the pool's wire dtype, as each pool's workers fetch
it. Pins: at every publish each pool's workers may still fetch the previous version (what the
runtime always pins: the coordinator's current version while the new one is published, as a
lease issued just before may name it), so the previous version stays in memory until the next. The process's peak RSS (``ru_maxrss``) is its figure; on a
GPU (``--device cuda``) torch's max allocated CUDA memory is reported beside it.

    base:      64 rollouts/step, maxStaleness 0, 1 pool (bf16), 5 steps
    rollouts:  512 rollouts/step, same micro-batch budget, 1 step (4 mini-batch updates: Adam state included)
    staleness: 64 rollouts/step, maxStaleness 4, 3 pools (bf16, fp16, fp32), 5 steps

Goals: rollouts / base ≤ 1.3 and staleness / base ≤ 1.3. The RSS includes the Python/torch
runtime (reported alone as ``runtime_mib``: the process after importing torch and transformers).

    .venv/bin/python bench/trainer_memory.py [--preset 50m] [--micro-batch-tokens 256] [--threads 2]

The budget must bind in the base configuration too (its mini-batches are 16 rollouts of ~16
tokens): with a budget above the base's mini-batch, base runs smaller micro-batches than the
512-rollout case and the ratio measures the budget, not the growth.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# built-in Qwen3 sizes (spec.model overrides); parameters with the built-in 84-token vocabulary
PRESETS = {
    "tiny": {"hiddenSize": 64, "intermediateSize": 128, "numLayers": 2, "numHeads": 2, "numKvHeads": 1, "headDim": 32},
    "50m": {"hiddenSize": 640, "intermediateSize": 2560, "numLayers": 9, "numHeads": 10, "numKvHeads": 5,
            "headDim": 64},
    "100m": {"hiddenSize": 768, "intermediateSize": 3072, "numLayers": 14, "numHeads": 12, "numKvHeads": 4,
             "headDim": 64},
}
WIRE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
CASES = {
    "base": {"rollouts": 64, "staleness": 0, "pools": ["bf16"], "steps": 5},
    "rollouts": {"rollouts": 512, "staleness": 0, "pools": ["bf16"], "steps": 1},
    "staleness": {"rollouts": 64, "staleness": 4, "pools": ["bf16", "fp16", "fp32"], "steps": 5},
}
GROUP = 8


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers  # noqa: F401  (part of the runtime baseline)

    runtime = rss_mib()
    sys.path.insert(0, str(ROOT / "tests"))
    from runs import tiny_run

    from dcmdp.engine import Rollout
    from dcmdp.models.tiny import num_parameters
    from dcmdp_trainer.history import pool_lags
    from dcmdp_trainer.session import Session
    from dcmdp_trainer.weights import WeightPublisher

    case = CASES[args.case]
    prompts = case["rollouts"] // GROUP
    run = tiny_run(
        model={**PRESETS[args.preset], "warmStart": {"steps": 0}},
        algorithm={"groupSize": GROUP, "promptsPerStep": prompts, "miniBatchSize": max(1, prompts // 4),
                   "maxStaleness": case["staleness"], "learningRate": 1e-5, "steps": case["steps"]},
        rollout={"pools": [{"name": p, "precision": p} for p in case["pools"]]},
        trainer={"microBatchTokens": args.micro_batch_tokens, "device": args.device},
    )
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        s = Session(run, Path(tmp), threads=args.threads)
        tied = bool(getattr(s.model.config, "tie_word_embeddings", False))
        dtypes = [WIRE[p] for p in case["pools"]]
        pub = WeightPublisher(keep=s.max_lag + 1, skip=("lm_head.weight",) if tied else (), dtypes=sorted(set(dtypes)),
                              lags=pool_lags(run.spec.rollout.pools), held_elsewhere=lambda v: v in s.history)
        pub.publish(s.version, s.weights(s.version))
        pub.pinned = lambda: {(s.version - 1, d) for d in dtypes}  # published: s.version; still named: the one before
        vocab = len(s.tokenizer)
        t0 = time.perf_counter()
        for _ in range(case["steps"]):
            rollouts = []
            for i in range(case["rollouts"]):
                p = i // GROUP
                prompt = [rng.randrange(3, vocab) for _ in range(6 + p % 5)]
                k = rng.randint(4, 8)
                rollouts.append(Rollout(p, prompt, [rng.randrange(3, vocab) for _ in range(k)],
                                        [-3 * rng.random() for _ in range(k)], float(rng.random() < 0.5),
                                        case["pools"][p % len(case["pools"])],
                                        max(0, s.version - rng.randint(0, case["staleness"]))))
            s.train_step(rollouts)
            pub.publish(s.version, s.weights(s.version))
            for pool in case["pools"]:  # each pool's workers fetch the new version in its wire dtype
                for _ in pub.chunks(s.version, WIRE[pool]):
                    pass
        out = {"case": args.case, "peak_rss_mib": rss_mib(), "runtime_mib": runtime,
               "kept_forms": {str(v): list(f) for v, f in pub.kept_forms().items()},
               "parameters": num_parameters(s.model), "step_s": (time.perf_counter() - t0) / case["steps"], **case}
        if s.learner.device.type == "cuda":
            out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        s.metrics.close()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="50m")
    ap.add_argument("--micro-batch-tokens", type=int, default=256)  # binds in base too (16 rows × ~16 tokens)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one configuration (child)
    args = ap.parse_args()
    if args.case:
        return child(args)
    rows = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--preset", args.preset, "--threads", str(args.threads),
               "--micro-batch-tokens", str(args.micro_batch_tokens), "--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            sys.exit(f"{case} failed:\n{res.stderr[-3000:]}")
        rows[case] = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[case]), flush=True)
    base = rows["base"]["peak_rss_mib"]
    print(json.dumps({
        "preset": args.preset, "parameters": rows["base"]["parameters"],
        "micro_batch_tokens": args.micro_batch_tokens, "runtime_mib": round(rows["base"]["runtime_mib"], 1),
        "peak_rss_mib": {k: round(v["peak_rss_mib"], 1) for k, v in rows.items()},
        "rss_ratio_rollouts_8x": round(rows["rollouts"]["peak_rss_mib"] / base, 3),
        "rss_ratio_staleness_pools": round(rows["staleness"]["peak_rss_mib"] / base, 3),
        "goal": 1.3,
    }))


if __name__ == "__main__":
    main()
