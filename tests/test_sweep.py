"""``dcmdp sweep`` (:mod:`dcmdp.sweep`): the sweep model, the grid expansion, aggregation, and a real
2-cell grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dcmdp.sweep import cells as C
from dcmdp.sweep import plan as W
from dcmdp.sweep import report as R
from dcmdp.cli import main
from dcmdp.metrics import read_metrics
from dcmdp.spec import SpecError

REPO = Path(__file__).resolve().parent.parent
MISMATCH = REPO / "bench" / "sweeps" / "mismatch.yaml"

TINY_BASE = {
    "model": {"hiddenSize": 32, "intermediateSize": 64, "numLayers": 1, "numHeads": 2, "numKvHeads": 1,
              "warmStart": {"steps": 3, "batchSize": 32}},
    "task": {"name": "addition", "digits": 1, "heldOut": 16},
    "algorithm": {"groupSize": 4, "promptsPerStep": 4, "miniBatchSize": 2, "learningRate": 1e-3},
    "rollout": {"pools": [{"name": "engine", "precision": "fp32"}]},
    "checkpoint": {"everySteps": 0},
}


def sweep_doc(**spec: Any) -> dict[str, Any]:
    base = {"base": TINY_BASE, "steps": 3, "seeds": [0],
            "sources": [{"name": "noise", "pool": {"noise": 0.5}}],
            "algorithms": [{"name": "grpo", "algorithm": {"name": "grpo"}},
                           {"name": "dc-half", "algorithm": {"name": "dc-grpo"},
                            "tolerance": {"relativeTo": "grpo", "factor": 0.5}}]}
    base.update(spec)
    return {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPSweep", "metadata": {"name": "tiny"}, "spec": base}


def errors_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        W.parse_sweep(doc)
    return info.value.errors


# --------------------------------------------------------------------------------- the model
def test_committed_sweep_loads_and_its_parts_cover_the_grid() -> None:
    sweep = W.load_sweep(MISMATCH)
    full = W.plan(sweep)
    parts = [W.plan(sweep, part=name) for name in sweep.spec.parts]
    assert {c.id for p in parts for c in p.cells} == {c.id for c in full.cells}  # parts may share cells
    quick = W.plan(sweep, part="quick")
    assert quick.steps < full.steps and len(quick.cells) < len(full.cells)
    # every relative cell depends on the reference cells of its own source, all seeds
    for c in full.cells:
        if c.relative:
            assert c.deps == [f"{c.source}/{c.relative.relative_to}/seed{k}" for k in full.seeds]


def test_cells_are_valid_runs_with_the_source_and_algorithm_patched_in() -> None:
    p = W.plan(W.load_sweep(MISMATCH), part="staleness")
    cell = next(c for c in p.cells if c.id == "lag16/dc-tis/seed2")
    spec = cell.manifest["spec"]
    assert spec["rollout"]["pools"] == [{"name": "engine", "engine": "hf", "precision": "fp32", "lag": 16}]
    assert spec["algorithm"]["name"] == "dc-grpo" and spec["algorithm"]["corrections"] == ["tis"]
    assert spec["algorithm"]["seed"] == 2 and spec["algorithm"]["steps"] == p.steps
    assert spec["algorithm"]["learningRate"] == 1e-4  # from the base


@pytest.mark.parametrize("patch, path, words", [
    ({"steps": 0}, "spec.steps", "greater than or equal to 1"),
    ({"seeds": [1, 1]}, "spec.seeds", "distinct"),
    ({"algorithms": [{"name": "a", "tolerance": {"relativeTo": "nope", "factor": 1.0}}]}, "spec", "unknown algorithm 'nope'"),
    ({"algorithms": [{"name": "a", "sources": ["lag9"]}]}, "spec", "unknown source 'lag9'"),
    ({"algorithms": [{"name": "a"}, {"name": "a"}]}, "spec", "repeated: a"),
    ({"sources": [{"name": "Bad Name"}]}, "spec.sources[0].name", "pattern"),
    ({"quick": {"steps": 2, "algorithms": ["dc-half"]}}, "spec", "needs its reference 'grpo'"),
    ({"parts": {"x": {"sources": ["nope"]}}}, "spec", "parts.x.sources: unknown source 'nope'"),
    ({"colapse": {}}, "spec.colapse", "unknown field"),
])
def test_bad_sweeps_name_the_field(patch: dict[str, Any], path: str, words: str) -> None:
    errs = dict(errors_of(sweep_doc(**patch)))
    assert path in errs, errs
    assert words in errs[path], errs


def test_an_invalid_cell_names_the_cell_and_the_run_field() -> None:
    doc = sweep_doc(algorithms=[{"name": "grpo", "algorithm": {"name": "grpo", "clipLow": 2.0}}])
    (path, msg), = errors_of(doc)
    assert path == "cell noise × grpo: spec.algorithm.clipLow" and "less than 1" in msg


def test_only_filter_keeps_the_reference_cells() -> None:
    p = W.filter_cells(W.plan(W.load_sweep(MISMATCH), part="staleness"), "lag16/dc-tis")
    assert sorted(c.id for c in p.cells) == sorted([f"lag16/grpo/seed{k}" for k in (0, 1, 2)]
                                                   + [f"lag16/dc-tis/seed{k}" for k in (0, 1, 2)])
    with pytest.raises(SpecError):
        W.filter_cells(p, "lag99/*")


# ------------------------------------------------------------------------------- aggregation
def test_collapse_is_a_fall_below_half_the_peak_after_the_peak() -> None:
    assert not C.collapsed([0.2] * 5 + [0.5] * 20 + [0.9] * 20, window=5)  # learns
    assert C.collapsed([0.3] * 10 + [0.6] * 20 + [0.1] * 20, window=5)     # rises, then falls
    assert C.collapsed([0.25] * 10 + [0.05] * 30, window=5)               # falls from the start
    assert not C.collapsed([0.3] * 10 + [0.1] * 3 + [0.8] * 30, window=5)  # dip, then the peak
    assert not C.collapsed([0.6, 0.62, 0.58, 0.55, 0.6] * 8, window=5)       # noise around a level
    assert not C.collapsed([], window=5) and not C.collapsed([0.0] * 10, window=5)


def test_update_doc_rewrites_only_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nintro\n")
    R.update_doc(doc, "a", "first", title="Part A")
    R.update_doc(doc, "b", "other")
    R.update_doc(doc, "a", "second")
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n") and text.count("## Part A") == 1
    assert "second" in text and "first" not in text and "other" in text


# ---------------------------------------------------------------------------- a real grid
@pytest.mark.slow
def test_a_two_cell_grid_runs_calibrates_c_resumes_and_reports(tmp_path: Path, capsys) -> None:
    f = tmp_path / "tiny.yaml"
    doc = sweep_doc(report={"dir": "report", "doc": "results.md", "title": "Tiny"}, seeds=[3], warmStartSeed=0)
    f.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    assert main(["sweep", "-f", str(f), "--out", str(out), "--quiet"]) == 0

    grpo, dc = out / "cells/noise/grpo/seed3", out / "cells/noise/dc-half/seed3"
    for d in (grpo, dc):
        cell = json.loads((d / "cell.json").read_text())
        assert cell["steps"] == 3 and cell["greedy"] is not None and cell["sampled"] is not None
        assert not (d / "checkpoints").exists()  # pruned: the sweep needs the metrics only
    # c of the relative cell = 0.5 × the mean δ̄ the grpo cell measured (logit noise: δ̄ > 0)
    deltas = [r["discrepancy/prob_diff_mean"] for r in read_metrics(grpo / "metrics.jsonl")]
    assert min(deltas) > 1e-3
    c = yaml.safe_load((dc / "run.yaml").read_text())["spec"]["algorithm"]["constraint"]["tolerance"]
    assert c == pytest.approx(0.5 * sum(deltas) / len(deltas), rel=1e-9)
    assert [r["constraint/tolerance"] for r in read_metrics(dc / "metrics.jsonl")] == [pytest.approx(c)] * 3
    # both cells share the warm start of seed 0
    assert sorted(x.name for x in (out / "warmstart").iterdir()) == ["seed0"]
    for d in (grpo, dc):
        assert yaml.safe_load((d / "run.yaml").read_text())["spec"]["model"]["path"].endswith("warmstart/seed0/model")

    report = tmp_path / "report" / "all"
    data = json.loads((report / "results.json").read_text())
    assert {(a["source"], a["algorithm"], a["seeds"]) for a in data["aggregate"]} == {
        ("noise", "grpo", 1), ("noise", "dc-half", 1)}
    assert (report / "noise.png").stat().st_size > 1000 and (report / "results.csv").read_text().count("\n") == 3
    text = (tmp_path / "results.md").read_text()
    assert "## Tiny" in text and "| dc-half |" in text and "Cells finished: **2 of 2**" in text

    # resumable: a rerun skips both cells and leaves them untouched
    stamp = (dc / "cell.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", "-f", str(f), "--out", str(out), "--quiet"]) == 0
    assert "0 cells run, 2 already done" in capsys.readouterr().err
    assert (dc / "cell.json").stat().st_mtime_ns == stamp
    state = json.loads((out / "state.json").read_text())
    assert [i["cells_run"] for i in state["invocations"]] == [2, 0] and state["total_wall_s"] > 0


def test_rows_are_classified_for_the_headline() -> None:
    p = W.plan(W.load_sweep(MISMATCH), part="staleness-tight")
    kinds = {a.name: W.kind_of(p, a) for a in p.algorithms}
    assert kinds["grpo"] == "grpo" and kinds["tis"] == "passive"
    assert kinds["dc-auto"] == "dc" and kinds["dc-tis-tight"] == "dc+passive"
    agg = [{"source": "lag4", "algorithm": n, "seeds": 3, "planned": 3, "collapses": 0, "greedy": g,
            "greedy_std": 0.01, "sampled": 0.3, "sampled_std": 0.02}
           for n, g in (("grpo", 0.2), ("tis", 0.8), ("dc-auto", 0.6), ("dc-k3-0.5", 0.65), ("dc-tis-tight", 0.7))]
    row = next(line for line in R.headline_markdown(p, {"aggregate": agg}).splitlines() if "stale K=4" in line)
    assert "tis: 0.80" in row and "dc-k3-0.5: 0.65" in row and "dc-tis-tight: 0.70" in row
    assert row.endswith("| +0.45 | -0.15 | -0.10 |")


@pytest.mark.slow
def test_the_committed_quick_grid_runs(tmp_path: Path, capsys) -> None:
    """``dcmdp sweep -f bench/sweeps/mismatch.yaml --quick``, as committed, end to end: every cell
    finishes, GRPO learns without mismatch, the stale source shows a mismatch orders of magnitude
    larger, and the report is written beside the cells (not into docs/: the quick grid is a smoke
    run, not the published result)."""
    out = tmp_path / "quick"
    doc_before = (REPO / "docs" / "results.md").read_text()
    assert main(["sweep", "-f", str(MISMATCH), "--quick", "--out", str(out), "--quiet"]) == 0
    p = W.plan(W.load_sweep(MISMATCH), part="quick")
    cells = {(c["source"], c["algorithm"]): c for c in json.loads((out / "report" / "results.json").read_text())["cells"]}
    assert set(cells) == {(c.source, c.algorithm) for c in p.cells} and len(cells) == len(p.cells) >= 4
    grpo = cells[("none", "grpo")]
    assert grpo["steps"] == p.steps and grpo["greedy"] > grpo["greedy_start"] + 0.1, grpo  # GRPO learns
    assert cells[("lag16", "grpo")]["delta_mean"] > 100 * grpo["delta_mean"]
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["lag16"]["tolerance"]["dc-penalty-1"] == pytest.approx(calib["lag16"]["grpo"]["mean_delta"])
    assert "| GRPO |" in capsys.readouterr().out
    assert (REPO / "docs" / "results.md").read_text() == doc_before


@pytest.mark.vllm
@pytest.mark.slow
def test_a_vllm_source_runs_its_cells_with_the_process_runner(tmp_path: Path) -> None:
    """A source with a ``vllm`` pool: the cell runs as trainer + vLLM worker processes (the vLLM
    venv's Python), and its δ̄ is the real bf16 vLLM vs fp32 trainer discrepancy."""
    base = {**TINY_BASE, "model": {"warmStart": {"steps": 3, "batchSize": 32}}}
    doc = sweep_doc(base=base, steps=2, sources=[{"name": "vllm-bf16", "pool": {"engine": "vllm", "precision": "bf16"}}],
                    algorithms=[{"name": "grpo", "algorithm": {"name": "grpo"}}])
    f = tmp_path / "vllm.yaml"
    f.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    assert main(["sweep", "-f", str(f), "--out", str(out), "--quiet"]) == 0
    cell = out / "cells/vllm-bf16/grpo/seed0"
    assert json.loads((cell / "cell.json").read_text())["steps"] == 2
    assert (cell / "logs" / "rollout-engine-0.log").exists()  # a separate worker process ran the pool
    deltas = [r["discrepancy/prob_diff_mean"] for r in read_metrics(cell / "metrics.jsonl")]
    assert len(deltas) == 2 and all(1e-5 < d < 5e-2 for d in deltas), deltas


BUDGET = REPO / "bench" / "sweeps" / "budget.yaml"


@pytest.mark.slow
def test_the_committed_budget_quick_grid_runs(tmp_path: Path) -> None:
    """``dcmdp sweep -f bench/sweeps/budget.yaml --quick`` (issue 16's grid in small), as committed:
    every cell finishes; the int4 engine's greedy accuracy is recorded beside the trainer's from the
    warm start on; the deployed penalty is measured; the adaptive source logs a lag within its
    ceiling that follows λ; the report ranks by the engine's greedy accuracy."""
    out = tmp_path / "quick"
    doc_before = (REPO / "docs" / "results.md").read_text()
    assert main(["sweep", "-f", str(BUDGET), "--quick", "--out", str(out), "--quiet"]) == 0
    p = W.plan(W.load_sweep(BUDGET), part="quick")
    cells = {(c["source"], c["algorithm"]): c for c in json.loads((out / "report" / "results.json").read_text())["cells"]}
    assert set(cells) == {(c.source, c.algorithm) for c in p.cells} and len(cells) >= 4
    for c in cells.values():
        assert c["steps"] == p.steps and c["engine_greedy_start"] is not None and c["steps_per_min"] > 0
    deployed = read_metrics(out / "cells/int4/deployed/seed0/metrics.jsonl")
    assert all(r["constraint/penalty"] > 0 for r in deployed)  # the int4 policy differs from the trainer's
    adaptive = read_metrics(out / "cells/fp8-adaptive/dc-penalty/seed0/metrics.jsonl")
    assert all(0 <= r["staleness/lag"] <= 3 for r in adaptive) and adaptive[0]["staleness/lag"] == 3  # λ0 = 0.1
    assert "engine greedy" in (out / "report" / "table.md").read_text()
    assert (REPO / "docs" / "results.md").read_text() == doc_before
