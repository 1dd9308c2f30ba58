"""Pure tests of the status calculus: phases, conditions, generations, the trainer's figures."""

from __future__ import annotations

import datetime as dt

from dcmdp.spec import parse_run
from dcmdp.status import CONDITION_TYPES
from dcmdp_operator import status as S
from dcmdp_operator.status import Observed

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def run_of(**spec) -> object:
    base = {"rollout": {"pools": [{"name": "bf16", "replicas": 2}, {"name": "int8", "replicas": 1}]}}
    base.update(spec)
    return parse_run({"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "r"}, "spec": base})


def job(active=0, ready=0, failed=0, conditions=()):
    return {"spec": {}, "status": {"active": active, "ready": ready, "failed": failed, "conditions": list(conditions)}}


def dep(replicas, ready):
    return {"spec": {"replicas": replicas}, "status": {"readyReplicas": ready}}


TRAINER = {
    "phase": "Running", "step": 12, "total_steps": 100, "weight_version": 12, "reward_mean": 0.5,
    "prob_diff_mean": 0.004, "run_lambda": 0.25, "tolerance": 0.003, "checkpoint_step": 10, "eval_accuracy": 0.4,
    "updated_unix_ms": 1767268800000,
    "pools": [
        {"name": "bf16", "prob_diff_mean": 0.002, "lambda": 0.1, "tolerance": 0.003, "tokens": 900, "workers": 2, "reward_mean": 0.5},
        {"name": "int8", "prob_diff_mean": 0.006, "lambda": 0.4, "tolerance": 0.003, "tokens": 400, "workers": 1, "reward_mean": 0.4},
    ],
}


def cond(st, ctype):
    return next(c for c in st["conditions"] if c["type"] == ctype)


def test_new_run_is_pending_with_all_conditions():
    st = S.compute(run_of(), Observed(job=job(), deployments={"bf16": dep(2, 0), "int8": dep(1, 0)}), None, 1, T0)
    assert st["phase"] == "Pending"
    assert [c["type"] for c in st["conditions"]] == list(CONDITION_TYPES)
    for c in st["conditions"]:
        assert set(c) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
        assert c["observedGeneration"] == 1 and c["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert cond(st, "Ready")["status"] == "False"
    assert cond(st, "Progressing")["status"] == "True"
    assert st["observedGeneration"] == 1
    assert st["totalSteps"] == 100 and st["step"] is None
    assert st["startTime"] is None and st["completionTime"] is None


def test_running_and_ready_with_the_trainers_figures():
    obs = Observed(job=job(active=1, ready=1), deployments={"bf16": dep(2, 2), "int8": dep(1, 1)}, trainer=TRAINER)
    st = S.compute(run_of(), obs, {"phase": "Pending"}, 1, at(5))
    assert st["phase"] == "Running"
    assert cond(st, "Ready")["status"] == "True"
    assert (st["step"], st["totalSteps"], st["progress"]) == (12, 100, "12/100")
    assert (st["weightVersion"], st["reward"], st["probDiffMean"], st["runLambda"], st["tolerance"]) == (12, 0.5, 0.004, 0.25, 0.003)
    assert st["lambdas"] == "bf16=0.1 int8=0.4"  # what each pool applied (kubectl get's Lambdas column)
    assert st["checkpointStep"] == 10 and st["evalAccuracy"] == 0.4
    assert st["lastTrainerUpdate"] == "2026-01-01T12:00:00Z"
    assert st["pools"] == [
        {"name": "bf16", "replicas": 2, "readyReplicas": 2, "probDiffMean": 0.002, "lambda": 0.1, "tolerance": 0.003,
         "tokens": 900, "workers": 2, "reward": 0.5},
        {"name": "int8", "replicas": 1, "readyReplicas": 1, "probDiffMean": 0.006, "lambda": 0.4, "tolerance": 0.003,
         "tokens": 400, "workers": 1, "reward": 0.4},
    ]
    assert st["startTime"] == "2026-01-01T12:00:05Z"


def test_a_figure_the_trainer_does_not_know_yet_is_absent_not_zero():
    """``tolerance: auto`` still calibrating: the trainer leaves c unset; .status has no c (a merge
    patch deletes it) rather than 0, and the pool's λ is still shown."""
    trainer = {**TRAINER, "tolerance": None, "pools": [{**TRAINER["pools"][0], "tolerance": None}, TRAINER["pools"][1]]}
    obs = Observed(job=job(active=1, ready=1), deployments={"bf16": dep(2, 2), "int8": dep(1, 1)}, trainer=trainer)
    st = S.compute(run_of(), obs, {"phase": "Running", "tolerance": 0.003}, 1, at(5))
    assert st["tolerance"] is None and "tolerance" not in st["pools"][0] and st["pools"][1]["tolerance"] == 0.003
    assert st["lambdas"] == "bf16=0.1 int8=0.4"


def test_last_transition_time_moves_only_when_the_status_flips():
    obs = Observed(job=job(active=1, ready=1), deployments={"bf16": dep(2, 2), "int8": dep(1, 1)}, trainer=TRAINER)
    first = S.compute(run_of(), obs, None, 1, at(1))
    second = S.compute(run_of(), Observed(**{**obs.__dict__, "trainer": {**TRAINER, "step": 13}}), first, 1, at(60))
    assert second["step"] == 13
    for a, b in zip(first["conditions"], second["conditions"]):
        assert a["lastTransitionTime"] == b["lastTransitionTime"] == "2026-01-01T12:00:01Z"
    # the trainer stops answering: Ready flips (new time), Progressing does not
    third = S.compute(run_of(), Observed(job=obs.job, deployments=obs.deployments, trainer_error="UNAVAILABLE"), second, 1, at(90))
    assert cond(third, "Ready")["status"] == "False" and cond(third, "Ready")["reason"] == "TrainerUnreachable"
    assert cond(third, "Ready")["lastTransitionTime"] == "2026-01-01T12:01:30Z"
    assert cond(third, "Progressing")["lastTransitionTime"] == "2026-01-01T12:00:01Z"
    # the last known figures stay
    assert third["step"] == 13 and third["pools"][1]["lambda"] == 0.4 and third["trainerReachable"] is False
    assert third["phase"] == "Running" and third["reason"] == "TrainerUnreachable"
    assert "stopped answering (last update 2026-01-01T12:00:00Z)" in third["message"]
    never = S.compute(run_of(), Observed(job=job(active=1)), None, 1, T0)
    assert never["reason"] == "TrainerStarting" and "not answering yet" in never["message"]
    assert third["startTime"] == "2026-01-01T12:00:01Z"


def test_pools_not_ready_keep_ready_false():
    obs = Observed(job=job(active=1, ready=1), deployments={"bf16": dep(2, 1), "int8": dep(1, 1)}, trainer=TRAINER)
    st = S.compute(run_of(), obs, None, 1, T0)
    assert st["phase"] == "Running"
    r = cond(st, "Ready")
    assert (r["status"], r["reason"]) == ("False", "PoolsNotReady") and "bf16 1/2" in r["message"]


def test_observed_generation_follows_metadata_generation():
    # KMock has no generation bumps: the calculus is checked here with explicit generations
    obs = Observed(job=job(), deployments={})
    st1 = S.compute(run_of(), obs, None, 3, T0)
    assert st1["observedGeneration"] == 3 and {c["observedGeneration"] for c in st1["conditions"]} == {3}
    st2 = S.compute(run_of(), obs, st1, 4, at(1))
    assert st2["observedGeneration"] == 4 and {c["observedGeneration"] for c in st2["conditions"]} == {4}
    # a server that does not report generations: keep the last one
    st3 = S.compute(run_of(), obs, st2, None, at(2))
    assert st3["observedGeneration"] == 4
    assert all("observedGeneration" in c for c in st3["conditions"])


def test_suspend_then_resume():
    obs = Observed(job=job(), deployments={"bf16": dep(0, 0), "int8": dep(0, 0)})
    st = S.compute(run_of(suspend=True), obs, {"phase": "Running"}, 2, T0)
    assert st["phase"] == "Suspended"
    assert cond(st, "Suspended")["status"] == "True" and cond(st, "Progressing")["status"] == "False"
    assert cond(st, "Ready")["reason"] == "Suspended"
    back = S.compute(run_of(), obs, st, 3, at(1))
    assert back["phase"] == "Pending" and cond(back, "Suspended")["status"] == "False"
    assert ("Normal", "Suspended", st["message"]) in S.transitions({"phase": "Running"}, st)


def test_failure_policy_counts_restarts():
    run = run_of(failurePolicy={"maxRestarts": 2})
    st = S.compute(run, Observed(job=job(active=1, failed=2)), None, 1, T0)
    assert st["phase"] != "Failed" and st["restarts"] == 2
    st = S.compute(run, Observed(job=job(active=0, failed=3)), st, 1, at(1))
    assert st["phase"] == "Failed" and st["reason"] == "TooManyRestarts"
    f = cond(st, "Failed")
    assert f["status"] == "True" and "maxRestarts: 2" in f["message"]
    assert st["completionTime"] == "2026-01-01T12:00:01Z"
    assert S.transitions({"phase": "Running"}, st)[0][:2] == ("Warning", "Failed")


def test_job_conditions_and_trainer_phase_end_the_run_and_final_phases_stick():
    done = S.compute(run_of(), Observed(job=job(conditions=[{"type": "Complete", "status": "True"}])), None, 1, T0)
    assert done["phase"] == "Succeeded" and cond(done, "Succeeded")["status"] == "True"
    assert cond(done, "Progressing")["status"] == "False"
    by_trainer = S.compute(run_of(), Observed(job=job(active=1, ready=1), trainer={**TRAINER, "phase": "Succeeded", "step": 100}), None, 1, T0)
    assert by_trainer["phase"] == "Succeeded" and "100 steps" in by_trainer["message"]
    failed = S.compute(run_of(), Observed(job=job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too slow"}])), None, 1, T0)
    assert failed["phase"] == "Failed" and failed["reason"] == "TrainerFailed" and failed["message"] == "too slow"
    # a final phase stays even when the Job is gone or the trainer talks again
    later = S.compute(run_of(), Observed(job=job(active=1, ready=1), trainer=TRAINER), done, 1, at(100))
    assert later["phase"] == "Succeeded" and later["completionTime"] == done["completionTime"]


def test_invalid_spec_fails_but_a_fixed_spec_recovers():
    bad = S.compute(None, Observed(error=("InvalidSpec", "spec.algorithm.constraint: lambdaInit must lie within [lambdaMin, lambdaMax]")), None, 2, T0)
    assert bad["phase"] == "Failed" and bad["reason"] == "InvalidSpec"
    assert "lambdaInit" in cond(bad, "Failed")["message"]
    fixed = S.compute(run_of(), Observed(job=job()), bad, 3, at(1))
    assert fixed["phase"] == "Pending" and fixed["completionTime"] is None


def test_refused_change_and_child_conflict_show_in_ready():
    obs = Observed(job=job(active=1, ready=1), deployments={"bf16": dep(2, 2), "int8": dep(1, 1)}, trainer=TRAINER,
                   refused=["spec.model.hiddenSize"])
    st = S.compute(run_of(), obs, None, 5, T0)
    r = cond(st, "Ready")
    assert (r["status"], r["reason"]) == ("False", "SpecChangeRefused") and "spec.model.hiddenSize" in r["message"]
    assert st["phase"] == "Running" and st["refusedChanges"] == ["spec.model.hiddenSize"]
    ev = S.transitions({"phase": "Running"}, st)
    assert ev == [("Warning", "SpecChangeRefused", "refused changes to spec.model.hiddenSize")]
    assert S.transitions(st, st) == []  # no repeated events
    conflict = S.compute(run_of(), Observed(job=job(), error=("ChildConflict", "Job r-trainer already exists")), None, 1, T0)
    assert conflict["phase"] == "Pending" and cond(conflict, "Ready")["reason"] == "ChildConflict"


def test_non_finite_numbers_never_reach_the_status():
    st = S.compute(run_of(), Observed(job=job(active=1, ready=1), trainer={**TRAINER, "reward_mean": float("nan")}), None, 1, T0)
    assert st["reward"] is None


def test_ttl():
    run = run_of(ttlSecondsAfterFinished=30)
    assert S.is_due_for_deletion(run, {"phase": "Running"}, T0) is None
    assert S.is_due_for_deletion(run_of(), {"phase": "Succeeded", "completionTime": "2026-01-01T12:00:00Z"}, T0) is None
    done = {"phase": "Failed", "completionTime": "2026-01-01T12:00:00Z"}
    assert S.is_due_for_deletion(run, done, at(10)) == 20
    assert S.is_due_for_deletion(run, done, at(31)) == -1


def kstatus(obj: dict) -> str:
    """kstatus's verdict on a custom resource, after sigs.k8s.io/cli-utils pkg/kstatus/status
    (generic.go, checkGenericProperties; what Flux's health checks use): Terminating when being
    deleted; InProgress while status.observedGeneration lags metadata.generation; then the first
    `Reconciling` True -> InProgress, `Stalled` True -> Failed; else Current."""
    if obj["metadata"].get("deletionTimestamp"):
        return "Terminating"
    st = obj.get("status") or {}
    if st.get("observedGeneration", obj["metadata"]["generation"]) != obj["metadata"]["generation"]:
        return "InProgress"
    for c in st.get("conditions") or []:
        if c["type"] == "Reconciling" and c["status"] == "True":
            return "InProgress"
        if c["type"] == "Stalled" and c["status"] == "True":
            return "Failed"
    return "Current"


def test_kstatus_sees_a_running_run_in_progress_and_a_finished_one_current_or_failed():
    def verdict(st, generation=1):
        return kstatus({"metadata": {"generation": generation}, "status": st})

    pending = S.compute(run_of(), Observed(job=job()), None, 1, T0)
    running = S.compute(run_of(), Observed(job=job(active=1, ready=1), deployments={"bf16": dep(2, 2), "int8": dep(1, 1)}, trainer=TRAINER), pending, 1, at(1))
    done = S.compute(run_of(), Observed(job=job(conditions=[{"type": "Complete", "status": "True"}])), running, 1, at(2))
    failed = S.compute(run_of(), Observed(job=job(active=0, failed=4)), running, 1, at(2))
    suspended = S.compute(run_of(suspend=True), Observed(job=job()), running, 1, at(2))
    rejected = S.compute(run_of(), Observed(job=job(), error=("ChildRejected", "the API server refused Job x")), pending, 1, at(1))
    assert [verdict(s) for s in (pending, running, done, failed, suspended, rejected)] == [
        "InProgress", "InProgress", "Current", "Failed", "Current", "Failed"]
    # a finished run is Ready (what `kubectl wait --for=condition=Ready` and kstatus readers expect)
    assert cond(done, "Ready")["status"] == "True" and cond(done, "Ready")["reason"] == done["reason"] == "Completed"
    assert cond(failed, "Stalled")["reason"] == "TooManyRestarts"
    # a spec change after the end: InProgress until the operator observes the new generation
    assert verdict(done, generation=2) == "InProgress"
    later = S.compute(run_of(), Observed(job=job(conditions=[{"type": "Complete", "status": "True"}])), done, 2, at(3))
    assert later["observedGeneration"] == 2 and verdict(later, generation=2) == "Current"


def test_figures_are_rounded_for_the_printer_columns_and_absent_until_reported():
    raw = {**TRAINER, "prob_diff_mean": 0.001014180634790906, "reward_mean": None,
           "pools": [{**TRAINER["pools"][0], "lambda": 0.027582105455750114}]}
    st = S.compute(run_of(), Observed(job=job(active=1, ready=1), trainer=raw), None, 1, T0)
    assert st["probDiffMean"] == 0.001014 and st["reward"] is None
    assert st["pools"][0]["lambda"] == 0.02758 and st["lambdas"].startswith("bf16=0.0276")
