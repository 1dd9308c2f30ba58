"""The ``DCMDPSweep`` model: a base run, mismatch sources, algorithms, seeds, parts, the report."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from dcmdp.spec import DNS_LABEL

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
    metric: Literal["greedy", "sampled", "engine-greedy"] = Field(
        "greedy", description="The accuracy the headline ranks and differences by: the trainer's greedy, or the "
        "engine's sampled or greedy one (where the engine is the deployment, e.g. an int4 pool).")


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
