"""A cell's folder (``cells/SOURCE/ALGORITHM/seedN``, ``cell.json`` when finished) and the numbers
read from it.

Per cell (from its ``metrics.jsonl`` and ``eval.jsonl``):

* ``greedy`` / ``sampled`` / ``engine_greedy``: the final held-out accuracy, greedy from the
  trainer's weights, sampled and greedy from the rollout engine as deployed (its precision, noise
  and lag; ``engine_greedy`` is None for cells run before it was recorded);
* ``steps_per_min``: trainer throughput, 60 / mean ``time/step_s``; ``lag_mean``: the mean
  weight-version lag of the trained rollouts (``version/lag_mean``, where the runner logs it);
* ``collapsed``: the reward's moving average (``collapse.window`` steps) falls below
  ``collapse.fraction`` × its peak at some step after that peak;
* ``delta_mean`` (δ̄ over all steps), ``delta_first`` / ``delta_last`` (first / last 10 steps),
  ``tolerance`` (final c), ``lambda_mean`` / ``lambda_last``, ``reward_peak`` / ``reward_last``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dcmdp.metrics import read_metrics
from dcmdp.plots import smooth
from dcmdp.sweep.plan import Cell

def warm_start_dir(out: Path, seed: int) -> Path:
    return out / "warmstart" / f"seed{seed}"


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.source / cell.algorithm / f"seed{cell.seed}"


def cell_done(out: Path, cell: Cell, steps: int) -> bool:
    f = cell_dir(out, cell) / "cell.json"
    if not f.exists():
        return False
    try:
        return json.loads(f.read_text()).get("steps") == steps
    except ValueError:
        return False


def mean_delta(out: Path, cell: Cell) -> float:
    rows = read_metrics(cell_dir(out, cell) / "metrics.jsonl")
    vals = numbers(rows, "discrepancy/prob_diff_mean")
    return sum(vals) / len(vals) if vals else float("nan")


def applied_lambda_key(rows: list[dict[str, Any]]) -> str:
    """The metric key of the λ applied in a cell: its one pool's (a sweep varies one pool)."""
    pools = sorted({k for r in rows[:1] for k in r if k.startswith("pool/") and k.endswith("/constraint/lambda")})
    return pools[0] if pools else "constraint/run_lambda"


def collapsed(rewards: list[float], window: int = 10, fraction: float = 0.5) -> bool:
    """True when the smoothed reward falls below ``fraction`` × its peak after reaching the peak."""
    if not rewards:
        return False
    s = smooth(rewards, window)
    peak_at = max(range(len(s)), key=s.__getitem__)
    peak = s[peak_at]
    return peak > 0 and min(s[peak_at:]) < fraction * peak


def numbers(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def cell_metrics(folder: Path, collapse: Any = None) -> dict[str, Any]:
    """The summary numbers of one finished cell (see the module docstring)."""
    window = getattr(collapse, "window", 10)
    fraction = getattr(collapse, "fraction", 0.5)
    rows = read_metrics(folder / "metrics.jsonl")
    evals = read_metrics(folder / "eval.jsonl") if (folder / "eval.jsonl").exists() else []
    rewards = numbers(rows, "reward/mean")
    deltas = numbers(rows, "discrepancy/prob_diff_mean")
    lams = numbers(rows, applied_lambda_key(rows))
    tols = numbers(rows, "constraint/tolerance")
    s = smooth(rewards, window) if rewards else []
    step_s = _mean(numbers(rows, "time/step_s"))
    first, last = (evals[0] if evals else {}), (evals[-1] if evals else {})
    return {
        "greedy": last.get("eval/accuracy_greedy"),
        "sampled": last.get("eval/accuracy_sampled"),
        "greedy_start": first.get("eval/accuracy_greedy"),
        "sampled_start": first.get("eval/accuracy_sampled"),
        "engine_greedy": last.get("eval/accuracy_engine_greedy"),
        "engine_greedy_start": first.get("eval/accuracy_engine_greedy"),
        "collapsed": collapsed(rewards, window, fraction),
        "reward_peak": max(s) if s else None,
        "reward_last": s[-1] if s else None,
        "delta_mean": _mean(deltas),
        "delta_first": _mean(deltas[:10]),
        "delta_last": _mean(deltas[-10:]),
        "tolerance": tols[-1] if tols else None,
        "lambda_mean": _mean(lams),
        "lambda_last": lams[-1] if lams else None,
        "clip_frac": _mean(numbers(rows, "optim/clip_frac")),
        "masked_frac": _mean(numbers(rows, "correction/masked_frac")),
        "step_s": step_s,
        "steps_per_min": 60.0 / step_s if step_s else None,
        "lag_mean": _mean(numbers(rows, "version/lag_mean")),
    }
