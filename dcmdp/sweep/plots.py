"""The sweep's figures: one PNG per source (reward, δ̄ against c, λ; seed means) and an overview
of the final held-out accuracy. matplotlib is imported inside the functions: it is optional
(the ``ml`` extra) and slow to import."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from dcmdp.metrics import read_metrics
from dcmdp.plots import smooth
from dcmdp.sweep.cells import applied_lambda_key, cell_dir, cell_done, numbers
from dcmdp.sweep.plan import Plan, kind_of


def _curves(folder: Path, window: int) -> dict[str, tuple[list[int], list[float]]]:
    rows = read_metrics(folder / "metrics.jsonl")
    out = {}
    for key in ("reward/mean", "discrepancy/prob_diff_mean", "constraint/tolerance", "constraint/lambda"):
        col = applied_lambda_key(rows) if key == "constraint/lambda" else key  # the pool's applied λ
        xs = [r["step"] for r in rows if isinstance(r.get(col), (int, float))]
        ys = numbers(rows, col)
        out[key] = (xs, smooth(ys, window) if key != "constraint/tolerance" else ys)
    return out


def _seed_mean(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    curves = [c for c in curves if c[0]]
    if not curves:
        return [], []
    common = sorted(set(curves[0][0]).intersection(*[set(c[0]) for c in curves[1:]]))
    maps = [dict(zip(*c)) for c in curves]
    return common, [sum(m[x] for m in maps) / len(maps) for x in common]


def _palette(plt) -> list[Any]:
    """20 colours, the 10 strong ones of tab20 first (tab20 pairs each with a paler shade)."""
    c = plt.get_cmap("tab20").colors
    return list(c[0::2]) + list(c[1::2])


def plot_sources(out: Path, p: Plan, dest: Path, dpi: int = 80) -> list[Path]:
    """One PNG per source: reward, δ̄ (solid) vs c (dashed) and λ, one line per algorithm (seed mean)."""
    # optional and slow to import (the ml extra): only plotting needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = p.sweep.spec.collapse.window
    made = []
    colors = _palette(plt)
    for src in p.sources:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
        any_line = False
        d_range: list[float] = []
        for i, algo in enumerate(p.algorithms):
            cells = [c for c in p.cells if c.source == src.name and c.algorithm == algo.name
                     and cell_done(out, c, p.steps)]
            if not cells:
                continue
            curves = [_curves(cell_dir(out, c), window) for c in cells]
            color = colors[i % len(colors)]
            label = f"{algo.label or algo.name} (n={len(cells)})"
            x, y = _seed_mean([c["reward/mean"] for c in curves])
            axes[0].plot(x, y, color=color, label=label, lw=1.3)
            x, y = _seed_mean([c["discrepancy/prob_diff_mean"] for c in curves])
            axes[1].plot(x, y, color=color, lw=1.3)
            d_range += [v for xi, v in zip(x, y) if xi >= 10 and v > 0]
            x, y = _seed_mean([c["constraint/tolerance"] for c in curves])
            if x and kind_of(p, algo).startswith("dc"):
                axes[1].plot(x, y, "--", color=color, lw=1.0)
                lx, ly = _seed_mean([c["constraint/lambda"] for c in curves])
                axes[2].plot(lx, ly, color=color, lw=1.3)
            any_line = True
        if not any_line:
            plt.close(fig)
            continue
        axes[0].set_title(f"reward ({window}-step mean, seed mean)")
        axes[1].set_title("δ̄ = mean |p_train − p_inf| (solid), c (dashed)")
        axes[1].set_yscale("log")
        if d_range:  # the first steps (no lag yet, δ̄ ~ 1e-7) would squash the interesting range
            axes[1].set_ylim(min(d_range) / 3, max(d_range) * 3)
        axes[2].set_title("λ (dc-grpo rows)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8, frameon=False)
        fig.suptitle(f"mismatch source: {src.label or src.name}")
        fig.tight_layout(rect=(0, 0, 0.78, 1))
        path = dest / f"{src.name}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        made.append(path)
    return made


def plot_overview(p: Plan, data: dict[str, Any], dest: Path, dpi: int = 80) -> Optional[Path]:
    """Final held-out accuracy (greedy and sampled) per source, one marker series per algorithm."""
    # optional and slow to import (the ml extra): only plotting needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(a["source"], a["algorithm"]): a for a in data["aggregate"] if a["seeds"]}
    if not by:
        return None
    colors = _palette(plt)
    fig, axes = plt.subplots(1, 2, figsize=(17, 4.2), sharey=True)
    xs = list(range(len(p.sources)))
    n = len(p.algorithms)
    for i, algo in enumerate(p.algorithms):
        for ax, key in zip(axes, ("greedy", "sampled")):
            pts = [(x + (i - n / 2) * 0.6 / n, by[(s.name, algo.name)]) for x, s in zip(xs, p.sources)
                   if (s.name, algo.name) in by]
            if pts:
                ax.errorbar([q[0] for q in pts], [q[1][key] for q in pts], yerr=[q[1][key + "_std"] for q in pts],
                            fmt="o", ms=4, color=colors[i % len(colors)], label=algo.label or algo.name, capsize=2)
    for ax, key in zip(axes, ("trainer greedy", "engine sampled")):
        ax.set_xticks(xs, [s.label or s.name for s in p.sources], rotation=20)
        ax.set_title(f"final held-out accuracy, {key} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.79, 1))
    path = dest / "overview.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
