"""Aggregation of a sweep: the finished cells' numbers (:mod:`dcmdp.sweep.cells`), mean ± std over
seeds, the tables, the PNGs (:mod:`dcmdp.sweep.plots`), ``results.json``/``.csv`` and the doc section.

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

from dcmdp.sweep.cells import cell_dir, cell_done, cell_metrics
from dcmdp.sweep.plan import Plan, kind_of
from dcmdp.sweep.plots import plot_overview, plot_sources


def mean_std(xs: list[float]) -> tuple[Optional[float], Optional[float]]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ----------------------------------------------------------------------------------- collecting
def collect(out: Path, p: Plan) -> dict[str, Any]:
    """Every finished cell of the plan, and the per-(source, algorithm) aggregates."""
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
        for key in ("greedy", "sampled", "engine_greedy", "engine_greedy_start", "steps_per_min", "lag_mean",
                    "delta_mean", "delta_first", "delta_last", "tolerance", "lambda_mean",
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
def _fmt(m: Optional[float], sd: Optional[float], digits: int = 2) -> str:
    return "–" if m is None else f"{m:.{digits}f} ± {sd:.{digits}f}"


HEADLINE_KEYS = {"greedy": "greedy", "sampled": "sampled", "engine-greedy": "engine_greedy"}
HEADLINE_WORDS = {"greedy": "trainer greedy", "sampled": "engine sampled", "engine-greedy": "engine greedy"}


def table_markdown(p: Plan, data: dict[str, Any], key: str = "greedy", digits: int = 2) -> str:
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
            txt = _fmt(a[key], a[key + "_std"], digits)
            if best.get(s.name) is not None and a[key] is not None and a[key] >= best[s.name] - 1e-12:
                txt = f"**{txt}**"
            note = f" ({a['collapses']}/{a['seeds']})"
            if a["seeds"] < a["planned"]:
                note += f" [{a['seeds']} of {a['planned']} seeds]"
            cells.append(txt + note)
        lines.append(f"| {algo.label or algo.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_markdown(p: Plan, data: dict[str, Any]) -> Optional[str]:
    """Per source: GRPO, the best passive correction, the paper's DC-GRPO form and the best DC-GRPO
    row, ranked and differenced by ``report.headline.metric`` (the other accuracy after the slash:
    engine sampled for the trainer's greedy, the trainer's greedy otherwise); the best-of-rows picks
    are made on the same seeds they are reported on, so they flatter the winner a little."""
    rep = p.sweep.spec.report
    hl = rep.headline if rep else None
    if hl is None:
        return None
    key = HEADLINE_KEYS[hl.metric]
    other = "sampled" if key == "greedy" else "greedy"
    by = {(a["source"], a["algorithm"]): a for a in data["aggregate"] if a["seeds"] and a.get(key) is not None}
    algos = {a.name: a for a in p.algorithms}

    def cell(a: Optional[dict[str, Any]], name: str = "") -> str:
        if a is None:
            return "–"
        label = f"{name}: " if name else ""
        return (f"{label}{_fmt(a[key], a[key + '_std'])} / {_fmt(a[other], a[other + '_std'])}"
                f" ({a['collapses']}/{a['seeds']})")

    def best(src: str, kind: str) -> tuple[Optional[dict[str, Any]], str]:
        rows = [(by[(src, n)], n) for n, a in algos.items() if kind_of(p, a) == kind and (src, n) in by]
        return max(rows, key=lambda r: r[0][key]) if rows else (None, "")

    def diff(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]]) -> str:
        return f"{a[key] - b[key]:+.2f}" if a and b else "–"

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


def delta_table_markdown(p: Plan, data: dict[str, Any]) -> str:
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
    keys = ["source", "algorithm", "seed", "steps", "greedy", "sampled", "engine_greedy", "greedy_start", "sampled_start",
            "engine_greedy_start", "steps_per_min", "lag_mean", "collapsed",
            "reward_peak", "reward_last", "delta_mean", "delta_first", "delta_last", "tolerance", "lambda_mean",
            "lambda_last", "clip_frac", "masked_frac", "step_s", "wall_s"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for c in sorted(data["cells"], key=lambda c: (c["source"], c["algorithm"], c["seed"])):
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in c.items() if k in keys})
    return buf.getvalue()


# -------------------------------------------------------------------------------------- report
def _duration(s: float) -> str:
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min" if s >= 3600 else f"{s / 60:.1f} min"


def fragment(p: Plan, data: dict[str, Any], dest: Path, base: Path, command: str) -> str:
    """The markdown section of this sweep (tables, figures, command, wall time, completeness);
    image links are relative to ``base`` (the folder of the markdown file that shows them)."""
    done, total = len(data["cells"]), len(p.cells)
    rep = p.sweep.spec.report
    metric = rep.headline.metric if rep and rep.headline else "greedy"
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
        *([f"**Headline** — final held-out accuracy, {HEADLINE_WORDS[metric]} / "
           f"{'engine sampled' if metric == 'greedy' else 'trainer greedy'}, mean ± std over seeds "
           f"(collapsed / seeds); the differences are in {HEADLINE_WORDS[metric]} accuracy. \"Best\" rows are "
           "picked on the same seeds they are reported on, which flatters them a little:", "", hl, ""]
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
        *(["Final held-out accuracy, **rollout engine greedy** (temperature 0 from the engine as deployed) — "
           "mean ± std over seeds (collapsed / seeds):", "", table_markdown(p, data, "engine_greedy"), ""]
          if any(a.get("engine_greedy") is not None for a in data["aggregate"]) else []),
        "Trainer throughput, **steps per minute** (60 / mean step wall time; cells share the machine, so "
        "compare within a column; mean ± std over seeds):",
        "",
        table_markdown(p, data, "steps_per_min", digits=1),
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


def write_report(out: Path, p: Plan, dest: Path, doc: Optional[Path], command: str) -> dict[str, Any]:
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
