#!/usr/bin/env bash
# One-GPU check: the trainer and an HF rollout pool (in one process, dcmdp's in-process runner) on a
# built-in Qwen3 of ~121 M parameters (--size 100m), 5 bf16 steps under the micro-batch budget.
# Prints per step: step time, train time, peak GPU memory (CUDA max allocated; peak RSS on a CPU),
# generated tokens/s of the pool, δ̄; last line one JSON object with the medians. Device generic:
# cuda when torch sees one (device: auto), else the CPU (then use --size tiny: the 100m size
# takes many minutes on a few cores). Prepared to finish in < 5 min on one H100/H200.
#
#   bash bench/gpu_check.sh [--size 100m|tiny] [--steps 5] [--micro-batch-tokens 16384]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" - "$@" <<'PYEOF'
import argparse, json, resource, statistics, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, "tests")
sys.path.insert(0, "bench")
from runs import tiny_run  # noqa: E402
from trainer_memory import PRESETS  # noqa: E402

from dcmdp.models.tiny import num_parameters  # noqa: E402
from dcmdp_trainer.local import run_inprocess  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--size", choices=("100m", "tiny"), default="100m")
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--micro-batch-tokens", type=int, default=16384)
args = ap.parse_args()

run = tiny_run(
    model={**PRESETS[args.size], "warmStart": {"steps": 0}},
    task={"name": "addition", "digits": 2, "heldOut": 16, "maxNewTokens": 8},
    algorithm={"groupSize": 8, "promptsPerStep": 32, "miniBatchSize": 8, "learningRate": 1e-5, "steps": args.steps},
    rollout={"pools": [{"name": "bf16", "precision": "bf16", "device": "auto"}]},
    trainer={"precision": "bf16", "device": "auto", "microBatchTokens": args.micro_batch_tokens},
    eval={"everySteps": 0},
)
cuda = torch.cuda.is_available()
rows = []
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    summary = run_inprocess(run, Path(out), on_step=rows.append, threads=0 if cuda else 2)
for r in rows:
    tokens = r["response/length_mean"] * r["rollouts"]
    r["gen_tokens_per_s"] = tokens / max(r["time/sample_s"], 1e-9)
    print(json.dumps({"step": r["step"], "step_s": round(r["time/step_s"], 3), "train_s": round(r["time/train_s"], 3),
                      "gen_tokens_per_s": round(r["gen_tokens_per_s"], 1),
                      "delta_bar": r["discrepancy/prob_diff_mean"]}))
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({
    "device": torch.cuda.get_device_name(0) if cuda else "cpu", "size": args.size,
    "parameters": summary["parameters"], "steps": len(rows), "micro_batch_tokens": args.micro_batch_tokens,
    "step_s_median": statistics.median(r["time/step_s"] for r in rows),
    "train_s_median": statistics.median(r["time/train_s"] for r in rows),
    "peak_gpu_mib" if cuda else "peak_rss_mib": round(peak, 1),
    "gen_tokens_per_s_median": statistics.median(r["gen_tokens_per_s"] for r in rows),
    "delta_bar_mean": statistics.fmean(r["discrepancy/prob_diff_mean"] for r in rows),
    "wall_s": round(time.perf_counter() - t0, 1),
}))
PYEOF
