"""Aggregation of a sweep: per-cell metrics, mean ± std over seeds, the table, the PNGs, the doc.

Per cell (from its ``metrics.jsonl`` and ``eval.jsonl``):

* ``greedy`` / ``sampled``: the final held-out accuracy, greedy from the trainer's weights and
  sampled from the rollout engine as deployed (its precision, noise and lag);
* ``collapsed``: the reward's moving average (``collapse.window`` steps) falls below
  ``collapse.fraction`` × its peak at some step after that peak;
* ``delta_mean`` (δ̄ over all steps), ``delta_first`` / ``delta_last`` (first / last 10 steps),
  ``tolerance`` (final c), ``lambda_mean`` / ``lambda_last``, ``reward_peak`` / ``reward_last``.

Per (source, algorithm): mean ± sample std over seeds and the collapse count. The markdown table is
shaped like Table 2 of the DCMDP paper: rows are algorithms, columns mismatch sources.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any, Optional

from dcmdp.metrics import read_metrics
from dcmdp.plots import smooth


def collapsed(rewards: list[float], window: int = 10, fraction: float = 0.5) -> bool:
    """True when the smoothed reward falls below ``fraction`` × its peak after reaching the peak."""
    if not rewards:
        return False
    s = smooth(rewards, window)
    peak_at = max(range(len(s)), key=s.__getitem__)
    peak = s[peak_at]
    return peak > 0 and min(s[peak_at:]) < fraction * peak


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def cell_metrics(folder: Path, collapse: Any = None) -> dict[str, Any]:
    """The summary numbers of one finished cell (see the module docstring)."""
    window = getattr(collapse, "window", 10)
    fraction = getattr(collapse, "fraction", 0.5)
    rows = read_metrics(folder / "metrics.jsonl")
    evals = read_metrics(folder / "eval.jsonl") if (folder / "eval.jsonl").exists() else []
    rewards = _values(rows, "reward/mean")
    deltas = _values(rows, "discrepancy/prob_diff_mean")
    lams = _values(rows, "constraint/lambda")
    tols = _values(rows, "constraint/tolerance")
    s = smooth(rewards, window) if rewards else []
    first, last = (evals[0] if evals else {}), (evals[-1] if evals else {})
    return {
        "greedy": last.get("eval/accuracy_greedy"),
        "sampled": last.get("eval/accuracy_sampled"),
        "greedy_start": first.get("eval/accuracy_greedy"),
        "sampled_start": first.get("eval/accuracy_sampled"),
        "collapsed": collapsed(rewards, window, fraction),
        "reward_peak": max(s) if s else None,
        "reward_last": s[-1] if s else None,
        "delta_mean": _mean(deltas),
        "delta_first": _mean(deltas[:10]),
        "delta_last": _mean(deltas[-10:]),
        "tolerance": tols[-1] if tols else None,
        "lambda_mean": _mean(lams),
        "lambda_last": lams[-1] if lams else None,
        "clip_frac": _mean(_values(rows, "optim/clip_frac")),
        "masked_frac": _mean(_values(rows, "correction/masked_frac")),
        "step_s": _mean(_values(rows, "time/step_s")),
    }


def mean_std(xs: list[float]) -> tuple[Optional[float], Optional[float]]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ----------------------------------------------------------------------------------- collecting
def collect(out: Path, p: Any) -> dict[str, Any]:
    """Every finished cell of the plan, and the per-(source, algorithm) aggregates."""
    from dcmdp.sweep import cell_dir, cell_done

    cells = []
    for c in p.cells:
        if not cell_done(out, c, p.steps):
            continue
        info = json.loads((cell_dir(out, c) / "cell.json").read_text())
        # recompute from the raw files so a changed collapse rule applies to old cells too
        info.update(cell_metrics(cell_dir(out, c), p.sweep.spec.collapse))
        cells.append(info)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for info in cells:
        groups.setdefault((info["source"], info["algorithm"]), []).append(info)
    planned: dict[tuple[str, str], int] = {}
    for c in p.cells:
        planned[(c.source, c.algorithm)] = planned.get((c.source, c.algorithm), 0) + 1
    agg = []
    for (src, algo), n in planned.items():
        got = groups.get((src, algo), [])
        row: dict[str, Any] = {"source": src, "algorithm": algo, "seeds": len(got), "planned": n,
                               "collapses": sum(1 for g in got if g["collapsed"])}
        for key in ("greedy", "sampled", "delta_mean", "delta_first", "delta_last", "tolerance", "lambda_mean",
                    "lambda_last", "reward_peak", "reward_last", "greedy_start", "sampled_start", "wall_s"):
            m, sd = mean_std([g.get(key) for g in got])
            row[key], row[key + "_std"] = m, sd
        agg.append(row)
    calib = out / "calibration.json"
    state = out / "state.json"
    return {"cells": cells, "aggregate": agg,
            "calibration": json.loads(calib.read_text()) if calib.exists() else {},
            "state": json.loads(state.read_text()) if state.exists() else {}}


# -------------------------------------------------------------------------------------- tables
def _fmt(m: Optional[float], sd: Optional[float]) -> str:
    return "–" if m is None else f"{m:.2f} ± {sd:.2f}"


def table_markdown(p: Any, data: dict[str, Any], key: str = "greedy") -> str:
    """Rows: algorithms; columns: sources; cells: mean ± std over seeds and collapses (k/n)."""
    by = {(a["source"], a["algorithm"]): a for a in data["aggregate"]}
    sources = p.sources
    head = "| algorithm | " + " | ".join(s.label or s.name for s in sources) + " |"
    sep = "|---|" + "---|" * len(sources)
    best: dict[str, float] = {}
    for s in sources:
        vals = [a[key] for (src, _), a in by.items() if src == s.name and a[key] is not None]
        if vals:
            best[s.name] = max(vals)
    lines = [head, sep]
    for algo in p.algorithms:
        cells = []
        for s in sources:
            a = by.get((s.name, algo.name))
            if a is None:
                cells.append("")
                continue
            if a["seeds"] == 0:
                cells.append("(not run)")
                continue
            txt = _fmt(a[key], a[key + "_std"])
            if best.get(s.name) is not None and a[key] is not None and a[key] >= best[s.name] - 1e-12:
                txt = f"**{txt}**"
            note = f" ({a['collapses']}/{a['seeds']})"
            if a["seeds"] < a["planned"]:
                note += f" [{a['seeds']} of {a['planned']} seeds]"
            cells.append(txt + note)
        lines.append(f"| {algo.label or algo.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kind_of(p: Any, algo: Any) -> str:
    """grpo | passive (tis/mis/icepop) | dc (dc-grpo alone) | dc+passive (dc-grpo with corrections)."""
    base = p.sweep.spec.base.get("algorithm", {})
    name = algo.algorithm.get("name") or base.get("name", "dc-grpo")
    kind = {"grpo": "grpo", "tis": "passive", "mis": "passive", "icepop": "passive"}.get(name, "dc")
    if kind == "dc" and (algo.algorithm.get("corrections") or base.get("corrections")):
        kind = "dc+passive"
    return kind


def headline_markdown(p: Any, data: dict[str, Any]) -> Optional[str]:
    """Per source: GRPO, the best passive correction, the paper's DC-GRPO form and the best DC-GRPO
    row, by final greedy accuracy (sampled after the slash); the best-of-rows picks are made on the
    same 3 seeds they are reported on, so they flatter the winner a little."""
    rep = p.sweep.spec.report
    hl = rep.headline if rep else None
    if hl is None:
        return None
    by = {(a["source"], a["algorithm"]): a for a in data["aggregate"] if a["seeds"]}
    algos = {a.name: a for a in p.algorithms}

    def cell(a: Optional[dict[str, Any]], name: str = "") -> str:
        if a is None:
            return "–"
        label = f"{name}: " if name else ""
        return (f"{label}{a['greedy']:.2f} ± {a['greedy_std']:.2f} / {a['sampled']:.2f} ± {a['sampled_std']:.2f}"
                f" ({a['collapses']}/{a['seeds']})")

    def best(src: str, kind: str) -> tuple[Optional[dict[str, Any]], str]:
        rows = [(by[(src, n)], n) for n, a in algos.items() if kind_of(p, a) == kind and (src, n) in by]
        return max(rows, key=lambda r: r[0]["greedy"]) if rows else (None, "")

    def diff(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]]) -> str:
        return f"{a['greedy'] - b['greedy']:+.2f}" if a and b else "–"

    lines = ["| source | GRPO | best passive correction | DC-GRPO, paper's form"
             + (f" ({hl.paper})" if hl.paper else "") + " | best DC-GRPO (constraint alone) | best DC-GRPO + correction "
             "| DC alone − GRPO | DC alone − best passive | DC + correction − best passive |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in p.sources:
        g = by.get((s.name, hl.baseline))
        bp, bpn = best(s.name, "passive")
        bd, bdn = best(s.name, "dc")
        bc, bcn = best(s.name, "dc+passive")
        paper = by.get((s.name, hl.paper)) if hl.paper else None
        lines.append(f"| {s.label or s.name} | {cell(g)} | {cell(bp, bpn)} | {cell(paper)} | {cell(bd, bdn)} "
                     f"| {cell(bc, bcn)} | {diff(bd, g)} | {diff(bd, bp)} | {diff(bc, bp)} |")
    return "\n".join(lines)


def delta_table_markdown(p: Any, data: dict[str, Any]) -> str:
    """δ̄ (mean over the run), c and mean λ per cell, to read the constraint's behaviour."""
    by = {(a["source"], a["algorithm"]): a for a in data["aggregate"]}
    head = "| algorithm | " + " | ".join(s.label or s.name for s in p.sources) + " |"
    lines = [head, "|---|" + "---|" * len(p.sources)]
    for algo in p.algorithms:
        cells = []
        for s in p.sources:
            a = by.get((s.name, algo.name))
            if a is None or a["seeds"] == 0:
                cells.append("")
                continue
            txt = f"δ̄ {a['delta_first']:.1e}→{a['delta_last']:.1e}"
            if a.get("tolerance") is not None and a.get("lambda_mean"):
                txt += f", c {a['tolerance']:.1e}, λ̄ {a['lambda_mean']:.2f}"
            elif a.get("tolerance") is not None and algo.algorithm.get("name", "dc-grpo") == "dc-grpo":
                txt += f", c {a['tolerance']:.1e}, λ̄ 0"
            cells.append(txt)
        lines.append(f"| {algo.label or algo.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_csv(data: dict[str, Any]) -> str:
    keys = ["source", "algorithm", "seed", "steps", "greedy", "sampled", "greedy_start", "sampled_start", "collapsed",
            "reward_peak", "reward_last", "delta_mean", "delta_first", "delta_last", "tolerance", "lambda_mean",
            "lambda_last", "clip_frac", "masked_frac", "step_s", "wall_s"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for c in sorted(data["cells"], key=lambda c: (c["source"], c["algorithm"], c["seed"])):
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in c.items() if k in keys})
    return buf.getvalue()


# --------------------------------------------------------------------------------------- plots
def _curves(folder: Path, window: int) -> dict[str, tuple[list[int], list[float]]]:
    rows = read_metrics(folder / "metrics.jsonl")
    out = {}
    for key in ("reward/mean", "discrepancy/prob_diff_mean", "constraint/tolerance", "constraint/lambda"):
        xs = [r["step"] for r in rows if isinstance(r.get(key), (int, float))]
        ys = _values(rows, key)
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


def plot_sources(out: Path, p: Any, dest: Path, dpi: int = 80) -> list[Path]:
    """One PNG per source: reward, δ̄ (solid) vs c (dashed) and λ, one line per algorithm (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcmdp.sweep import cell_dir, cell_done

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


def plot_overview(p: Any, data: dict[str, Any], dest: Path, dpi: int = 80) -> Optional[Path]:
    """Final held-out accuracy (greedy and sampled) per source, one marker series per algorithm."""
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


# -------------------------------------------------------------------------------------- report
def _duration(s: float) -> str:
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min" if s >= 3600 else f"{s / 60:.1f} min"


def fragment(p: Any, data: dict[str, Any], dest: Path, base: Path, command: str) -> str:
    """The markdown section of this sweep (tables, figures, command, wall time, completeness);
    image links are relative to ``base`` (the folder of the markdown file that shows them)."""
    done, total = len(data["cells"]), len(p.cells)
    state = data.get("state") or {}
    # the invocations that ran this part (cells of other parts, e.g. shared references, are reused)
    inv = [i for i in state.get("invocations") or [] if i.get("part", p.part) == p.part]
    wall = sum(i["wall_s"] for i in inv)

    def rel(f: Path) -> str:
        return os.path.relpath(f.resolve(), base.resolve()).replace(os.sep, "/")

    ov = dest / "overview.png"
    lines = [
        f"Command: `{command}`",
        "",
        f"Cells finished: **{done} of {total}** ({'complete' if done == total else 'PARTIAL: the grid is still running or was stopped'}); "
        f"{p.steps} RL steps per cell; seeds {', '.join(map(str, p.seeds))}. "
        + (f"Wall time{' so far' if done < total else ''}: {_duration(wall)} over {len(inv)} invocation(s) of "
           f"this command, {sum(i['cells_run'] for i in inv)} cells run by it ({inv[-1]['parallel']} cells at once, "
           f"{inv[-1]['threads']} thread(s) each, {inv[-1]['cpus']} CPUs; cells already finished by other parts "
           "are reused)." if inv else "Wall time: not recorded yet (the first invocation is running)."),
        "",
        *([f"![overview]({rel(ov)})", ""] if ov.exists() else []),
        *(["**Headline** — final held-out accuracy, trainer greedy / engine sampled, mean ± std over seeds "
            "(collapsed / seeds); the differences are in greedy accuracy. \"Best\" rows are picked on the same "
            "seeds they are reported on, which flatters them a little:", "", hl, ""]
          if (hl := headline_markdown(p, data)) else []),
        "Final held-out accuracy, **trainer greedy** — mean ± std over seeds (collapsed runs / seeds); "
        "best per column in bold:",
        "",
        table_markdown(p, data, "greedy"),
        "",
        "Final held-out accuracy, **rollout engine sampled** (as deployed: the source's precision, noise and "
        "lag) — mean ± std over seeds (collapsed / seeds):",
        "",
        table_markdown(p, data, "sampled"),
        "",
        "δ̄ over the first → last 10 steps (seed mean), and for DC-GRPO rows the tolerance c and the mean λ:",
        "",
        delta_table_markdown(p, data),
        "",
    ]
    calib = data.get("calibration") or {}
    if calib:
        parts = []
        for src, d in calib.items():
            if src not in {x.name for x in p.sources}:
                continue
            refs = ", ".join(f"{k} δ̄ {v['mean_delta']:.2e}" for k, v in d.items() if k != "tolerance")
            parts.append(f"{src}: {refs}")
        lines.append("Relative tolerances (c = factor × the reference's mean δ̄ on that source): "
                     + "; ".join(parts) + ".")
        lines.append("")
    for src in p.sources:
        png = dest / f"{src.name}.png"
        if png.exists():
            lines.append(f"![{src.label or src.name}]({rel(png)})")
            lines.append("")
    return "\n".join(lines)


def update_doc(doc: Path, name: str, text: str, title: Optional[str] = None) -> None:
    """Replace this sweep's marked section of ``doc`` (append it when the markers are missing)."""
    begin, end = f"<!-- dcmdp-sweep:{name}:begin -->", f"<!-- dcmdp-sweep:{name}:end -->"
    block = f"{begin}\n<!-- generated by `dcmdp sweep`: edits inside these markers are overwritten -->\n{text}\n{end}"
    old = doc.read_text() if doc.exists() else ""
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + (f"## {title}\n\n" if title else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def write_report(out: Path, p: Any, dest: Path, doc: Optional[Path], command: str) -> dict[str, Any]:
    """Collect, then write results.json, results.csv, table.md and the PNGs into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    data = collect(out, p)
    data["command"] = command
    data["steps"] = p.steps
    data["planned_cells"] = len(p.cells)
    (dest / "results.json").write_text(json.dumps(data, indent=1, default=float))
    (dest / "results.csv").write_text(results_csv(data))
    plot_sources(out, p, dest)
    plot_overview(p, data, dest)
    (dest / "table.md").write_text(fragment(p, data, dest, dest, command) + "\n")
    if doc is not None:
        text = fragment(p, data, dest, doc.parent, command)
        rep = p.sweep.spec.report
        section = p.sweep.metadata.name + (f"-{p.part}" if p.part else "")
        title = (rep.title if rep and rep.title else p.sweep.metadata.name) + (f": part {p.part}" if p.part else "")
        update_doc(doc, section, text, title=title)
    return data
