"""PNG plots of a run from its metrics.jsonl: reward, δ̄ against c, and λ (overall and per pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dcmdp.metrics import read_metrics


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def smooth(ys: list[float], k: int = 10) -> list[float]:
    """Trailing moving average over k points (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def pools_of(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows[:5]:
        for k in r:
            if k.startswith("pool/"):
                seen.setdefault(k.split("/")[1], None)
    return list(seen)


def plot_run(out_dir: Path) -> list[Path]:
    # optional and slow to import (the ml extra): only plotting needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir / "metrics.jsonl")
    if not rows:
        return []
    pools = pools_of(rows)
    made = []

    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = _series(rows, "reward/mean")
    ax.plot(xs, ys, alpha=0.3, color="C0")
    ax.plot(xs, smooth(ys), color="C0", label="reward (10-step mean)")
    for key, style in (("eval/accuracy_greedy", "o-"), ("eval/accuracy_sampled", "s--")):
        ex, ey = _series(rows, key)
        if ex:
            ax.plot(ex, ey, style, label=key.split("/")[1])
    ax.set_xlabel("step"); ax.set_ylabel("reward / accuracy"); ax.legend(); ax.grid(alpha=0.3)
    made.append(_save(fig, out_dir / "reward.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    # per pool: each pool's δ̄, c and applied λ (the run-level figures apply to no token with 2+ pools)
    groups = [(p, f"pool/{p}/") for p in pools] or [("all", "")]
    for i, (label, prefix) in enumerate(groups):
        xs, ys = _series(rows, prefix + "discrepancy/prob_diff_mean")
        ax.plot(xs, smooth(ys), color=f"C{i}", label=f"δ̄ {label}")
        cx, cy = _series(rows, prefix + "constraint/tolerance")
        if cx:
            ax.plot(cx, cy, "--", color=f"C{i}", label=f"c {label}")
    ax.set_xlabel("step"); ax.set_ylabel("mean |p_train − p_inf|"); ax.legend(); ax.grid(alpha=0.3)
    made.append(_save(fig, out_dir / "discrepancy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, prefix) in enumerate(groups):
        xs, ys = _series(rows, prefix + "constraint/lambda" if prefix else "constraint/run_lambda")
        ax.plot(xs, ys, color=f"C{i}", label=f"λ {label}")
    ax.set_xlabel("step"); ax.set_ylabel("λ"); ax.legend(); ax.grid(alpha=0.3)
    made.append(_save(fig, out_dir / "lambda.png"))
    return made


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    # optional and slow to import (the ml extra): only plotting needs it
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
