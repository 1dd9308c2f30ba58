"""The run's status: one typed model, :class:`RunStatus`, of what the operator writes to a
``DCMDPRun``'s ``.status``; its phases and condition types; and which of its fields the trainer
reports through ``GetStatus`` (``dcmdp/proto/dcmdp.proto``, the proto field named in each field's
``x-trainer``).

Derived from it: the CRD's status schema (``dcmdp.crd``), the operator's mapping from the
trainer's ``Status`` message to ``.status`` (:data:`TRAINER_FIELDS`, :data:`POOL_FIELDS`). A value
the trainer does not know yet (no step finished, ``tolerance: auto`` still calibrating, no
constraint) is absent on the wire (proto3 ``optional``) and absent from ``.status``, never 0.

λ with two or more rollout pools: each pool has its own multiplier, applied to the tokens that
pool generated (``pools[].lambda``, with its δ̄ and c). ``runLambda`` is the run-level multiplier,
the same dual step on the whole batch's δ̄ against the run's c: with one pool it is that pool's λ;
with more it is applied to no token (a diagnostic). ``lambdas`` lists the applied ones for humans
and ``kubectl get``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})  # final: nothing runs any more
CONDITION_TYPES = ("Ready", "Progressing", "Succeeded", "Failed", "Suspended", "Reconciling", "Stalled")


def _trainer(proto_field: str) -> dict[str, Any]:
    """Field metadata: the trainer reports this field as ``proto_field`` of its Status message."""
    return {"x-trainer": proto_field}


class StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class Condition(StatusModel):
    """A kstatus-compatible condition (the shape of metav1.Condition)."""

    type: str = Field(..., min_length=1, max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: Optional[str] = Field(None, max_length=1024)
    message: Optional[str] = Field(None, max_length=32_768)
    last_transition_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})
    observed_generation: Optional[int] = Field(None, ge=0)


class PoolStatus(StatusModel):
    """One rollout pool as the trainer sees it."""

    name: str = Field(..., min_length=1)
    prob_diff_mean: Optional[float] = Field(None, description="δ̄ = mean |p_train − p_inf| of the pool's tokens in the last step.",
                                            json_schema_extra=_trainer("prob_diff_mean"))
    # ``lambda`` is a Python keyword: the field is ``lambda_`` with the alias ``lambda``.
    lambda_: Optional[float] = Field(None, alias="lambda", description="The λ applied to the pool's tokens in the last step.",
                                     json_schema_extra=_trainer("lambda"))
    tolerance: Optional[float] = Field(None, description="The pool's c (absent while `auto` calibrates).",
                                       json_schema_extra=_trainer("tolerance"))
    tokens: Optional[int] = Field(None, ge=0, description="Response tokens received from the pool.",
                                  json_schema_extra=_trainer("tokens"))
    workers: Optional[int] = Field(None, ge=0, description="Workers of the pool holding a lease.",
                                   json_schema_extra=_trainer("workers"))
    reward: Optional[float] = Field(None, description="Mean reward of the pool's rollouts.",
                                    json_schema_extra=_trainer("reward_mean"))
    replicas: Optional[int] = Field(None, ge=0, description="Desired replicas of the pool's Deployment.")
    ready_replicas: Optional[int] = Field(None, ge=0)


class RunStatus(StatusModel):
    """Written by the operator only; the spec is never written by it (GitOps safe)."""

    phase: Optional[str] = Field(None, description=f"One of {', '.join(PHASES)}.")
    reason: Optional[str] = Field(None, description="Why the run is in its phase (CamelCase).")
    message: Optional[str] = None
    observed_generation: Optional[int] = Field(None, ge=0)
    conditions: list[Condition] = Field(default_factory=list)
    step: Optional[int] = Field(None, ge=0, description="Last finished training step.", json_schema_extra=_trainer("step"))
    total_steps: Optional[int] = Field(None, ge=0, json_schema_extra=_trainer("total_steps"))
    weight_version: Optional[int] = Field(None, ge=0, description="Weight version the trainer publishes.",
                                          json_schema_extra=_trainer("weight_version"))
    reward: Optional[float] = Field(None, description="Mean reward of the last step.", json_schema_extra=_trainer("reward_mean"))
    prob_diff_mean: Optional[float] = Field(None, description="δ̄ of the last step, over the tokens of all pools.",
                                            json_schema_extra=_trainer("prob_diff_mean"))
    run_lambda: Optional[float] = Field(
        None, description="The run-level multiplier (dual step on the whole batch's δ̄ and the run's c): the pool's λ "
                          "with one pool; with more, applied to no token (see pools[].lambda).",
        json_schema_extra=_trainer("run_lambda"))
    lambdas: Optional[str] = Field(None, description="Each pool's applied λ, for humans (`bf16=0.144 int8=0.118`).")
    tolerance: Optional[float] = Field(None, description="The run's c (absent while `auto` calibrates); a pool's own "
                                                         "c is pools[].tolerance.", json_schema_extra=_trainer("tolerance"))
    pools: list[PoolStatus] = Field(default_factory=list)
    restarts: Optional[int] = Field(None, ge=0, description="Trainer restarts counted by the failure policy.")
    checkpoint_step: Optional[int] = Field(None, ge=0, description="Step of the newest checkpoint.",
                                           json_schema_extra=_trainer("checkpoint_step"))
    progress: Optional[str] = Field(None, description="step/totalSteps, for humans.")
    eval_accuracy: Optional[float] = Field(None, description="Held-out accuracy of the last evaluation.",
                                           json_schema_extra=_trainer("eval_accuracy"))
    trainer_reachable: Optional[bool] = Field(None, description="Whether the trainer's status RPC answered.")
    last_trainer_update: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})
    refused_changes: Optional[list[str]] = Field(None, description="Spec fields that cannot change on a live run.")
    start_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})
    completion_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})


def trainer_fields(model: type[StatusModel]) -> dict[str, str]:
    """{proto field of the trainer's message: status field (camelCase)} for the fields of ``model``
    that the trainer reports."""
    out = {}
    for name, f in model.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if "x-trainer" in extra:
            out[str(extra["x-trainer"])] = f.alias or name
    return out


TRAINER_FIELDS = trainer_fields(RunStatus)
POOL_FIELDS = trainer_fields(PoolStatus)


def lambdas_text(pools: list[dict[str, Any]]) -> Optional[str]:
    """``bf16=0.144 int8=0.118``: each pool's applied λ (status pools, camelCase keys), None when
    no pool reports one."""
    parts = [f"{p['name']}={p['lambda']:.3g}" for p in pools if isinstance(p.get("lambda"), (int, float))]
    return " ".join(parts) or None
