"""The status snapshot: what the trainer reports through ``GetStatus``, as the typed
:class:`dcmdp.status.RunStatus` (extended by the fields only the trainer knows: leases, workers),
and its mapping to the wire (``Status`` of ``dcmdp/proto/dcmdp.proto``).

The field list is written once: a field the operator copies names its proto field in
``x-trainer`` (``dcmdp/status.py``); the trainer-only fields below do the same, and a field
without it travels under its own name (``phase``, ``message``). :func:`to_proto` walks the proto
descriptor, so a proto field without a model field fails at import. A value not known yet (no
step finished, no constraint, ``tolerance: auto`` still calibrating, no evaluation) is None in
the model and absent on the wire (proto3 ``optional``), never 0.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel, Field

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.status import PoolStatus, RunStatus
from dcmdp_trainer.run_state import RunState


def _wire(proto_field: str) -> dict[str, Any]:
    return {"x-trainer": proto_field}


class WorkerInfo(BaseModel):
    """One registered rollout worker (proto ``WorkerInfo``)."""

    worker_id: str
    pool: str
    weight_version: int = Field(..., description="The version the worker said it holds (-1: none yet).")
    last_seen_unix_ms: int = Field(..., ge=0)
    leases: int = Field(..., ge=0, description="Leases the worker holds now.")


class TrainerPoolStatus(PoolStatus):
    """A pool as the trainer reports it: :class:`PoolStatus` and the pool's staleness figures."""

    version_lag_mean: float = Field(0.0, description="Mean weight-version lag of the pool's rollouts in "
                                                             "the last step.", json_schema_extra=_wire("version_lag_mean"))
    rollouts_dropped_stale: int = Field(0, ge=0, description="Samples of the pool dropped as stale, in all.",
                                        json_schema_extra=_wire("rollouts_dropped_stale"))


class TrainerStatus(RunStatus):
    """What ``GetStatus`` reports: :class:`RunStatus` and the trainer's lease book and workers."""

    run_name: str = Field("", json_schema_extra=_wire("run_name"))
    pools: list[TrainerPoolStatus] = Field(default_factory=list)  # type: ignore[assignment]
    queue_depth: int = Field(0, ge=0, description="Prompts whose group is in, waiting for their step.",
                             json_schema_extra=_wire("queue_depth"))
    leases_outstanding: int = Field(0, ge=0, json_schema_extra=_wire("leases_outstanding"))
    leases_expired: int = Field(0, ge=0, json_schema_extra=_wire("leases_expired"))
    rollouts_dropped_stale: int = Field(0, ge=0, json_schema_extra=_wire("rollouts_dropped_stale"))
    workers: list[WorkerInfo] = Field(default_factory=list)
    finished: bool = Field(False, json_schema_extra=_wire("finished"))
    updated_unix_ms: int = Field(0, ge=0, json_schema_extra=_wire("updated_unix_ms"))


def known(row: dict[str, Any], key: str) -> Optional[float]:
    """``row[key]`` as a float when it is a finite number, else None (absent, None or NaN)."""
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def pool_status(name: str, row: dict[str, Any], *, workers: int, lag: float, dropped: int) -> TrainerPoolStatus:
    """Pool ``name`` from the last step's metrics ``row`` (``pool/<name>/…`` keys, metrics.md),
    its registered ``workers``, mean version ``lag`` and ``dropped`` stale samples."""
    return TrainerPoolStatus(
        name=name, prob_diff_mean=known(row, f"pool/{name}/discrepancy/prob_diff_mean"),
        lambda_=known(row, f"pool/{name}/constraint/lambda"), tolerance=known(row, f"pool/{name}/constraint/tolerance"),
        tokens=int(row.get(f"pool/{name}/discrepancy/tokens") or 0), workers=workers,
        reward=known(row, f"pool/{name}/reward/mean"), version_lag_mean=lag, rollouts_dropped_stale=dropped)


def snapshot(state: RunState, *, run_name: str, weight_version: int, pools: list[TrainerPoolStatus],
             queue_depth: int = 0, leases_outstanding: int = 0, leases_expired: int = 0,
             rollouts_dropped_stale: int = 0, workers: Optional[list[WorkerInfo]] = None) -> TrainerStatus:
    """The trainer's status from the loop's ``state`` (a consistent copy: :meth:`RunState.copy`)
    and the rollout source's figures."""
    row = state.last_row
    return TrainerStatus(
        run_name=run_name, phase=state.phase, message=state.message, step=state.step, total_steps=state.total_steps,
        weight_version=weight_version, reward=known(row, "reward/mean"),
        prob_diff_mean=known(row, "discrepancy/prob_diff_mean"), run_lambda=known(row, "constraint/run_lambda"),
        tolerance=known(row, "constraint/tolerance"), pools=pools, queue_depth=queue_depth,
        leases_outstanding=leases_outstanding, leases_expired=leases_expired,
        rollouts_dropped_stale=rollouts_dropped_stale, workers=workers or [], finished=state.finished,
        checkpoint_step=state.checkpoint_step, eval_accuracy=state.eval_accuracy,
        updated_unix_ms=int(state.updated * 1000))


def _attributes(model: type[BaseModel], message: Any) -> dict[str, str]:
    """{proto field: model attribute} for every scalar field of ``message`` (a proto class), by
    ``x-trainer`` or by name; raises TypeError naming a proto field the model lacks."""
    by_proto = {}
    for name, f in model.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        by_proto[str(extra.get("x-trainer", name))] = name
    out = {}
    for fd in message.DESCRIPTOR.fields:
        if fd.message_type is None and not fd.is_repeated:
            if fd.name not in by_proto:
                raise TypeError(f"proto {message.DESCRIPTOR.name}.{fd.name} has no field in {model.__name__}")
            out[fd.name] = by_proto[fd.name]
    return out


STATUS_ATTRIBUTES = _attributes(TrainerStatus, pb.Status)
POOL_ATTRIBUTES = _attributes(TrainerPoolStatus, pb.PoolStatus)
WORKER_ATTRIBUTES = _attributes(WorkerInfo, pb.WorkerInfo)


def _scalars(obj: BaseModel, attributes: dict[str, str]) -> dict[str, Any]:
    # None (not known yet) leaves an optional field unset: absent on the wire
    return {p: getattr(obj, a) for p, a in attributes.items() if getattr(obj, a) is not None}


def to_proto(status: TrainerStatus) -> pb.Status:
    """The ``Status`` message of ``status`` (its header names the weight version)."""
    return pb.Status(header=pb.Header(weight_version=status.weight_version or 0),
                     pools=[pb.PoolStatus(**_scalars(p, POOL_ATTRIBUTES)) for p in status.pools],
                     workers=[pb.WorkerInfo(**_scalars(w, WORKER_ATTRIBUTES)) for w in status.workers],
                     **_scalars(status, STATUS_ATTRIBUTES))
