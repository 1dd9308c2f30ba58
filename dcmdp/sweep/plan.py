"""The grid as cells: each (source, algorithm, seed) a validated ``DCMDPRun`` manifest, reference
cells (for a relative tolerance) first; loading a sweep file plans every part to validate it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import ValidationError

from dcmdp import yamlfile
from dcmdp.spec import KIND, SpecError, parse_run, validation_errors
from dcmdp.sweep.spec import AlgorithmEntry, DCMDPSweep, RelativeTolerance, SourceSpec

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
        raise SpecError(validation_errors(exc, DCMDPSweep), source) from None
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
        for seed in seeds:
            for algo in ordered:
                if algo.sources is not None and src.name not in algo.sources:
                    continue
                m = cell_manifest(sweep, src, algo, seed, n_steps, eval_every)
                try:
                    parse_run(m, f"cell {src.name}/{algo.name}/seed{seed}")
                except SpecError as exc:
                    raise SpecError([(f"cell {src.name} × {algo.name}: {p}", msg) for p, msg in exc.errors],
                                    source) from None
                deps = ([f"{src.name}/{algo.tolerance.relative_to}/seed{k}" for k in seeds]
                        if algo.tolerance else [])
                cells.append(Cell(src.name, algo.name, seed, m, algo.tolerance, deps))
    # source by source, then seed by seed (a grid stopped early has every row at the same seeds),
    # reference algorithms first (the scheduler fills in cells that do not wait for a calibration
    # while the references run), so the table fills column by column
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


def warm_start_manifest(sweep: DCMDPSweep, seed: int) -> dict[str, Any]:
    """A one-step fp32 GRPO run of the base spec: its ``model/`` folder is the warm-started model."""
    spec = merge(sweep.spec.base, {"algorithm": {"name": "grpo", "seed": seed, "steps": 1, "corrections": []},
                                   "eval": {"everySteps": 0}, "checkpoint": {"everySteps": 0}})
    pool = (spec.get("rollout", {}).get("pools") or [{"name": "engine"}])[0]
    spec.setdefault("rollout", {})["pools"] = [merge(pool, {"precision": "fp32", "lag": 0, "noise": 0.0})]
    return {"apiVersion": "dcmdp.io/v1alpha1", "kind": KIND,
            "metadata": {"name": f"{sweep.metadata.name}-warmstart-s{seed}"[:63]}, "spec": spec}


def kind_of(p: Plan, algo: AlgorithmEntry) -> str:
    """grpo | passive (tis/mis/icepop) | dc (dc-grpo alone) | dc+passive (dc-grpo with corrections)."""
    base = p.sweep.spec.base.get("algorithm", {})
    name = algo.algorithm.get("name") or base.get("name", "dc-grpo")
    kind = {"grpo": "grpo", "tis": "passive", "mis": "passive", "icepop": "passive"}.get(name, "dc")
    if kind == "dc" and (algo.algorithm.get("corrections") or base.get("corrections")):
        kind = "dc+passive"
    return kind


def filter_cells(p: Plan, only: Optional[str]) -> Plan:
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
