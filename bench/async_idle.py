"""Trainer idle fraction with two rollout workers: strictly on-policy (maxStaleness 0) vs one
version of staleness allowed (maxStaleness 1), side by side in one run.

Each run is the real multi-process runtime (``dcmdp run``'s launcher: one trainer process, two
worker processes of one bf16 pool, gRPC on loopback). The trainer's idle time is the time it waits
for the step's rollouts (``time/wait_s`` in metrics.jsonl); the idle fraction is Σ wait / Σ step
time over the steps after the first two (start-up excluded). With maxStaleness 1 the workers
sample step s+1 while the trainer trains step s, so the trainer should wait less.

    .venv/bin/python bench/async_idle.py [--steps 20] [--threads 1]

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


def manifest(staleness: int, steps: int):
    from runtime_helpers import tiny_run

    return tiny_run(
        model={"hiddenSize": 128, "intermediateSize": 256, "numLayers": 4, "numHeads": 4, "numKvHeads": 2,
               "warmStart": {"steps": 30, "batchSize": 128}},
        algorithm={"steps": steps, "maxStaleness": staleness, "groupSize": 8, "promptsPerStep": 16,
                   "miniBatchSize": 8},
        rollout={"batchPrompts": 4, "leaseTimeoutSeconds": 60,
                 "pools": [{"name": "bf16", "engine": "hf", "precision": "bf16", "replicas": 2}]},
        eval={"everySteps": 0},
    )


def measure(staleness: int, steps: int, threads: int, folder: Path) -> dict:
    from dcmdp_trainer.launcher import run_processes
    from runtime_helpers import rows

    out = folder / f"staleness-{staleness}"
    run_processes(manifest(staleness, steps), out, threads=threads)
    r = [row for row in rows(out / "metrics.jsonl") if row["step"] >= 2]
    wait = sum(row["time/wait_s"] for row in r)
    step = sum(row["time/step_s"] for row in r)
    train = sum(row["time/train_s"] for row in r)
    return {"idle_fraction": round(wait / step, 4), "step_s": round(step / len(r), 4),
            "train_s": round(train / len(r), 4), "wait_s": round(wait / len(r), 4),
            "lag_mean": round(sum(row["version/lag_mean"] for row in r) / len(r), 3),
            "dropped_stale": sum(row["rollouts/dropped_stale"] for row in r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dcmdp-async-"))
    s0 = measure(0, args.steps, args.threads, folder)
    s1 = measure(1, args.steps, args.threads, folder)
    for name, r in (("maxStaleness 0", s0), ("maxStaleness 1", s1)):
        print(f"{name}: idle {r['idle_fraction']:.1%}, step {r['step_s'] * 1000:.0f} ms "
              f"(train {r['train_s'] * 1000:.0f} ms, wait {r['wait_s'] * 1000:.0f} ms), lag {r['lag_mean']}",
              file=sys.stderr)
    print(json.dumps({"staleness_0": s0, "staleness_1": s1,
                      "idle_ratio_1_over_0": round(s1["idle_fraction"] / max(s0["idle_fraction"], 1e-9), 3),
                      "step_time_ratio_1_over_0": round(s1["step_s"] / s0["step_s"], 3)}))


if __name__ == "__main__":
    main()
