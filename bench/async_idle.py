"""Trainer idle fraction with two rollout workers: strictly on-policy (maxStaleness 0) vs one
version of staleness allowed (maxStaleness 1), side by side in one run; with ``--lags`` and
``--adaptive``, the trainer's throughput (steps/min) at each fixed lag and under adaptive staleness.

Each run is the real multi-process runtime (``dcmdp run``'s launcher: one trainer process, two
worker processes of one bf16 pool, gRPC on loopback). The trainer's idle time is the time it waits
for the step's rollouts (``time/wait_s`` in metrics.jsonl); the idle fraction is Σ wait / Σ step
time over the steps after the first two (start-up excluded). With maxStaleness 1 the workers
sample step s+1 while the trainer trains step s, so the trainer should wait less.

    .venv/bin/python bench/async_idle.py [--steps 20] [--threads 1]
    .venv/bin/python bench/async_idle.py --lags 0 1 2 3 --adaptive 3   # issue 16's throughput figures

Adaptive staleness (``algorithm.adaptiveStaleness: true``, ``maxStaleness: K``) lets the pools
sample up to lag = ⌊K·(1 − λ/λmax) + ½⌋ behind, λ the largest pool multiplier (DC-GRPO, tolerance
0.004, λ0 0.1, λmax 1.0 here). Throughput = steps per minute over the steps after the first two.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def manifest(staleness: int, steps: int, adaptive: bool = False):
    from runtime_helpers import tiny_run

    return tiny_run(
        model={"hiddenSize": 128, "intermediateSize": 256, "numLayers": 4, "numHeads": 4, "numKvHeads": 2,
               "warmStart": {"steps": 30, "batchSize": 128}},
        algorithm={"steps": steps, "maxStaleness": staleness, "groupSize": 8, "promptsPerStep": 16,
                   "miniBatchSize": 8, "adaptiveStaleness": adaptive,
                   "constraint": {"tolerance": 0.004, "lambdaInit": 0.1, "lambdaLR": 1.0, "lambdaMax": 1.0}},
        rollout={"batchPrompts": 4, "leaseTimeoutSeconds": 60,
                 "pools": [{"name": "bf16", "engine": "hf", "precision": "bf16", "replicas": 2}]},
        eval={"everySteps": 0},
    )


def measure(staleness: int, steps: int, threads: int, folder: Path, adaptive: bool = False) -> dict:
    from dcmdp_trainer.launcher import run_processes
    from runtime_helpers import rows

    out = folder / f"staleness-{staleness}{'-adaptive' if adaptive else ''}"
    run_processes(manifest(staleness, steps, adaptive), out, threads=threads)
    r = [row for row in rows(out / "metrics.jsonl") if row["step"] >= 2]
    wait = sum(row["time/wait_s"] for row in r)
    step = sum(row["time/step_s"] for row in r)
    train = sum(row["time/train_s"] for row in r)
    lams = [max(v for k, v in row.items() if k.endswith("/constraint/lambda") and isinstance(v, (int, float)))
            for row in r]
    return {"idle_fraction": round(wait / step, 4), "step_s": round(step / len(r), 4),
            "steps_per_min": round(60 * len(r) / step, 2), "lambda_max_mean": round(sum(lams) / len(lams), 3),
            "train_s": round(train / len(r), 4), "wait_s": round(wait / len(r), 4),
            "lag_mean": round(sum(row["version/lag_mean"] for row in r) / len(r), 3),
            "dropped_stale": sum(row["rollouts/dropped_stale"] for row in r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--lags", type=int, nargs="+", default=[0, 1], help="fixed maxStaleness values (0 and 1 needed)")
    ap.add_argument("--adaptive", type=int, default=None, metavar="K",
                    help="also run adaptiveStaleness with maxStaleness K")
    args = ap.parse_args()
    if not {0, 1} <= set(args.lags):
        ap.error("--lags must include 0 and 1 (the idle-fraction headline)")
    folder = Path(tempfile.mkdtemp(prefix="dcmdp-async-"))
    runs = {f"staleness_{k}": measure(k, args.steps, args.threads, folder) for k in args.lags}
    if args.adaptive is not None:
        runs["adaptive"] = measure(args.adaptive, args.steps, args.threads, folder, adaptive=True)
    for name, r in runs.items():
        print(f"{name}: idle {r['idle_fraction']:.1%}, step {r['step_s'] * 1000:.0f} ms "
              f"(train {r['train_s'] * 1000:.0f} ms, wait {r['wait_s'] * 1000:.0f} ms), {r['steps_per_min']} steps/min, "
              f"lag {r['lag_mean']}, max λ {r['lambda_max_mean']}", file=sys.stderr)
    s0, s1 = runs["staleness_0"], runs["staleness_1"]
    result = {**runs, "idle_ratio_1_over_0": round(s1["idle_fraction"] / max(s0["idle_fraction"], 1e-9), 3),
              "step_time_ratio_1_over_0": round(s1["step_s"] / s0["step_s"], 3)}
    if "adaptive" in runs:
        result["adaptive_throughput_over_lag0"] = round(runs["adaptive"]["steps_per_min"] / s0["steps_per_min"], 3)
        best = max((v for k, v in runs.items() if k != "adaptive"), key=lambda r: r["steps_per_min"])
        result["adaptive_throughput_over_best_fixed"] = round(runs["adaptive"]["steps_per_min"] / best["steps_per_min"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
