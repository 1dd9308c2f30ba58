#!/usr/bin/env bash
# One-GPU check, three parts, on a built-in Qwen3 of ~121 M parameters (--size 100m):
# 1. the trainer and two HF rollout pools, bf16 and fp8 (weights rounded through float8-e4m3 with a
#    per-row scale), in one process (dcmdp's in-process runner), 5 bf16 steps under the micro-batch
#    budget: per step the step time, train time, generated tokens/s, and δ̄ of each pool against the
#    same trainer (the bf16 vs fp8-cast mismatch on this device);
# 2. a weight update as a worker loads it: the trainer's fp32 weights cast into bf16 wire buckets on
#    the device (dcmdp.transport.buckets.fill, as the broadcast does), then loaded in place into the
#    HF engine bucket by bucket (Assembler.slices → load_slices → finish_update), against a plain
#    device-to-device copy of the same bytes (median of 3 each; the loaded weights are checked);
# 3. peak memory (CUDA max allocated; peak RSS on a CPU).
# Last line one JSON object. Device generic: cuda when torch sees one, else the CPU; --device cpu
# forces the CPU (tests run it so, with --size tiny: the 100m size takes many minutes on a few cores).
# Prepared to finish in < 5 min on one H100/H200.
#
#   bash bench/gpu_check.sh [--size 100m|tiny] [--steps 5] [--micro-batch-tokens 16384] [--device auto|cpu]
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

from dcmdp.engine import make_engine  # noqa: E402
from dcmdp.models.tiny import build_model, save_model  # noqa: E402
from dcmdp.transport.buckets import Assembler, fill, plan  # noqa: E402
from dcmdp_trainer.local import run_inprocess  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--size", choices=("100m", "tiny"), default="100m")
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--micro-batch-tokens", type=int, default=16384)
ap.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: ignore a GPU (for tests)")
args = ap.parse_args()

cuda = torch.cuda.is_available() and args.device == "auto"
device = torch.device("cuda" if cuda else "cpu")
where = "cuda" if cuda else "cpu"


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


run = tiny_run(
    model={**PRESETS[args.size], "warmStart": {"steps": 0}},
    task={"name": "addition", "digits": 2, "heldOut": 16, "maxNewTokens": 8},
    algorithm={"groupSize": 8, "promptsPerStep": 32, "miniBatchSize": 8, "learningRate": 1e-5, "steps": args.steps},
    rollout={"pools": [{"name": "bf16", "precision": "bf16", "device": where},
                       {"name": "fp8", "precision": "fp8", "device": where}]},
    trainer={"precision": "bf16", "device": where, "microBatchTokens": args.micro_batch_tokens},
    eval={"everySteps": 0},
)
rows = []
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    summary = run_inprocess(run, Path(out), on_step=rows.append, threads=0 if cuda else 2)
for r in rows:
    tokens = r["response/length_mean"] * r["rollouts"]
    r["gen_tokens_per_s"] = tokens / max(r["time/sample_s"], 1e-9)
    print(json.dumps({"step": r["step"], "step_s": round(r["time/step_s"], 3), "train_s": round(r["time/train_s"], 3),
                      "gen_tokens_per_s": round(r["gen_tokens_per_s"], 1),
                      "delta_bar_bf16": r["pool/bf16/discrepancy/prob_diff_mean"],
                      "delta_bar_fp8": r["pool/fp8/discrepancy/prob_diff_mean"]}))

# -- a weight update, loaded in place into the HF engine from bf16 wire buckets on the device -------------
model, tok = build_model(run.spec.model, seed=1)
with tempfile.TemporaryDirectory() as folder:
    engine = make_engine("hf", str(save_model(model, tok, Path(folder))), "bf16", options={"device": where})
    state = {k: v.detach().to(device) + 0.01 for k, v in model.state_dict().items()}  # the trainer's new fp32 weights
    layout = plan(state, "bf16", skip=("lm_head.weight",) if model.config.tie_word_embeddings else ())
    image = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)  # the buckets as NCCL delivers them
    fills, loads, copies = [], [], []
    for _ in range(3):
        sync(); t = time.perf_counter()
        for i in range(layout.buckets):
            lo, hi = layout.span(i)
            fill(state, layout, i, image[lo:hi])
        sync(); fills.append(time.perf_counter() - t)
        asm = Assembler(layout)
        sync(); t = time.perf_counter()
        engine.begin_update()
        for i in range(layout.buckets):
            lo, hi = layout.span(i)
            engine.load_slices(asm.slices(i, image[lo:hi]))
        engine.finish_update(1)
        sync(); loads.append(time.perf_counter() - t)
        dst = torch.empty_like(image)
        sync(); t = time.perf_counter()
        dst.copy_(image)
        sync(); copies.append(time.perf_counter() - t)
        del dst
    master = engine.master.state_dict()
    load_ok = all(torch.equal(master[e.name], state[e.name].to(torch.bfloat16).float()) for e in layout.entries)
    weight_load = {"wire_mib": round(layout.total_bytes / 2**20, 1), "buckets": layout.buckets,
                   # 4 significant digits: a tiny model's copy takes microseconds (rounding to 5 decimals made it 0)
                   "fill_s": float(f"{statistics.median(fills):.4g}"), "load_s": float(f"{statistics.median(loads):.4g}"),
                   "d2d_copy_s": float(f"{statistics.median(copies):.4g}"),
                   "load_over_copy": round(statistics.median(loads) / max(statistics.median(copies), 1e-9), 2),
                   "load_gib_s": round(layout.total_bytes / 2**30 / statistics.median(loads), 2),
                   "loaded_weights_match": load_ok}
    engine.close()
print(json.dumps({"weight_load": weight_load}))

peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({
    "device": torch.cuda.get_device_name(0) if cuda else "cpu", "size": args.size,
    "parameters": summary["parameters"], "steps": len(rows), "micro_batch_tokens": args.micro_batch_tokens,
    "step_s_median": statistics.median(r["time/step_s"] for r in rows),
    "train_s_median": statistics.median(r["time/train_s"] for r in rows),
    "peak_gpu_mib" if cuda else "peak_rss_mib": round(peak, 1),
    "gen_tokens_per_s_median": statistics.median(r["gen_tokens_per_s"] for r in rows),
    "delta_bar_bf16": statistics.fmean(r["pool/bf16/discrepancy/prob_diff_mean"] for r in rows),
    "delta_bar_fp8": statistics.fmean(r["pool/fp8/discrepancy/prob_diff_mean"] for r in rows),
    "weight_load": weight_load,
    "wall_s": round(time.perf_counter() - t0, 1),
}))
PYEOF
