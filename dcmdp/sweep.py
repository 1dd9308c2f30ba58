"""``dcmdp sweep``: a grid of local runs (mismatch source × algorithm × seed), run and aggregated.

A sweep file (kind ``DCMDPSweep``) names a base run, the mismatch sources (each a patch of the
single rollout pool: precision, logit noise, lag) and the algorithms (each a patch of
``spec.algorithm``). Every combination and seed is one *cell*: an ordinary ``DCMDPRun`` manifest,
validated up front, run by the in-process runner (found through the ``dcmdp.runners`` entry point,
so the core never imports the trainer) in a pool of worker processes; a cell with a ``vllm`` pool
runs with the process runner instead, its rollout worker under the vLLM venv (``make vllm-venv``).

* **Shared warm start**: the supervised warm start is run once per seed (or once, with
  ``warmStartSeed``) and its model folder reused by every cell of that seed (``model.path``), so
  cells differ only in what the sweep varies.
* **Relative tolerance**: an algorithm may set ``tolerance: {relativeTo: grpo, factor: 0.5}``: its c
  is ``factor`` × the mean δ̄ that the ``grpo`` cells of the same source measured (mean over their
  steps and seeds). Those reference cells run first; the derived c is written into the cell's
  manifest and ``calibration.json``.
* **Resumable**: a finished cell leaves ``cell.json``; a rerun skips it (an unfinished cell is
  restarted from scratch).
* **Aggregation** (:mod:`dcmdp.sweep_report`): per cell the final held-out accuracy (trainer greedy
  and engine sampled), collapse (the smoothed reward falls below ``collapse.fraction`` of its peak
  after that peak), δ̄, c and λ; per (source, algorithm) mean ± std over seeds; a Table-2-shaped
  markdown table, ``results.json``/``results.csv`` and one PNG per source.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from dcmdp import yamlfile
from dcmdp.spec import DNS_LABEL, KIND, SpecError, _messages, parse_run

SWEEP_KIND = "DCMDPSweep"
NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a cell folder name: lowercase, digits, '-', '.'


# ------------------------------------------------------------------------------------- the model
class SweepModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              strict=True, allow_inf_nan=False)


class SourceSpec(SweepModel):
    """A mismatch source: fields merged into the run's single rollout pool (and run-level patches)."""

    name: str = Field(..., min_length=1, max_length=40, pattern=NAME)
    label: Optional[str] = Field(None, description="Column title (default: name).")
    pool: dict[str, Any] = Field(default_factory=dict, description="Merged into rollout.pools[0].")
    patch: dict[str, Any] = Field(default_factory=dict, description="Merged into the run's spec.")


class RelativeTolerance(SweepModel):
    """c = factor × mean δ̄ of the reference algorithm's cells of the same source."""

    relative_to: str = Field(..., min_length=1)
    factor: float = Field(..., gt=0, le=1000)


class AlgorithmEntry(SweepModel):
    """A table row: fields merged into ``spec.algorithm`` (and optionally the whole spec)."""

    name: str = Field(..., min_length=1, max_length=40, pattern=NAME)
    label: Optional[str] = Field(None, description="Row title (default: name).")
    algorithm: dict[str, Any] = Field(default_factory=dict)
    patch: dict[str, Any] = Field(default_factory=dict, description="Merged into the run's spec.")
    tolerance: Optional[RelativeTolerance] = None
    sources: Optional[list[str]] = Field(None, description="Only these sources (default: all).")


class CollapseSpec(SweepModel):
    window: int = Field(10, ge=1, le=10_000, description="Steps of the reward's moving average.")
    fraction: float = Field(0.5, gt=0, lt=1, description="Collapsed: smoothed reward < fraction × peak after the peak.")


class SubsetSpec(SweepModel):
    """A named part of the grid (``--part NAME``) or the ``--quick`` grid: a subset of the sources
    and algorithms, optionally with other steps and seeds."""

    steps: Optional[int] = Field(None, ge=1, le=1_000_000)
    seeds: Optional[list[int]] = None
    sources: Optional[list[str]] = None
    algorithms: Optional[list[str]] = None
    eval_every: Optional[int] = Field(None, ge=0)


class HeadlineSpec(SweepModel):
    """The headline table: per source, the baseline, the best passive correction, the paper's
    DC-GRPO form and the best DC-GRPO row (algorithm entry names)."""

    baseline: str = "grpo"
    paper: Optional[str] = Field(None, description="The row with the paper's form (e.g. dc-penalty-1).")


class ReportSpec(SweepModel):
    """Where the aggregated report goes; paths are relative to the sweep file's folder."""

    headline: Optional[HeadlineSpec] = None

    dir: str = Field(..., min_length=1, description="Where table.md, results.json/csv and PNGs go.")
    doc: Optional[str] = Field(None, description="A markdown file whose marked section is rewritten.")
    title: Optional[str] = None


class SweepSpec(SweepModel):
    base: dict[str, Any] = Field(..., description="The `spec:` of a DCMDPRun: what every cell shares.")
    steps: int = Field(..., ge=1, le=1_000_000)
    seeds: list[int] = Field(..., min_length=1)
    eval_every: int = Field(0, ge=0, description="Held-out eval period in cells (0 = start and end).")
    sources: list[SourceSpec] = Field(..., min_length=1)
    algorithms: list[AlgorithmEntry] = Field(..., min_length=1)
    shared_warm_start: bool = Field(True, description="Warm-start once and reuse the model (else every cell warm-starts).")
    warm_start_seed: Optional[int] = Field(
        None, ge=0, description="One warm start (with this seed) for every cell; unset = one per seed.")
    parallel: int = Field(2, ge=1, le=256, description="Cells run at once.")
    threads: int = Field(1, ge=1, le=256, description="torch threads per cell.")
    collapse: CollapseSpec = Field(default_factory=CollapseSpec)
    quick: Optional[SubsetSpec] = Field(None, description="`--quick`: a small grid (minutes).")
    parts: dict[str, SubsetSpec] = Field(default_factory=dict, description="`--part NAME`: named parts.")
    report: Optional[ReportSpec] = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("seeds must be distinct integers >= 0")
        return v

    @model_validator(mode="after")
    def _names(self) -> "SweepSpec":
        for what, items in (("sources", self.sources), ("algorithms", self.algorithms)):
            names = [i.name for i in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: names must be unique (repeated: {', '.join(dup)})")
        sources = {s.name for s in self.sources}
        algos = {a.name: a for a in self.algorithms}
        for a in self.algorithms:
            for s in a.sources or []:
                if s not in sources:
                    raise ValueError(f"algorithms[{a.name}].sources: unknown source {s!r}")
            if a.tolerance is not None:
                ref = algos.get(a.tolerance.relative_to)
                if ref is None:
                    raise ValueError(f"algorithms[{a.name}].tolerance.relativeTo: unknown algorithm "
                                     f"{a.tolerance.relative_to!r}")
                if ref.tolerance is not None:
                    raise ValueError(f"algorithms[{a.name}].tolerance.relativeTo: {ref.name!r} has a relative "
                                     "tolerance itself (one level only)")
                missing = set(a.sources or sources) - set(ref.sources or sources)
                if missing:
                    raise ValueError(f"algorithms[{a.name}]: reference {ref.name!r} does not run on "
                                     f"{', '.join(sorted(missing))}")
        subsets = dict(self.parts)
        if self.quick is not None:
            subsets["quick"] = self.quick
        for name, sub in subsets.items():
            where = "quick" if sub is self.quick else f"parts.{name}"
            if not re.fullmatch(NAME, name):
                raise ValueError(f"parts: {name!r} is not a valid part name (lowercase letters, digits, '-')")
            for s in sub.sources or []:
                if s not in sources:
                    raise ValueError(f"{where}.sources: unknown source {s!r}")
            for a in sub.algorithms or []:
                if a not in algos:
                    raise ValueError(f"{where}.algorithms: unknown algorithm {a!r}")
                ref = algos[a].tolerance
                if ref is not None and ref.relative_to not in sub.algorithms:
                    raise ValueError(f"{where}.algorithms: {a!r} needs its reference {ref.relative_to!r} too")
        if self.report is not None and self.report.headline is not None:
            for role in ("baseline", "paper"):
                name = getattr(self.report.headline, role)
                if name is not None and name not in algos:
                    raise ValueError(f"report.headline.{role}: unknown algorithm {name!r}")
        if "quick" in self.parts:
            raise ValueError("parts: 'quick' is reserved for `quick:`")
        return self


class SweepMetadata(SweepModel):
    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL)


class DCMDPSweep(SweepModel):
    api_version: Literal["dcmdp.io/v1alpha1"] = Field("dcmdp.io/v1alpha1", alias="apiVersion")
    kind: Literal["DCMDPSweep"] = SWEEP_KIND
    metadata: SweepMetadata
    spec: SweepSpec


# ----------------------------------------------------------------------------------- the cells
def merge(base: Any, patch: Any) -> Any:
    """Deep merge of plain data: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)  # never share structure with the inputs: cells are patched in place
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(patch)


@dataclass
class Cell:
    source: str
    algorithm: str
    seed: int
    manifest: dict[str, Any]  # a DCMDPRun (tolerance still a placeholder for relative cells)
    relative: Optional[RelativeTolerance] = None
    deps: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.source}/{self.algorithm}/seed{self.seed}"


@dataclass
class Plan:
    sweep: DCMDPSweep
    steps: int
    seeds: list[int]
    sources: list[SourceSpec]
    algorithms: list[AlgorithmEntry]
    cells: list[Cell]
    eval_every: int
    part: Optional[str]  # None (the whole grid), "quick" or a part name

    @property
    def quick(self) -> bool:
        return self.part == "quick"

    def cell(self, cid: str) -> Cell:
        return next(c for c in self.cells if c.id == cid)


PLACEHOLDER_TOLERANCE = 1.0  # validated stand-in for a relative c (replaced before the cell runs)


def load_sweep(path: Union[str, Path]) -> DCMDPSweep:
    path = Path(path)
    try:
        docs = yamlfile.read_documents(path)
    except FileNotFoundError:
        raise SpecError([("(file)", f"no such file: {path}")], str(path)) from None
    except yamlfile.YAMLFileError as exc:
        raise SpecError([(exc.where, str(exc))], str(path)) from None
    if len(docs) != 1:
        raise SpecError([("(file)", f"the file holds {len(docs)} YAML documents: a sweep file holds exactly one")],
                        str(path))
    return parse_sweep(docs[0], str(path))


def parse_sweep(data: Any, source: str = "sweep") -> DCMDPSweep:
    if not isinstance(data, dict):
        raise SpecError([("(root)", "a DCMDPSweep must be a mapping")], source)
    try:
        sweep = DCMDPSweep.model_validate(data, by_name=False)
    except ValidationError as exc:
        raise SpecError(_messages(exc), source) from None
    plan(sweep, source=source)  # every cell's manifest must be valid before anything runs
    for part in ([*sweep.spec.parts, "quick"] if sweep.spec.quick else list(sweep.spec.parts)):
        plan(sweep, part=part, source=source)
    return sweep


def plan(sweep: DCMDPSweep, *, part: Optional[str] = None, source: str = "sweep",
         steps: Optional[int] = None) -> Plan:
    """Expand the grid (or one part of it) into cells, source by source, and validate them."""
    s = sweep.spec
    q = None
    if part == "quick":
        q = s.quick
        if q is None:
            raise SpecError([("spec.quick", "this sweep has no quick variant")], source)
    elif part is not None:
        q = s.parts.get(part)
        if q is None:
            known = ", ".join(s.parts) or "none"
            raise SpecError([("--part", f"no part {part!r} in spec.parts (known: {known})")], source)
    n_steps = steps or (q.steps if q and q.steps else s.steps)
    seeds = (q.seeds if q and q.seeds else s.seeds)
    sources = [x for x in s.sources if not (q and q.sources) or x.name in q.sources]
    algorithms = [a for a in s.algorithms if not (q and q.algorithms) or a.name in q.algorithms]
    eval_every = q.eval_every if q and q.eval_every is not None else s.eval_every
    refs = {a.tolerance.relative_to for a in algorithms if a.tolerance}
    ordered = [a for a in algorithms if a.name in refs] + [a for a in algorithms if a.name not in refs]
    cells: list[Cell] = []
    for src in sources:
        for algo in ordered:
            if algo.sources is not None and src.name not in algo.sources:
                continue
            for seed in seeds:
                m = cell_manifest(sweep, src, algo, seed, n_steps, eval_every)
                try:
                    parse_run(m, f"cell {src.name}/{algo.name}/seed{seed}")
                except SpecError as exc:
                    raise SpecError([(f"cell {src.name} × {algo.name}: {p}", msg) for p, msg in exc.errors],
                                    source) from None
                deps = ([f"{src.name}/{algo.tolerance.relative_to}/seed{k}" for k in seeds]
                        if algo.tolerance else [])
                cells.append(Cell(src.name, algo.name, seed, m, algo.tolerance, deps))
    # source by source, reference algorithms first (the scheduler fills in cells that do not
    # wait for a calibration while the references run), so the table fills column by column
    # a row or column without a cell in this plan (an algorithm restricted to other sources) is left out
    algorithms = [a for a in algorithms if any(c.algorithm == a.name for c in cells)]
    sources = [x for x in sources if any(c.source == x.name for c in cells)]
    return Plan(sweep, n_steps, list(seeds), sources, algorithms, cells, eval_every, part)


def cell_manifest(sweep: DCMDPSweep, src: SourceSpec, algo: AlgorithmEntry, seed: int, steps: int,
                  eval_every: int) -> dict[str, Any]:
    spec = merge(sweep.spec.base, src.patch)
    spec = merge(spec, algo.patch)
    spec = merge(spec, {"algorithm": merge(algo.algorithm, {"seed": seed, "steps": steps})})
    pools = spec.get("rollout", {}).get("pools") or [{"name": "engine"}]
    if len(pools) != 1:
        raise SpecError([("spec.base.rollout.pools", "a sweep varies one rollout pool: give exactly one")],
                        "sweep")
    spec.setdefault("rollout", {})["pools"] = [merge(pools[0], src.pool)]
    spec.setdefault("eval", {})["everySteps"] = eval_every
    if algo.tolerance is not None:
        spec["algorithm"] = merge(spec["algorithm"], {"constraint": {"tolerance": PLACEHOLDER_TOLERANCE}})
    name = f"{sweep.metadata.name}-{src.name}-{algo.name}-s{seed}".replace(".", "-")[:63].strip("-")
    return {"apiVersion": "dcmdp.io/v1alpha1", "kind": KIND, "metadata": {"name": name}, "spec": spec}


# ------------------------------------------------------------------------------------ the worker
def _worker_run(manifest: dict[str, Any], out_dir: str, threads: int, queue: Any, cid: str) -> dict[str, Any]:
    """Run one cell in a worker process: the in-process runner of the trainer package, or the
    process runner (trainer and rollout worker as child processes) for a ``vllm`` pool, whose
    worker runs under the vLLM venv's own Python."""
    from dcmdp.cli import runner

    run = parse_run(manifest, cid)
    out = Path(out_dir)

    def on_step(row: dict[str, Any]) -> None:
        if queue is not None:
            queue.put((cid, int(row["step"]) + 1, float(row.get("reward/mean", 0.0))))

    t0 = time.time()
    mode = "processes" if any(p.engine == "vllm" for p in run.spec.rollout.pools) else "inprocess"
    summary = runner(mode)(run, out, on_step=on_step, threads=threads)
    return {"wall_s": time.time() - t0, "steps": summary.get("steps")}


# ------------------------------------------------------------------------------------ the runner
def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def warm_start_dir(out: Path, seed: int) -> Path:
    return out / "warmstart" / f"seed{seed}"


def warm_start_manifest(sweep: DCMDPSweep, seed: int) -> dict[str, Any]:
    """A one-step fp32 GRPO run of the base spec: its ``model/`` folder is the warm-started model."""
    spec = merge(sweep.spec.base, {"algorithm": {"name": "grpo", "seed": seed, "steps": 1, "corrections": []},
                                   "eval": {"everySteps": 0}, "checkpoint": {"everySteps": 0}})
    pool = (spec.get("rollout", {}).get("pools") or [{"name": "engine"}])[0]
    spec.setdefault("rollout", {})["pools"] = [merge(pool, {"precision": "fp32", "lag": 0, "noise": 0.0})]
    return {"apiVersion": "dcmdp.io/v1alpha1", "kind": KIND,
            "metadata": {"name": f"{sweep.metadata.name}-warmstart-s{seed}"[:63]}, "spec": spec}


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
    from dcmdp.metrics import read_metrics

    rows = read_metrics(cell_dir(out, cell) / "metrics.jsonl")
    vals = [r["discrepancy/prob_diff_mean"] for r in rows if isinstance(r.get("discrepancy/prob_diff_mean"), (int, float))]
    return sum(vals) / len(vals) if vals else float("nan")


def resolve_tolerance(out: Path, p: Plan, cell: Cell) -> float:
    """c of a relative cell: factor × mean δ̄ of its finished reference cells (mean over seeds)."""
    assert cell.relative is not None
    refs = [p.cell(d) for d in cell.deps]
    deltas = [mean_delta(out, r) for r in refs if cell_done(out, r, p.steps)]
    deltas = [d for d in deltas if math.isfinite(d)]
    if not deltas:
        raise RuntimeError(f"{cell.id}: no finished reference cell ({cell.relative.relative_to}) to derive c from")
    ref = sum(deltas) / len(deltas)
    c = max(cell.relative.factor * ref, 1e-12)
    calib = out / "calibration.json"
    table = json.loads(calib.read_text()) if calib.exists() else {}
    table.setdefault(cell.source, {})[cell.relative.relative_to] = {"mean_delta": ref, "seeds": len(deltas)}
    table[cell.source].setdefault("tolerance", {})[cell.algorithm] = c
    calib.write_text(json.dumps(table, indent=2))
    return c


class Runner:
    """Schedules the cells of a plan on a pool of worker processes, with a rich progress view."""

    def __init__(self, p: Plan, out: Path, *, parallel: Optional[int] = None, threads: Optional[int] = None,
                 quiet: bool = False, log: Any = None):
        self.p, self.out = p, out
        self.parallel = parallel or p.sweep.spec.parallel
        self.threads = threads or p.sweep.spec.threads
        self.quiet = quiet
        self.log = log or (lambda msg: None)
        self.failed: dict[str, str] = {}
        self.ran = 0
        self.t_start = time.time()

    def run(self) -> dict[str, Any]:
        import multiprocessing as mp

        import sys

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        out, p = self.out, self.p
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(p.sweep.model_dump(mode="json", by_alias=True), indent=2))
        t_start = self.t_start = time.time()
        todo = [c for c in p.cells if not cell_done(out, c, p.steps)]
        seeds_needed = sorted({self.ws_seed(c) for c in todo}) if p.sweep.spec.shared_warm_start else []
        self.warm = [s for s in seeds_needed if not (warm_start_dir(out, s) / "model" / "config.json").exists()]
        self.warm_pending = list(self.warm)
        self.pending = list(todo)
        self.done_ids = {c.id for c in p.cells} - {c.id for c in todo}
        self.running: dict[Future, tuple[str, Any]] = {}
        self.bars: dict[str, Any] = {}
        skipped = len(p.cells) - len(todo)
        ctx = mp.get_context("spawn")
        manager = ctx.Manager()
        self.queue = manager.Queue()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=self.quiet,
                                 console=Console(width=None if sys.stdout.isatty() else 200))
        title = f"[bold]{p.sweep.metadata.name}" + (f" ({p.part})" if p.part else "")
        self.overall = self.progress.add_task(title, total=len(p.cells), completed=skipped,
                                              info=f"{skipped} already done" if skipped else "")
        pool = ProcessPoolExecutor(self.parallel, mp_context=ctx)
        try:
            with self.progress:
                while self.pending or self.warm_pending or self.running:
                    self._submit(pool)
                    if not self.running:
                        for c in self.pending:  # nothing ready, nothing running: unsatisfiable
                            self._fail(c.id, "its reference cells failed")
                        break
                    finished, _ = wait(list(self.running), timeout=0.5, return_when=FIRST_COMPLETED)
                    self._drain()
                    for fut in finished:
                        self._collect(fut)
        except BaseException:
            # interrupted (Ctrl-C, SIGTERM): stop the running cells now instead of waiting for them;
            # they restart from scratch on the next invocation
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            manager.shutdown()
            self._state(time.time() - t_start, self.ran)
            raise
        pool.shutdown()
        manager.shutdown()
        wall = time.time() - t_start
        state = self._state(wall, self.ran)
        return {"cells": len(p.cells), "ran": self.ran, "skipped": skipped,
                "failed": dict(self.failed), "wall_s": wall, "total_wall_s": state["total_wall_s"]}

    def _submit(self, pool: ProcessPoolExecutor) -> None:
        """Start warm starts, then ready cells, until ``parallel`` are running."""
        out, p = self.out, self.p
        while len(self.running) < self.parallel and (self.warm_pending or self.pending):
            if self.warm_pending:
                seed = self.warm_pending.pop(0)
                d = warm_start_dir(out, seed)
                shutil.rmtree(d, ignore_errors=True)
                cid = f"warmstart/seed{seed}"
                fut = pool.submit(_worker_run, warm_start_manifest(p.sweep, seed), str(d), self.threads, None, cid)
                self.running[fut] = (cid, seed)
                self.bars[cid] = self.progress.add_task(f"  warm start seed {seed}", total=1, info="")
                continue
            cell = self._next_ready()
            if cell is None:
                return
            self.pending.remove(cell)
            try:
                manifest = self._finalise(cell)
            except RuntimeError as exc:
                self._fail(cell.id, str(exc))
                continue
            d = cell_dir(out, cell)
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            (d / "run.yaml").write_text(yamlfile.dumps(manifest))
            fut = pool.submit(_worker_run, manifest, str(d), self.threads, self.queue, cell.id)
            self.running[fut] = (cell.id, cell)
            self.bars[cell.id] = self.progress.add_task(f"  {cell.id}", total=p.steps, info="")

    def _collect(self, fut: Future) -> None:
        """A worker finished: record the cell (or the warm start), or its failure."""
        cid, what = self.running.pop(fut)
        self.progress.remove_task(self.bars.pop(cid))
        err = fut.exception()
        if isinstance(what, int):  # a warm start
            self.warm.remove(what)
            if err is not None:
                self._fail(cid, repr(err), count=False)
                for c in [c for c in self.pending if self.ws_seed(c) == what]:
                    self.pending.remove(c)
                    self._fail(c.id, f"the warm start of seed {what} failed")
            return
        if err is not None:
            self._fail(cid, repr(err))
            return
        res = fut.result()
        info = self._finish(what, res)
        self.done_ids.add(cid)
        self.ran += 1
        self._state(time.time() - self.t_start, self.ran, running=True)
        self.progress.advance(self.overall)
        self.progress.update(self.overall, info=f"last: {cid} {res['wall_s']:.0f}s")
        self.progress.console.print(
            f"{time.strftime('%H:%M:%S')} done {cid}: {res['wall_s']:.0f} s, greedy {_num(info.get('greedy'))}, "
            f"sampled {_num(info.get('sampled'))}, δ̄ {_num(info.get('delta_mean'), '.2e')}"
            + (", collapsed" if info.get("collapsed") else ""))

    # -- helpers ---------------------------------------------------------------------------
    def ws_seed(self, cell: Cell) -> int:
        """The seed of the warm start a cell starts from."""
        ws = self.p.sweep.spec.warm_start_seed
        return cell.seed if ws is None else ws

    def _next_ready(self) -> Optional[Cell]:
        for c in self.pending:
            if self.ws_seed(c) in self.warm:
                continue
            if all(d in self.done_ids for d in c.deps):
                return c
        return None

    def _finalise(self, cell: Cell) -> dict[str, Any]:
        m = copy.deepcopy(cell.manifest)
        spec = m["spec"]
        if self.p.sweep.spec.shared_warm_start:
            folder = (warm_start_dir(self.out, self.ws_seed(cell)) / "model").resolve()
            spec["model"] = merge(spec.get("model", {}), {"path": str(folder), "warmStart": {"steps": 0}})
        if cell.relative is not None:
            spec["algorithm"]["constraint"]["tolerance"] = resolve_tolerance(self.out, self.p, cell)
        parse_run(m, cell.id)
        return m

    def _finish(self, cell: Cell, res: dict[str, Any]) -> dict[str, Any]:
        from dcmdp.sweep_report import cell_metrics

        d = cell_dir(self.out, cell)
        info = {"source": cell.source, "algorithm": cell.algorithm, "seed": cell.seed, "steps": res["steps"],
                "wall_s": res["wall_s"]}
        info.update(cell_metrics(d, self.p.sweep.spec.collapse))
        if res["steps"] == self.p.steps:
            # the sweep reads metrics/eval/summary only: drop the checkpoint (all lagged weight
            # versions) and the copy of the warm-started model, which are megabytes per cell
            for heavy in ("checkpoints", "model"):
                shutil.rmtree(d / heavy, ignore_errors=True)
            (d / "cell.json").write_text(json.dumps(info, indent=2))
        else:
            self._fail(cell.id, f"stopped after {res['steps']} of {self.p.steps} steps")
        return info

    def _fail(self, cid: str, why: str, count: bool = True) -> None:
        """Record a failure; a failed cell counts as settled (its dependents use the other seeds)."""
        if count:
            self.done_ids.add(cid)
            self.progress.advance(self.overall)
        self.failed[cid] = why
        self.log(f"cell {cid} failed: {why}")
        with (self.out / "failures.jsonl").open("a") as fh:
            fh.write(json.dumps({"cell": cid, "error": why, "time": time.time()}) + "\n")

    def _drain(self) -> None:
        """Move the running cells' bars to their latest step (the workers report every step)."""
        latest: dict[str, tuple[int, float]] = {}
        while True:
            try:
                cid, step, reward = self.queue.get_nowait()
            except Exception:  # queue.Empty (through the manager proxy)
                break
            latest[cid] = (step, reward)
        for cid, (step, reward) in latest.items():
            if cid in self.bars:
                self.progress.update(self.bars[cid], completed=step, info=f"reward {reward:.2f}")

    def _state(self, wall: float, ran: int, running: bool = False) -> dict[str, Any]:
        """Record this invocation's wall time in state.json (updated as cells finish, so a report
        written while the grid runs shows the time so far)."""
        f = self.out / "state.json"
        state = json.loads(f.read_text()) if f.exists() else {"invocations": []}
        entry = {"started": self.t_start, "part": self.p.part, "wall_s": wall, "cells_run": ran, "running": running,
                 "parallel": self.parallel, "threads": self.threads, "cpus": os.cpu_count()}
        state["invocations"] = [i for i in state["invocations"] if i.get("started") != self.t_start] + [entry]
        state["total_wall_s"] = sum(i["wall_s"] for i in state["invocations"])
        f.write_text(json.dumps(state, indent=2))
        return state


def default_out(sweep: DCMDPSweep, part: Optional[str], steps: Optional[int] = None) -> Path:
    """The cell folder: one for the whole grid and all its parts (a cell's id is unique in the grid,
    so parts share their reference cells); the quick grid and --steps overrides get their own."""
    suffix = "-quick" if part == "quick" else ""
    suffix += f"-steps{steps}" if steps else ""
    return Path("runs") / "sweeps" / (sweep.metadata.name + suffix)


# ----------------------------------------------------------------------------------------- CLI
def _filter(p: Plan, only: Optional[str]) -> Plan:
    """Keep the cells matching any ``SOURCE/ALGORITHM`` pattern (``*`` matches all), plus their
    reference cells (a relative c needs them)."""
    if not only:
        return p
    pats = []
    for part in only.split(","):
        src, _, algo = part.strip().partition("/")
        if not src or not algo:
            raise SpecError([("--only", f"{part!r}: expected SOURCE/ALGORITHM (either may be *)")], "command line")
        pats.append((src, algo))
    for src, algo in pats:
        if src != "*" and src not in {s.name for s in p.sources}:
            raise SpecError([("--only", f"unknown source {src!r}")], "command line")
        if algo != "*" and algo not in {a.name for a in p.algorithms}:
            raise SpecError([("--only", f"unknown algorithm {algo!r}")], "command line")
    keep = {c.id for c in p.cells if any(s in ("*", c.source) and a in ("*", c.algorithm) for s, a in pats)}
    keep |= {d for c in p.cells if c.id in keep for d in c.deps}
    cells = [c for c in p.cells if c.id in keep]
    used_s = {c.source for c in cells}
    used_a = {c.algorithm for c in cells}
    return Plan(p.sweep, p.steps, p.seeds, [s for s in p.sources if s.name in used_s],
                [a for a in p.algorithms if a.name in used_a], cells, p.eval_every, p.part)


def sweep_main(args: Any) -> int:
    import shlex
    import sys

    from rich.console import Console

    from dcmdp.sweep_report import write_report

    console = Console(stderr=True)
    sweep = load_sweep(args.file)
    if args.steps is not None and args.steps < 1:
        raise SpecError([("--steps", "must be >= 1")], "command line")
    if args.quick and args.part:
        raise SpecError([("--part", "give --quick or --part, not both")], "command line")
    part = "quick" if args.quick else args.part
    p = _filter(plan(sweep, part=part, source=args.file, steps=args.steps), args.only)
    out = Path(args.out) if args.out else default_out(sweep, part, args.steps)
    if args.dry_run:
        for c in p.cells:
            mark = "done" if cell_done(out, c, p.steps) else ("after " + ", ".join(c.deps) if c.deps else "ready")
            print(f"{c.id:50s} {mark}")
        print(f"{len(p.cells)} cells, {p.steps} steps each, out {out}")
        return 0
    official = not (args.quick or args.only or args.steps) and sweep.spec.report is not None
    here = Path(args.file).parent
    if args.report_dir:
        dest = Path(args.report_dir)
    elif official:
        dest = here / sweep.spec.report.dir / (part or "all")
    else:
        dest = out / "report"
    doc = here / sweep.spec.report.doc if official and sweep.spec.report.doc and not args.no_doc else None
    # the command that (re)produces the report: as typed, less the flags that only change the view
    if sys.argv[1:2] == ["sweep"]:
        argv = [a for a in sys.argv[2:] if a not in ("--report-only", "--quiet", "--no-doc")]
        command = "dcmdp sweep " + " ".join(shlex.quote(a) for a in argv)
    else:
        command = f"dcmdp sweep -f {args.file}" + (" --quick" if args.quick else f" --part {part}" if part else "")
    if not args.report_only:
        import signal

        def _stop(signum: int, frame: Any) -> None:  # `kill PID` stops the workers too
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
        res = Runner(p, out, parallel=args.parallel, threads=args.threads, quiet=args.quiet,
                     log=lambda m: console.print(f"[red]{m}")).run()
        console.print(f"{res['ran']} cells run, {res['skipped']} already done, {len(res['failed'])} failed; "
                      f"{res['wall_s'] / 60:.1f} min (total {res['total_wall_s'] / 60:.1f} min)")
    data = write_report(out, p, dest, doc, command)
    console.print(f"report: {dest}" + (f"; section of {doc} rewritten" if doc else "") +
                  f" ({len(data['cells'])} of {len(p.cells)} cells finished)")
    from dcmdp.sweep_report import table_markdown

    print(table_markdown(p, data, "greedy"))
    return 1 if (not args.report_only and res["failed"]) else 0
