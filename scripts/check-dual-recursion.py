#!/usr/bin/env python3
"""Check a run's metrics.jsonl against the dual update, from the file's own values:

    λ_{k+1} = clip(λ_k + lambdaLR · (δ̄_k − c_k), lambdaMin, lambdaMax)

for the run-level keys and every pool's keys. Usage: check-dual-recursion.py RUN_DIR
(RUN_DIR holds metrics.jsonl and run.json, the resolved manifest). Exit 1 on a mismatch.
"""

import json
import sys
from pathlib import Path


def main(run_dir: str) -> int:
    folder = Path(run_dir)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    c = json.loads((folder / "run.json").read_text())["spec"]["algorithm"]["constraint"]
    prefixes = [""] + sorted({k[: k.index("/constraint/lambda") + 1] for k in rows[0]
                              if k.startswith("pool/") and k.endswith("/constraint/lambda")})
    worst, checked = 0.0, 0
    for prefix in prefixes:
        lam = prefix + "constraint/lambda" if prefix else "constraint/run_lambda"
        for prev, nxt in zip(rows, rows[1:]):
            tol = prev.get(prefix + "constraint/tolerance")
            if tol is None:
                continue  # `tolerance: auto` still calibrating
            want = min(max(prev[lam] + c["lambdaLR"] * (prev[prefix + "discrepancy/prob_diff_mean"] - tol),
                           c["lambdaMin"]), c["lambdaMax"])
            err = abs(nxt[lam] - want)
            worst = max(worst, err)
            checked += 1
            if err > 1e-12:
                print(f"MISMATCH {prefix or 'run'} step {nxt['step']}: {nxt[lam]} != {want}")
    print(f"{len(rows)} steps, {checked} transitions over {[p or 'run' for p in prefixes]}: max |error| {worst:.1e}")
    return 0 if worst <= 1e-12 and checked else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
