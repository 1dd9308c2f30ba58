"""Pure tests of the operator's child builders (spec in, manifests out)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from dcmdp.spec import SpecError, load_run, parse_run
from dcmdp_operator import children
from dcmdp_operator.config import OperatorConfig

META = {"name": "demo", "namespace": "ml", "uid": "0b7c3e2a-uid"}
CONFIG = OperatorConfig(trainer_image="reg/trainer:1", rollout_image="reg/rollout:1")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_of(spec: dict) -> object:
    return parse_run({"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "demo"}, "spec": spec})


def by_kind(objs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


SPEC = {
    "trainer": {
        "replicas": 2,
        "template": {
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "resources": {"limits": {"nvidia.com/gpu": "1"}},
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
        },
    },
    "rollout": {
        "pools": [
            {
                "name": "l4-fp8",
                "replicas": 3,
                "precision": "fp8",
                "engine": "vllm",
                "image": "reg/vllm:2",
                "template": {
                    "nodeSelector": {"gpu": "l4"},
                    "tolerations": [{"key": "spot", "operator": "Exists"}],
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                    "labels": {"team": "rl"},
                },
            },
            {"name": "cpu", "replicas": 1},
        ]
    },
    "checkpoint": {"pvc": {"enabled": True, "size": "5Gi", "storageClassName": "fast"}},
}


def test_exactly_the_expected_children_all_owned_and_labelled():
    objs = children.build(run_of(SPEC), META, token="s3cret", config=CONFIG)
    got = by_kind(objs)
    assert set(got) == {
        ("Secret", "demo-token"),
        ("ConfigMap", "demo-config"),
        ("PersistentVolumeClaim", "demo-checkpoints"),
        ("Service", "demo-trainer"),
        ("Job", "demo-trainer"),
        ("Deployment", "demo-rollout-l4-fp8"),
        ("Deployment", "demo-rollout-cpu"),
    }
    for obj in objs:
        md = obj["metadata"]
        assert md["namespace"] == "ml"
        assert md["ownerReferences"] == [
            {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "name": "demo", "uid": "0b7c3e2a-uid",
             "controller": True, "blockOwnerDeletion": True}
        ]
        lbl = md["labels"]
        assert lbl["app.kubernetes.io/name"] == "dcmdp"
        assert lbl["app.kubernetes.io/instance"] == "demo"
        assert lbl["app.kubernetes.io/managed-by"] == "dcmdp-operator"
        assert lbl["dcmdp.io/run"] == "demo"
        assert lbl["dcmdp.io/role"] == lbl["app.kubernetes.io/component"]
    assert got[("Job", "demo-trainer")]["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
    dep = got[("Deployment", "demo-rollout-l4-fp8")]
    assert dep["metadata"]["labels"]["app.kubernetes.io/component"] == "rollout"
    assert dep["metadata"]["labels"]["dcmdp.io/pool"] == "l4-fp8"
    assert dep["spec"]["selector"]["matchLabels"] == {"dcmdp.io/run": "demo", "dcmdp.io/role": "rollout", "dcmdp.io/pool": "l4-fp8"}
    assert dep["spec"]["template"]["metadata"]["labels"]["dcmdp.io/pool"] == "l4-fp8"


def test_secret_carries_the_given_token_and_every_pod_mounts_it():
    objs = by_kind(children.build(run_of(SPEC), META, token="s3cret", config=CONFIG))
    secret = objs[("Secret", "demo-token")]
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cret"
    assert children.read_token(secret) == "s3cret"
    pods = [objs[("Job", "demo-trainer")]["spec"]["template"]] + [
        o["spec"]["template"] for k, o in objs.items() if k[0] == "Deployment"
    ]
    for pod in pods:
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert vols["dcmdp-token"]["secret"]["secretName"] == "demo-token"
        main = pod["spec"]["containers"][0]
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        assert mounts["dcmdp-token"] == {"name": "dcmdp-token", "mountPath": "/var/run/dcmdp", "readOnly": True}
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["DCMDP_TOKEN_FILE"] == "/var/run/dcmdp/token"
        assert "s3cret" not in yaml.safe_dump(pod)  # the token travels only in the Secret


def test_trainer_job_and_service():
    objs = by_kind(children.build(run_of(SPEC), META, token="t", config=CONFIG))
    job = objs[("Job", "demo-trainer")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 3  # failurePolicy.maxRestarts default
    assert spec["suspend"] is False
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == "demo-trainer"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    main = pod["containers"][0]
    assert main["name"] == "trainer" and main["image"] == "reg/trainer:1"
    # two pods × 1 GPU (the template's limit): torchrun in each, rendezvous at pod 0
    assert main["command"] == [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "$(NODE_RANK)",
        "--master-addr", "demo-trainer-0.demo-trainer", "--master-port", "29500", "--max-restarts", "0",
        "--module", "dcmdp_trainer",
        "--config", "/etc/dcmdp/run.yaml", "--port", "50051", "--metrics-port", "9090", "--out", "/checkpoints",
        "--resume",
    ]
    assert main["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    env = {e["name"]: e for e in main["env"]}
    assert env["NCCL_DEBUG"]["value"] == "INFO"  # the user's env is kept beside the operator's
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(env)  # torchrun gives each rank its own
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts == {"/var/run/dcmdp": "dcmdp-token", "/etc/dcmdp": "dcmdp-config", "/checkpoints": "checkpoints", "/tmp": "tmp"}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "demo-checkpoints"
    assert vols["dcmdp-config"]["configMap"]["name"] == "demo-config"

    svc = objs[("Service", "demo-trainer")]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["selector"] == {"dcmdp.io/run": "demo", "dcmdp.io/role": "trainer"}
    assert {p["name"]: p["port"] for p in svc["ports"]} == {"grpc": 50051, "metrics": 9090}
    # the Service selects the trainer's pods and nothing else
    assert svc["selector"].items() <= spec["template"]["metadata"]["labels"].items()

    pvc = objs[("PersistentVolumeClaim", "demo-checkpoints")]["spec"]
    assert pvc["resources"]["requests"]["storage"] == "5Gi" and pvc["storageClassName"] == "fast"
    assert pvc["accessModes"] == ["ReadWriteMany"]  # two trainer pods share it


def test_more_or_fewer_ranks_than_the_pods_gpus_is_refused_before_anything_is_created():
    run = run_of({"trainer": {"gpusPerReplica": 4, "template": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}})
    with pytest.raises(children.BuildError, match=r"spec.trainer.gpusPerReplica: 4 ranks per pod but the "
                                                  r"trainer template's nvidia.com/gpu limit is 2"):
        children.build(run, META, token="t", config=CONFIG)


@pytest.mark.parametrize("trainer, world, per_pod", [
    ({"replicas": 1}, 1, 1),
    ({"replicas": 1, "template": {"resources": {"limits": {"nvidia.com/gpu": "8"}}}}, 8, 8),
    ({"replicas": 3, "template": {"spec": {"containers": [
        {"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": 4}}}]}}}, 12, 4),
    ({"replicas": 2, "gpusPerReplica": 2, "template": {"resources": {"limits": {"nvidia.com/gpu": "2"}}}}, 4, 2),
    ({"replicas": 2, "gpusPerReplica": 2}, 4, 2),  # CPU ranks (gloo): no GPU limit
])
def test_trainer_pods_start_one_rank_per_gpu(trainer, world, per_pod):
    """world = replicas × gpusPerReplica (default: the template's GPU limit); one rank alone runs
    the trainer directly, more run torchrun with the pod's share, its node rank the Job index."""
    objs = by_kind(children.build(run_of({"trainer": trainer}), META, token="t", config=CONFIG))
    job = objs[("Job", "demo-trainer")]["spec"]
    assert job["completions"] == job["parallelism"] == trainer["replicas"]
    main = job["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in main["env"]}
    cmd = main["command"]
    if world == 1:
        assert cmd[0] == "dcmdp-trainer" and "NODE_RANK" not in env
        return
    flags = dict(zip(cmd[1:cmd.index("--module")], cmd[2:cmd.index("--module")]))
    assert cmd[0] == "torchrun" and cmd[cmd.index("--module") + 1] == "dcmdp_trainer"
    assert int(flags["--nnodes"]) * int(flags["--nproc-per-node"]) == world
    assert int(flags["--nproc-per-node"]) == per_pod
    assert flags["--node-rank"] == "$(NODE_RANK)" and "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert flags["--master-addr"] == "demo-trainer-0.demo-trainer"  # pod 0 through the headless Service
    assert cmd[-7:] == ["--port", "50051", "--metrics-port", "9090", "--out", "/checkpoints", "--resume"]


def test_pool_deployments_take_their_own_template_image_and_command():
    objs = by_kind(children.build(run_of(SPEC), META, token="t", config=CONFIG))
    fp8 = objs[("Deployment", "demo-rollout-l4-fp8")]
    assert fp8["spec"]["replicas"] == 3
    pod = fp8["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "rl"
    assert pod["spec"]["nodeSelector"] == {"gpu": "l4"}
    assert pod["spec"]["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    main = pod["spec"]["containers"][0]
    assert main["image"] == "reg/vllm:2"
    assert main["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert main["command"] == [
        "dcmdp-rollout", "--trainer", "demo-trainer-0.demo-trainer:50051", "--pool", "l4-fp8",
        "--token-file", "/var/run/dcmdp/token",
    ]
    cpu = objs[("Deployment", "demo-rollout-cpu")]
    assert cpu["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/rollout:1"  # operator default
    assert "nodeSelector" not in cpu["spec"]["template"]["spec"]
    # no pool inherits another pool's placement
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu)


def test_configmap_holds_the_resolved_run_and_reads_back():
    run = run_of(SPEC)
    objs = by_kind(children.build(run, META, token="t", config=CONFIG))
    cm = objs[("ConfigMap", "demo-config")]
    data = yaml.safe_load(cm["data"]["run.yaml"])
    assert data["metadata"] == {"name": "demo", "namespace": "ml"}
    assert data["spec"]["algorithm"]["steps"] == run.spec.algorithm.steps  # defaults are filled in
    assert parse_run(data).spec == run.spec
    assert children.read_accepted(cm) == data


def test_suspend_scales_everything_to_zero_and_finished_runs_stop_their_pools():
    spec = {**SPEC, "suspend": True}
    objs = by_kind(children.build(run_of(spec), META, token="t", config=CONFIG))
    assert objs[("Job", "demo-trainer")]["spec"]["suspend"] is True
    assert [o["spec"]["replicas"] for k, o in objs.items() if k[0] == "Deployment"] == [0, 0]
    done = by_kind(children.build(run_of(SPEC), META, token="t", config=CONFIG, phase="Succeeded"))
    assert [o["spec"]["replicas"] for k, o in done.items() if k[0] == "Deployment"] == [0, 0]
    assert done[("Job", "demo-trainer")]["spec"]["suspend"] is False


def test_volcano_gang_builds_a_podgroup_for_every_pod():
    spec = {**SPEC, "scheduling": {"gang": "volcano", "queueName": "train", "priorityClassName": "high"}}
    objs = by_kind(children.build(run_of(spec), META, token="t", config=CONFIG))
    pg = objs[("PodGroup", "demo")]
    assert pg["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert pg["spec"] == {"minMember": 2 + 3 + 1, "queue": "train", "priorityClassName": "high"}
    pods = [o["spec"]["template"] for k, o in objs.items() if k[0] in ("Job", "Deployment")]
    assert len(pods) == 3
    for pod in pods:
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["spec"]["priorityClassName"] == "high"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "demo"


def test_kueue_gang_labels_the_workloads_and_creates_the_job_suspended():
    spec = {**SPEC, "scheduling": {"gang": "kueue", "queueName": "team-a"}}
    objs = by_kind(children.build(run_of(spec), META, token="t", config=CONFIG))
    assert ("PodGroup", "demo") not in objs
    job = objs[("Job", "demo-trainer")]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    # Kueue owns `suspend` of an admitted Job: the desired state leaves it alone ...
    assert "suspend" not in job["spec"]
    # ... but the Job is created suspended (Kueue unsuspends it on admission)
    assert children.for_creation(job)["spec"]["suspend"] is True
    for k, o in objs.items():
        if k[0] == "Deployment":
            assert o["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
            assert o["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    # the user's suspend and resume still reach the Job
    susp = by_kind(children.build(run_of({**spec, "suspend": True}), META, token="t", config=CONFIG))
    assert susp[("Job", "demo-trainer")]["spec"]["suspend"] is True
    resumed = by_kind(children.build(run_of(spec), META, token="t", config=CONFIG, phase="Suspended"))
    assert resumed[("Job", "demo-trainer")]["spec"]["suspend"] is False
    # without Kueue, creation changes nothing
    plain = by_kind(children.build(run_of(SPEC), META, token="t", config=CONFIG))[("Job", "demo-trainer")]
    assert children.for_creation(plain) == plain


def test_user_overlay_cannot_break_what_the_run_needs():
    spec = {
        "trainer": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "trainer", "command": ["sh"], "image": "evil", "env": [{"name": "DCMDP_TOKEN_FILE", "value": "/x"}]},
                        {"name": "sidecar", "image": "busybox"},
                    ],
                },
                "metadata": {"labels": {"dcmdp.io/run": "other", "extra": "yes"}},
            }
        }
    }
    job = by_kind(children.build(run_of(spec), META, token="t", config=CONFIG))[("Job", "demo-trainer")]
    pod = job["spec"]["template"]
    main, sidecar = pod["spec"]["containers"]
    assert main["command"][0] == "dcmdp-trainer" and main["image"] == "reg/trainer:1"
    assert {e["name"]: e.get("value") for e in main["env"]}["DCMDP_TOKEN_FILE"] == "/var/run/dcmdp/token"
    # a sidecar is kept, under the same restricted security context as the run's own containers
    assert sidecar == {"name": "sidecar", "image": "busybox", "securityContext": children.CONTAINER_SECURITY_CONTEXT}
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["labels"]["dcmdp.io/run"] == "demo" and pod["metadata"]["labels"]["extra"] == "yes"


def test_build_errors_name_the_field():
    with pytest.raises(children.BuildError, match="metadata.uid"):
        children.build(run_of({}), {"name": "demo", "namespace": "ml"}, token="t", config=CONFIG)
    long = {"name": "a" * 60, "namespace": "ml", "uid": "u"}
    with pytest.raises(children.BuildError, match="use a run name of at most 53 characters"):
        children.build(run_of({}), long, token="t", config=CONFIG)
    # the indexed Job's pod hostnames: <run>-trainer-<index>, the longest index counts
    edge = {"name": "a" * 52, "namespace": "ml", "uid": "u"}
    children.build(run_of({"trainer": {"replicas": 100}, "rollout": {"pools": [{"name": "p"}]}}), edge, token="t", config=CONFIG)
    with pytest.raises(children.BuildError, match="trainer-100' would be 64 characters") as err:
        children.build(run_of({"trainer": {"replicas": 101}, "rollout": {"pools": [{"name": "p"}]}}), edge, token="t", config=CONFIG)
    assert err.value.path == "metadata.name"
    digit = {"name": "7run", "namespace": "ml", "uid": "u"}
    with pytest.raises(children.BuildError, match="starting with a letter"):
        children.build(run_of({}), digit, token="t", config=CONFIG)
    from dcmdp_operator.podtemplate import TemplateError

    typo = {"rollout": {"pools": [{"name": "p", "template": {"nodeSelectr": {}}}]}}
    with pytest.raises(SpecError, match=r"spec\.rollout\.pools\[0\]\.template\.nodeSelectr: .*allow-list"):
        run_of(typo)
    # a short-form key the operator cannot place, where the admin allows any field
    wide = parse_run({"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "demo"}, "spec": typo}, allow_escalations=frozenset({"otherFields"}))
    with pytest.raises(TemplateError, match=r"spec\.rollout\.pools\[0\]\.template\.nodeSelectr"):
        children.build(wide, META, token="t", config=CONFIG)


def test_tokens_are_fresh_and_unreadable_secrets_give_none():
    a, b = children.new_token(), children.new_token()
    assert a != b and len(a) >= 40
    assert children.read_token(None) is None
    assert children.read_token({"data": {"token": "not base64!"}}) is None
    assert children.read_token({"data": {}}) is None
    assert children.read_accepted({"data": {"run.yaml": ": not yaml"}}) is None


@pytest.mark.parametrize("name", ["gpu-cluster.yaml", "kind-cpu.yaml", "quickstart.yaml"])
def test_examples_build(name):
    path = EXAMPLES / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the examples are part of the project")
    run = load_run(path)
    objs = children.build(run, {"name": run.metadata.name, "namespace": "default", "uid": "u"}, token="t", config=CONFIG)
    kinds = sorted({o["kind"] for o in objs})
    assert {"Secret", "ConfigMap", "Service", "Job", "Deployment"} <= set(kinds)
    assert sum(o["kind"] == "Deployment" for o in objs) == len(run.spec.rollout.pools)
