"""The real operator (kopf, in a thread via kopf.testing.KopfRunner) against the API emulator
(KMock), with a real gRPC trainer status server. Nothing of the operator is mocked.

The emulator has no controllers: the tests play the Job and Deployment controllers by patching
their ``status``, and the trainer by serving ``GetStatus``.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time

import pytest
from kopf.testing import KopfRunner

from dcmdp_operator.config import CONFIG
from dcmdp_testing.emulator import EmulatorThread
from operator_helpers import FakeTrainer, Kube, api_requests, wait_for

NS = "ml"
pytestmark = pytest.mark.timeout(180)


@dataclasses.dataclass
class Env:
    emu: EmulatorThread
    kube: Kube
    trainer: FakeTrainer
    runner: KopfRunner


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    saved_config = dataclasses.replace(CONFIG)
    saved_env = os.environ.get("KUBECONFIG")
    with EmulatorThread() as emu, FakeTrainer() as trainer:
        kubeconfig.write_text(emu.kubeconfig(NS))
        os.environ["KUBECONFIG"] = str(kubeconfig)
        CONFIG.poll_seconds = 0.25
        CONFIG.grpc_timeout_seconds = 1.0
        CONFIG.trainer_address = f"127.0.0.1:{trainer.port}"  # instead of the in-cluster DNS name
        try:
            with KopfRunner(["run", "--standalone", "-n", NS, "-m", "dcmdp_operator.handlers"],
                            timeout=30) as runner:
                yield Env(emu, Kube(emu.url), trainer, runner)
        finally:
            for f in dataclasses.fields(CONFIG):
                setattr(CONFIG, f.name, getattr(saved_config, f.name))
            if saved_env is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved_env
    if os.environ.get("DCMDP_TEST_OPERATOR_LOG"):  # the operator's whole log, for debugging
        with open(os.environ["DCMDP_TEST_OPERATOR_LOG"], "w") as f:
            f.write(runner.output)
    assert runner.exception is None, runner.output[-3000:]
    assert runner.exit_code == 0
    assert "Traceback" not in runner.output, runner.output[runner.output.index("Traceback") - 2000:][:5000]
    errors = [line for line in runner.output.splitlines() if "[ERROR" in line]
    assert not errors, errors[:5]


def manifest(name: str, **spec) -> dict:
    spec.setdefault("rollout", {"pools": [{"name": "bf16", "replicas": 2}]})
    return {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def create(env: Env, name: str, n_children: int, **spec) -> dict:
    env.kube.create("DCMDPRun", NS, manifest(name, **spec))
    wait_for(lambda: len(env.kube.children(NS, name)) >= n_children, what=f"the children of {name}")
    return env.kube.get("DCMDPRun", NS, name)


def run_status(env: Env, name: str) -> dict:
    return (env.kube.get("DCMDPRun", NS, name) or {}).get("status") or {}


def cond(st: dict, ctype: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == ctype)


def token_of(env: Env, name: str) -> str:
    return base64.b64decode(env.kube.get("Secret", NS, f"{name}-token")["data"]["token"]).decode()


def start_trainer_pods(env: Env, name: str) -> None:
    """Play the Job and Deployment controllers: the trainer runs, every pool is ready."""
    env.kube.patch("Job", NS, f"{name}-trainer", {"status": {"active": 1, "ready": 1}}, sub="status")
    for (kind, child), obj in env.kube.children(NS, name).items():
        if kind == "Deployment":
            n = obj["spec"]["replicas"]
            env.kube.patch("Deployment", NS, child, {"status": {"replicas": n, "readyReplicas": n}}, sub="status")


def events_of(env: Env, name: str) -> list[tuple[str, str]]:
    return [(e.get("type"), e.get("reason")) for e in env.kube.list("Event", NS)
            if (e.get("involvedObject") or {}).get("name") == name]


def post_counts(env: Env, name: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in api_requests(env.emu):
        if r["verb"] == "create" and (r["name"] or "").startswith(name) and r["resource"] != "events":
            counts[r["resource"]] = counts.get(r["resource"], 0) + 1
    return counts


# ---------------------------------------------------------------------------------------- tests
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
FULL_SPEC = dict(
    trainer={"template": {"nodeSelector": {"gpu": "h100"}, "tolerations": [GPU_TOLERATION],
                          "resources": {"limits": {"nvidia.com/gpu": 1}}}},
    rollout={"pools": [
        {"name": "l4-fp8", "replicas": 2, "precision": "fp8",
         "template": {"nodeSelector": {"gpu": "l4"}, "tolerations": [GPU_TOLERATION],
                      "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "24Gi"}}}},
        {"name": "cpu", "replicas": 1, "precision": "int8", "template": {"nodeSelector": {"pool": "cpu"}}},
    ]},
    checkpoint={"pvc": {"enabled": True, "size": "20Gi"}},
    scheduling={"gang": "volcano", "queueName": "research"},
)


def test_a_run_gets_exactly_its_children_owned_labelled_and_placed(env):
    run = create(env, "alpha", 8, **FULL_SPEC)
    kids = env.kube.children(NS, "alpha")
    assert set(kids) == {
        ("Secret", "alpha-token"), ("ConfigMap", "alpha-config"), ("PersistentVolumeClaim", "alpha-checkpoints"),
        ("PodGroup", "alpha"), ("Service", "alpha-trainer"), ("Job", "alpha-trainer"),
        ("Deployment", "alpha-rollout-l4-fp8"), ("Deployment", "alpha-rollout-cpu"),
    }
    uid = run["metadata"]["uid"]
    for (kind, name), obj in kids.items():
        refs = obj["metadata"]["ownerReferences"]
        assert refs == [{"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "name": "alpha", "uid": uid,
                         "controller": True, "blockOwnerDeletion": True}], (kind, name)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "alpha" and labels["app.kubernetes.io/managed-by"] == "dcmdp-operator"
    fp8 = kids[("Deployment", "alpha-rollout-l4-fp8")]
    pod = fp8["spec"]["template"]["spec"]
    assert fp8["spec"]["replicas"] == 2 and fp8["metadata"]["labels"]["dcmdp.io/pool"] == "l4-fp8"
    assert pod["nodeSelector"] == {"gpu": "l4"} and pod["tolerations"] == [GPU_TOLERATION]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": "24Gi"}
    assert pod["schedulerName"] == "volcano"
    cpu_pod = kids[("Deployment", "alpha-rollout-cpu")]["spec"]["template"]["spec"]
    assert cpu_pod["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in cpu_pod
    job_pod = kids[("Job", "alpha-trainer")]["spec"]["template"]["spec"]
    assert job_pod["nodeSelector"] == {"gpu": "h100"}
    assert kids[("PodGroup", "alpha")]["spec"] == {"minMember": 4, "queue": "research"}
    # the token Secret is mounted in every pod and is a real random token
    token = token_of(env, "alpha")
    assert len(token) >= 40
    for p in (pod, cpu_pod, job_pod):
        assert {"name": "dcmdp-token", "mountPath": "/var/run/dcmdp", "readOnly": True} in p["containers"][0]["volumeMounts"]
        assert any(v.get("secret", {}).get("secretName") == "alpha-token" for v in p["volumes"])
    st = wait_for(lambda: run_status(env, "alpha").get("phase") == "Pending" and run_status(env, "alpha"), what="status")
    assert st["observedGeneration"] == 1 and cond(st, "Progressing")["status"] == "True"
    assert wait_for(lambda: ("Normal", "Pending") in events_of(env, "alpha"), what="Pending")


def test_resyncs_create_nothing_new_and_keep_the_token(env):
    create(env, "beta", 5)
    token = token_of(env, "beta")
    first = post_counts(env, "beta")
    assert first == {"secrets": 1, "configmaps": 1, "services": 1, "jobs": 1, "deployments": 1}
    patches_before = [r for r in api_requests(env.emu) if r["verb"] == "patch" and (r["name"] or "").startswith("beta-")]
    # let the poll daemon reconcile several times (each reconcile reads the token Secret)
    def polled() -> bool:
        return sum(1 for r in api_requests(env.emu) if r["verb"] == "get" and r["name"] == "beta-token") >= 5
    wait_for(polled, what="five reconciles")
    # an unchanged status is not rewritten either
    status_writes = [r for r in api_requests(env.emu) if r["resource"] == "dcmdpruns/status" and r["name"] == "beta"]
    assert len(status_writes) <= 2
    assert post_counts(env, "beta") == first
    assert token_of(env, "beta") == token
    patches = [r for r in api_requests(env.emu) if r["verb"] == "patch" and (r["name"] or "").startswith("beta-")]
    assert patches == patches_before == []  # nothing changed, so nothing was written


def test_status_and_printer_columns_follow_the_trainer(env):
    create(env, "gamma", 5, algorithm={"steps": 40})
    token = token_of(env, "gamma")
    env.trainer.statuses[token] = {
        "phase": "Running", "step": 3, "total_steps": 40, "weight_version": 3, "reward_mean": 0.125,
        "prob_diff_mean": 0.0042, "run_lambda": 0.3, "tolerance": 0.0037, "checkpoint_step": 0,
        "pools": [{"name": "bf16", "prob_diff_mean": 0.0042, "lambda": 0.3, "tolerance": 0.0037, "tokens": 512, "workers": 2}],
    }
    start_trainer_pods(env, "gamma")
    st = wait_for(lambda: (s := run_status(env, "gamma")).get("step") == 3 and cond(s, "Ready")["status"] == "True" and s,
                  what="Running and Ready")
    assert st["phase"] == "Running" and st["progress"] == "3/40"
    assert (st["reward"], st["probDiffMean"], st["runLambda"], st["tolerance"], st["weightVersion"]) == (0.125, 0.0042, 0.3, 0.0037, 3)
    assert st["lambdas"] == "bf16=0.3"
    assert st["pools"] == [{"name": "bf16", "replicas": 2, "readyReplicas": 2, "probDiffMean": 0.0042, "lambda": 0.3,
                            "tolerance": 0.0037, "tokens": 512, "workers": 2}]  # reward not reported: absent
    # the CRD's printer columns (if the CRD module is there) read these fields
    try:
        from dcmdp.crd import PRINTER_COLUMNS
    except ImportError:
        PRINTER_COLUMNS = []
    obj = env.kube.get("DCMDPRun", NS, "gamma")
    for col in PRINTER_COLUMNS:
        if col.get("priority", 0) == 0 and col["jsonPath"].startswith(".status."):
            assert obj["status"].get(col["jsonPath"].split(".")[2]) is not None, col
    ready_since = cond(st, "Ready")["lastTransitionTime"]

    env.trainer.statuses[token] = {**env.trainer.statuses[token], "step": 9, "run_lambda": 0.7, "prob_diff_mean": 0.006}
    st = wait_for(lambda: (s := run_status(env, "gamma")).get("step") == 9 and s, what="step 9")
    assert st["runLambda"] == 0.7 and st["probDiffMean"] == 0.006 and st["progress"] == "9/40"
    assert cond(st, "Ready")["lastTransitionTime"] == ready_since  # still Ready: no transition

    del env.trainer.statuses[token]  # the trainer stops answering (UNAUTHENTICATED here)
    st = wait_for(lambda: (s := run_status(env, "gamma")) and cond(s, "Ready")["reason"] == "TrainerUnreachable" and s,
                  what="TrainerUnreachable")
    assert st["step"] == 9 and st["trainerReachable"] is False and "UNAUTHENTICATED" in cond(st, "Ready")["message"]

    env.trainer.statuses[token] = {"phase": "Succeeded", "step": 40, "total_steps": 40, "finished": True}
    st = wait_for(lambda: (s := run_status(env, "gamma")).get("phase") == "Succeeded" and s, what="Succeeded")
    assert cond(st, "Succeeded")["status"] == "True" and st["completionTime"]
    assert wait_for(lambda: env.kube.get("Deployment", NS, "gamma-rollout-bf16")["spec"]["replicas"] == 0, what="pools at 0")
    reasons = [r for _, r in wait_for(lambda: len(events_of(env, "gamma")) >= 3 and events_of(env, "gamma"), what="events")]
    assert reasons[:3] == ["Pending", "Running", "Succeeded"]


def test_suspend_scales_to_zero_and_resume_brings_it_back(env):
    create(env, "delta", 5, rollout={"pools": [{"name": "bf16", "replicas": 3}]})
    env.kube.patch("DCMDPRun", NS, "delta", {"spec": {"suspend": True}})
    wait_for(lambda: env.kube.get("Job", NS, "delta-trainer")["spec"]["suspend"] is True, what="Job suspended")
    wait_for(lambda: env.kube.get("Deployment", NS, "delta-rollout-bf16")["spec"]["replicas"] == 0, what="pool at 0")
    st = wait_for(lambda: (s := run_status(env, "delta")).get("phase") == "Suspended" and s, what="Suspended")
    assert cond(st, "Suspended")["status"] == "True" and st["observedGeneration"] == 2
    assert cond(st, "Suspended")["observedGeneration"] == 2

    env.kube.patch("DCMDPRun", NS, "delta", {"spec": {"suspend": False}})
    wait_for(lambda: env.kube.get("Job", NS, "delta-trainer")["spec"]["suspend"] is False, what="Job resumed")
    wait_for(lambda: env.kube.get("Deployment", NS, "delta-rollout-bf16")["spec"]["replicas"] == 3, what="pool back")
    st = wait_for(lambda: (s := run_status(env, "delta")).get("phase") == "Pending" and s, what="Pending again")
    assert st["observedGeneration"] == 3 and cond(st, "Suspended")["status"] == "False"
    job = env.kube.get("Job", NS, "delta-trainer")
    assert "--resume" in job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert post_counts(env, "delta")["jobs"] == 1  # the same Job, resumed


def test_an_unsafe_change_is_refused_and_a_safe_one_applied(env):
    create(env, "eps", 5, model={"hiddenSize": 128})
    env.kube.patch("DCMDPRun", NS, "eps", {"spec": {"model": {"hiddenSize": 256},
                                                    "rollout": {"pools": [{"name": "bf16", "replicas": 4}]}}})
    st = wait_for(lambda: (s := run_status(env, "eps")) and cond(s, "Ready")["reason"] == "SpecChangeRefused" and s,
                  what="SpecChangeRefused")
    assert st["refusedChanges"] == ["spec.model.hiddenSize"] and "spec.model.hiddenSize" in cond(st, "Ready")["message"]
    assert wait_for(lambda: env.kube.get("Deployment", NS, "eps-rollout-bf16")["spec"]["replicas"] == 4, what="replicas 4")
    assert "hiddenSize: 128" in env.kube.get("ConfigMap", NS, "eps-config")["data"]["run.yaml"]
    assert wait_for(lambda: ("Warning", "SpecChangeRefused") in events_of(env, "eps"), what="SpecChangeRefused")
    assert env.kube.get("DCMDPRun", NS, "eps")["spec"]["model"]["hiddenSize"] == 256  # spec never written back
    env.kube.patch("DCMDPRun", NS, "eps", {"spec": {"model": {"hiddenSize": 128}}})
    st = wait_for(lambda: (s := run_status(env, "eps")) and cond(s, "Ready")["reason"] != "SpecChangeRefused" and s,
                  what="refusal cleared")
    assert "refusedChanges" not in st


def test_too_many_restarts_fail_the_run(env):
    create(env, "zeta", 5, failurePolicy={"maxRestarts": 1})
    env.kube.patch("Job", NS, "zeta-trainer", {"status": {"active": 1, "failed": 1}}, sub="status")
    wait_for(lambda: run_status(env, "zeta").get("restarts") == 1, what="one restart counted")
    assert run_status(env, "zeta")["phase"] == "Running"
    env.kube.patch("Job", NS, "zeta-trainer", {"status": {"active": 0, "failed": 2}}, sub="status")
    st = wait_for(lambda: (s := run_status(env, "zeta")).get("phase") == "Failed" and s, what="Failed")
    assert st["reason"] == "TooManyRestarts" and cond(st, "Failed")["status"] == "True"
    assert wait_for(lambda: ("Warning", "Failed") in events_of(env, "zeta"), what="Failed")
    assert wait_for(lambda: env.kube.get("Deployment", NS, "zeta-rollout-bf16")["spec"]["replicas"] == 0, what="pools stop")


def test_ttl_deletes_a_finished_run_and_its_children_follow(env):
    create(env, "eta", 5, ttlSecondsAfterFinished=2)
    env.kube.patch("Job", NS, "eta-trainer", {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, sub="status")
    wait_for(lambda: run_status(env, "eta").get("phase") == "Succeeded", what="Succeeded")
    wait_for(lambda: env.kube.get("DCMDPRun", NS, "eta") is None, timeout=10, what="the run deleted by its TTL")
    # the emulator's garbage collector follows the owner references (as Kubernetes' does)
    wait_for(lambda: env.kube.children(NS, "eta") == {}, what="children collected")
    assert ("Normal", "Expired") in events_of(env, "eta")


def test_deleting_a_run_releases_it_and_the_children_go(env):
    run = create(env, "theta", 5)
    assert run["metadata"]["finalizers"] == ["dcmdp.io/finalizer"]
    env.kube.delete("DCMDPRun", NS, "theta")
    wait_for(lambda: env.kube.get("DCMDPRun", NS, "theta") is None, what="run gone")
    wait_for(lambda: env.kube.children(NS, "theta") == {}, what="children collected")


def test_an_invalid_run_is_refused_by_the_api_with_the_field_named(env):
    # the emulator applies the CRD's schema and CEL rules, as the API server would
    with pytest.raises(AssertionError, match=r"HTTP 422.*lambdaInit"):
        env.kube.create("DCMDPRun", NS, manifest("iota", algorithm={"constraint": {"lambdaInit": 5.0, "lambdaMax": 1.0}}))
    assert env.kube.get("DCMDPRun", NS, "iota") is None and env.kube.children(NS, "iota") == {}


def test_a_child_the_api_server_refuses_reaches_status_with_a_backoff(env):
    """A stricter API server (or a webhook) answers 422 for one pool's Deployment: the run says
    which child and why (condition + Warning Event), the other children exist, and the operator
    retries with a growing delay instead of a hot loop."""

    def refuse(kind: str, obj: dict) -> list:
        if kind == "Deployment" and obj["metadata"]["name"] == "kappa-rollout-bad":
            return [("spec.template.spec.containers[0].resources.limits", "Invalid value: a webhook says no")]
        return []

    env.emu.emulator.rejections.append(refuse)
    try:
        env.kube.create("DCMDPRun", NS, manifest("kappa", rollout={"pools": [{"name": "ok"}, {"name": "bad"}]}))
        st = wait_for(lambda: (s := run_status(env, "kappa")) and cond(s, "Ready")["reason"] == "ChildRejected" and s,
                      what="ChildRejected")
        msg = cond(st, "Ready")["message"]
        assert "Deployment kappa-rollout-bad" in msg and "HTTP 422" in msg and "resources.limits" in msg
        assert st["phase"] != "Failed"  # it may still be fixed (by the admin, or a spec change)
        assert wait_for(lambda: ("Warning", "ChildRejected") in events_of(env, "kappa"), what="the Event")
        assert ("Deployment", "kappa-rollout-ok") in env.kube.children(NS, "kappa")
        # back-off: poll period 0.25 s; without it ~12 attempts in 3 s
        first = post_counts(env, "kappa-rollout-bad").get("deployments", 0)
        time.sleep(3.0)
        tries = post_counts(env, "kappa-rollout-bad").get("deployments", 0) - first
        assert 1 <= tries <= 5, tries
    finally:
        env.emu.emulator.rejections.remove(refuse)
    # the refusal lifted: the child is created and the error clears
    st = wait_for(lambda: (s := run_status(env, "kappa")) and cond(s, "Ready")["reason"] != "ChildRejected" and s,
                  timeout=20, what="recovered")
    assert ("Deployment", "kappa-rollout-bad") in env.kube.children(NS, "kappa")


def test_the_api_server_refuses_an_escalating_run_naming_the_field(env):
    body = manifest("mu", trainer={"template": {"spec": {"hostPID": True, "volumes": [{"name": "r", "hostPath": {"path": "/"}}]}}})
    with pytest.raises(AssertionError, match="HTTP 422") as err:
        env.kube.create("DCMDPRun", NS, body)
    assert "spec.trainer.template.spec.hostPID" in str(err.value)
    assert env.kube.get("DCMDPRun", NS, "mu") is None and not env.kube.children(NS, "mu")


def test_a_template_nested_thousands_of_levels_deep_fails_with_a_status_and_an_event(env):
    """Deeper than Python's default recursion limit: kopf still decodes and diffs it, the
    handler runs, and the spec model refuses it naming the field (no children)."""
    deep: dict = {}
    for _ in range(2000):
        deep = {"a": deep}
    env.kube.create("DCMDPRun", NS, manifest("deep", trainer={"template": {"affinity": deep}}))
    st = wait_for(lambda: run_status(env, "deep").get("phase") == "Failed" and run_status(env, "deep"), what="Failed")
    assert st["reason"] == "InvalidSpec" and "spec.trainer.template.affinity: nested deeper than 32 levels" in st["message"]
    assert wait_for(lambda: ("Warning", "Failed") in events_of(env, "deep"), what="the Failed event")
    assert env.kube.children(NS, "deep") == {}


def test_a_finished_run_is_current_for_kstatus_also_after_a_spec_change(env):
    from test_status import kstatus

    create(env, "kdone", 5)
    env.kube.patch("Job", NS, "kdone-trainer", {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, sub="status")
    wait_for(lambda: run_status(env, "kdone").get("phase") == "Succeeded", what="Succeeded")
    assert kstatus(env.kube.get("DCMDPRun", NS, "kdone")) == "Current"
    env.kube.patch("DCMDPRun", NS, "kdone", {"spec": {"ttlSecondsAfterFinished": 3600}})
    obj = wait_for(lambda: (o := env.kube.get("DCMDPRun", NS, "kdone"))["status"]["observedGeneration"] == 2 and o,
                   what="generation 2 observed")
    assert obj["metadata"]["generation"] == 2 and kstatus(obj) == "Current"
    assert cond(obj["status"], "Ready")["status"] == "True"
