"""A run's status from what the operator observed. Pure: no I/O, the clock is an argument.

Inputs: the trainer Job and the pool Deployments as the API server has them, the trainer's own
status (its ``GetStatus`` RPC, or None while it cannot be reached), the refused spec changes, an
error (invalid spec, name conflict), the previous status and the run's ``metadata.generation``.

Phases: Pending → Running → Succeeded | Failed; Suspended while ``spec.suspend``. Succeeded and
Failed are final. Conditions ``Ready`` (true while Running with its pools ready, and once
Succeeded), ``Progressing``, ``Succeeded``, ``Failed``, ``Suspended``, and kstatus's ``Reconciling``
(Pending or Running) and ``Stalled`` (Failed, or a spec the operator cannot carry out) have the shape of ``metav1.Condition`` (type, status, reason, message, lastTransitionTime,
observedGeneration); ``lastTransitionTime`` moves only when a condition's status flips. Numbers the
trainer reports (step, reward, δ̄, λ, per-pool figures; which ones: ``dcmdp.status``) keep their
last known value while the trainer cannot be reached.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any, Optional

from dcmdp.spec import DCMDPRun
from dcmdp.status import POOL_FIELDS, TERMINAL_PHASES, TRAINER_FIELDS, lambdas_text

# Ready reasons that wait for a person, not for time (kstatus: Stalled).
STALLED_REASONS = frozenset({"InvalidSpec", "SpecChangeRefused", "ChildConflict", "ChildRejected"})


@dataclasses.dataclass
class Observed:
    """What one reconcile saw."""

    job: Optional[dict[str, Any]] = None
    deployments: dict[str, Optional[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    trainer: Optional[dict[str, Any]] = None  # GetStatus (proto field names), None = unreachable
    trainer_error: Optional[str] = None
    refused: list[str] = dataclasses.field(default_factory=list)
    error: Optional[tuple[str, str]] = None  # (reason, message): InvalidSpec, ChildConflict, ...


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Significant digits of the figures the status shows (printer columns print a float whole:
# `0.001014180634790906`); the exact values are in the metrics.
SIGNIFICANT_DIGITS = 4


def _number(v: Any) -> Any:
    """A reported figure as the status shows it: a float rounded to :data:`SIGNIFICANT_DIGITS`
    significant digits (None when not finite), anything else as is."""
    if isinstance(v, float):
        return float(f"{v:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(v) else None
    return v


def _job_condition(job: Optional[dict[str, Any]], ctype: str) -> Optional[dict[str, Any]]:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c
    return None


def restarts(job: Optional[dict[str, Any]]) -> int:
    """Trainer restarts: failed trainer pods (restartPolicy Never: each failure is a new pod)."""
    return int(((job or {}).get("status") or {}).get("failed") or 0)


def _phase(
    run: Optional[DCMDPRun], obs: Observed, previous: dict[str, Any]
) -> tuple[str, str, str]:
    """(phase, reason, message)."""
    prev = previous.get("phase")
    if prev in TERMINAL_PHASES and previous.get("reason") != "InvalidSpec":  # a fixed spec can still run
        return prev, previous.get("reason") or prev, previous.get("message") or ""
    if obs.error is not None and obs.error[0] == "ReconcileError":
        # Nothing was observed: the phase stays what it was; Ready carries the error.
        return prev or "Pending", previous.get("reason") or "ReconcileError", previous.get("message") or obs.error[1]
    if obs.error is not None and (run is None or obs.error[0] == "InvalidSpec"):
        return "Failed", obs.error[0], obs.error[1]
    assert run is not None
    trainer = obs.trainer or {}
    failed = restarts(obs.job)
    max_restarts = run.spec.failure_policy.max_restarts
    job_failed = _job_condition(obs.job, "Failed")
    if failed > max_restarts:
        return "Failed", "TooManyRestarts", f"the trainer failed {failed} times (failurePolicy.maxRestarts: {max_restarts})"
    if job_failed is not None:
        return "Failed", "TrainerFailed", job_failed.get("message") or job_failed.get("reason") or "the trainer Job failed"
    if trainer.get("phase") == "Failed":
        return "Failed", "TrainerFailed", trainer.get("message") or "the trainer reported a failure"
    if _job_condition(obs.job, "Complete") is not None or trainer.get("phase") == "Succeeded":
        steps = trainer.get("step") or previous.get("step")
        return "Succeeded", "Completed", f"training finished after {steps} steps" if steps else "training finished"
    if run.spec.suspend:
        return "Suspended", "Suspended", "spec.suspend is true: trainer and rollout pools are scaled to zero"
    job_status = (obs.job or {}).get("status") or {}
    if int(job_status.get("active") or 0) > 0 or int(job_status.get("ready") or 0) > 0:
        if obs.trainer is not None:
            return "Running", "Training", f"step {trainer.get('step', 0)}/{trainer.get('total_steps', run.spec.algorithm.steps)}"
        if previous.get("lastTrainerUpdate"):
            return "Running", "TrainerUnreachable", (
                f"trainer pods are running; its status endpoint stopped answering (last update "
                f"{previous['lastTrainerUpdate']})")
        return "Running", "TrainerStarting", "trainer pods are running; its status endpoint is not answering yet"
    return "Pending", "WaitingForTrainer", "waiting for the trainer pods to start"


def _pools(run: DCMDPRun, obs: Observed, previous: dict[str, Any]) -> list[dict[str, Any]]:
    prev = {p.get("name"): p for p in previous.get("pools") or [] if isinstance(p, dict)}
    reported = {p.get("name"): p for p in (obs.trainer or {}).get("pools") or []}
    out = []
    for pool in run.spec.rollout.pools:
        item: dict[str, Any] = {"name": pool.name}
        dep = obs.deployments.get(pool.name)
        dep_spec = (dep or {}).get("spec") or {}
        dep_status = (dep or {}).get("status") or {}
        item["replicas"] = int(dep_spec.get("replicas", 0) or 0)
        item["readyReplicas"] = int(dep_status.get("readyReplicas") or 0)
        if pool.name in reported:
            for src, dst in POOL_FIELDS.items():
                if src in reported[pool.name]:
                    item[dst] = _number(reported[pool.name][src])
        else:
            for dst in POOL_FIELDS.values():
                if dst in prev.get(pool.name, {}):
                    item[dst] = prev[pool.name][dst]
        out.append({k: v for k, v in item.items() if v is not None})
    return out


def _condition(
    ctype: str, true: bool, reason: str, message: str, previous: dict[str, Any], generation: Optional[int], now: str
) -> dict[str, Any]:
    status = "True" if true else "False"
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == ctype), None)
    moved = old is None or old.get("status") != status
    cond = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if moved else old.get("lastTransitionTime", now),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def compute(
    run: Optional[DCMDPRun],
    obs: Observed,
    previous: Optional[dict[str, Any]],
    generation: Optional[int],
    now: dt.datetime,
) -> dict[str, Any]:
    """The new ``status`` (every field the operator owns; absent ones are None, for a merge patch)."""
    previous = dict(previous or {})
    ts = timestamp(now)
    gen = generation if generation is not None else previous.get("observedGeneration")
    phase, reason, message = _phase(run, obs, previous)

    out: dict[str, Any] = {"phase": phase, "reason": reason, "message": message, "observedGeneration": gen}
    # trainer figures: the fresh ones, else the last known ones
    trainer = obs.trainer
    for src, dst in TRAINER_FIELDS.items():
        if trainer is not None and src in trainer:
            out[dst] = _number(trainer[src])
        else:
            out[dst] = previous.get(dst)
    if out.get("totalSteps") in (None, 0) and run is not None:
        out["totalSteps"] = run.spec.algorithm.steps
    if out.get("step") is not None and out.get("totalSteps"):
        out["progress"] = f"{out['step']}/{out['totalSteps']}"
    else:
        out["progress"] = previous.get("progress")
    if trainer is not None and trainer.get("updated_unix_ms"):
        out["lastTrainerUpdate"] = timestamp(dt.datetime.fromtimestamp(trainer["updated_unix_ms"] / 1000, dt.timezone.utc))
    else:
        out["lastTrainerUpdate"] = previous.get("lastTrainerUpdate")
    out["trainerReachable"] = trainer is not None
    out["restarts"] = max(restarts(obs.job), int(previous.get("restarts") or 0)) if obs.job is not None else int(previous.get("restarts") or 0)
    out["pools"] = _pools(run, obs, previous) if run is not None else previous.get("pools")
    out["lambdas"] = lambdas_text(out["pools"] or [])
    out["refusedChanges"] = list(obs.refused) or None

    # times
    out["startTime"] = previous.get("startTime") or (ts if phase == "Running" else None)
    out["completionTime"] = (previous.get("completionTime") or ts) if phase in TERMINAL_PHASES else None

    # conditions
    pools_ready = all(p.get("readyReplicas", 0) >= p.get("replicas", 0) for p in out["pools"] or [])
    if obs.refused:
        ready = (False, "SpecChangeRefused", "these fields cannot change on a live run (revert them or create a "
                 f"new run): {', '.join(obs.refused)}")
    elif obs.error is not None:
        ready = (False, obs.error[0], obs.error[1])
    elif phase == "Succeeded":
        ready = (True, reason, message)  # done: what the spec asked for is there (kstatus: Current)
    elif phase != "Running":
        ready = (False, reason, message)
    elif trainer is None:
        ready = (False, "TrainerUnreachable", obs.trainer_error or "the trainer's status endpoint does not answer")
    elif not pools_ready:
        ready = (False, "PoolsNotReady", ", ".join(
            f"{p['name']} {p.get('readyReplicas', 0)}/{p.get('replicas', 0)}" for p in out["pools"]
            if p.get("readyReplicas", 0) < p.get("replicas", 0)) + " replicas ready")
    else:
        ready = (True, "Ready", message)
    progressing = phase in ("Pending", "Running")
    # kstatus (Flux's health checks): Reconciling true -> InProgress, Stalled true -> Failed, else
    # Current once observedGeneration is the generation.
    stalled = phase == "Failed" or (not ready[0] and ready[1] in STALLED_REASONS)
    conds = [
        _condition("Ready", *ready, previous, gen, ts),
        _condition("Progressing", progressing, reason if progressing else phase, message if progressing else "", previous, gen, ts),
        _condition("Succeeded", phase == "Succeeded", reason if phase == "Succeeded" else "NotSucceeded",
                   message if phase == "Succeeded" else "", previous, gen, ts),
        _condition("Failed", phase == "Failed", reason if phase == "Failed" else "NotFailed",
                   message if phase == "Failed" else "", previous, gen, ts),
        _condition("Suspended", phase == "Suspended", "Suspended" if phase == "Suspended" else "NotSuspended",
                   message if phase == "Suspended" else "", previous, gen, ts),
        _condition("Reconciling", progressing and not stalled, reason if progressing else phase,
                   message if progressing and not stalled else "", previous, gen, ts),
        _condition("Stalled", stalled, ready[1] if stalled else "NotStalled", ready[2] if stalled else "",
                   previous, gen, ts),
    ]
    out["conditions"] = conds
    return out


def transitions(previous: Optional[dict[str, Any]], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Kubernetes Events for what changed: (type Normal|Warning, reason, message)."""
    previous = previous or {}
    out: list[tuple[str, str, str]] = []
    if previous.get("phase") != new["phase"]:
        kind = "Warning" if new["phase"] == "Failed" else "Normal"
        out.append((kind, new["phase"], new.get("message") or new["phase"]))
    # An error the operator cannot get past (a child the API server refuses, a reconcile that
    # failed): a Warning naming the cause, again whenever the cause changes.
    ready = next((c for c in new.get("conditions") or [] if c.get("type") == "Ready"), {})
    old_ready = next((c for c in previous.get("conditions") or [] if c.get("type") == "Ready"), {})
    if ready.get("reason") in ("ChildRejected", "ReconcileError", "ChildConflict") and (
        (ready.get("reason"), ready.get("message")) != (old_ready.get("reason"), old_ready.get("message"))
    ):
        out.append(("Warning", ready["reason"], ready.get("message") or ready["reason"]))
    old_refused = previous.get("refusedChanges") or []
    if new.get("refusedChanges") and new["refusedChanges"] != old_refused:
        out.append(("Warning", "SpecChangeRefused", f"refused changes to {', '.join(new['refusedChanges'])}"))
    return out


def is_due_for_deletion(run: Optional[DCMDPRun], status: dict[str, Any], now: dt.datetime) -> Optional[float]:
    """Seconds until ``ttlSecondsAfterFinished`` deletes a finished run (<= 0: now); None: never."""
    if run is None or run.spec.ttl_seconds_after_finished is None:
        return None
    if status.get("phase") not in TERMINAL_PHASES or not status.get("completionTime"):
        return None
    done = dt.datetime.strptime(status["completionTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return (done - now).total_seconds() + run.spec.ttl_seconds_after_finished
