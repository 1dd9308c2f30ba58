"""The Helm chart, rendered by the real helm binary: lint, both RBAC modes, every manifest valid."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dcmdp import spec as S
from dcmdp_testing.admission import admit
from dcmdp_operator import config as operator_config
from dcmdp_operator.main import parse_args
from dcmdp_operator.rbac import RULES

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "dcmdp"
HELM = REPO / ".tools" / "helm"
K8S = "1.33.0"
NS = "dcmdp-system"

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="no helm binary: run `make tools`")


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return env


def helm(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(HELM), *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def render(env: dict[str, str], *sets: str, values: Any = None, tmp: Path | None = None) -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "--namespace", NS]
    for s in sets:
        args += ["--set", s]
    if values is not None:
        assert tmp is not None
        f = tmp / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        args += ["-f", str(f)]
    out = helm(env, *args).stdout
    return [d for d in yaml.load_all(out, Loader=S.YAMLLoader) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = by_kind(docs, "Deployment")
    return dep


# -------------------------------------------------------------------------------- generated files
def _sync_module() -> Any:
    spec = importlib.util.spec_from_file_location("sync_chart", REPO / "scripts" / "sync-chart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_chart_files_are_current() -> None:
    for path, text in _sync_module().outputs().items():
        assert path.exists() and path.read_text() == text, f"{path} is stale: run python scripts/sync-chart.py"


def test_chart_crd_is_the_generated_crd() -> None:
    assert (CHART / "crds" / "dcmdp.io_dcmdpruns.yaml").read_text() == (REPO / "crds" / "dcmdp.io_dcmdpruns.yaml").read_text()


# ------------------------------------------------------------------------------------------ lint
@pytest.mark.parametrize("sets", [[], ["watchNamespaces={team-a,team-b}"], ["metrics.serviceMonitor.enabled=true"]])
def test_helm_lint(helm_env: dict[str, str], sets: list[str]) -> None:
    args = ["lint", str(CHART), "--strict"]
    for s in sets:
        args += ["--set", s]
    proc = helm(helm_env, *args)
    assert "0 chart(s) failed" in proc.stdout


# -------------------------------------------------------------------------------------- RBAC
def test_default_mode_is_cluster_wide_with_exactly_the_operator_rules(helm_env: dict[str, str]) -> None:
    docs = render(helm_env)
    (role,) = by_kind(docs, "ClusterRole")
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert role["rules"] == RULES
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (sa,) = by_kind(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NS}]
    args = parse_args(deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.all_namespaces and args.namespace == []


def test_namespaced_mode_has_a_role_per_namespace_and_nothing_cluster_wide(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, "watchNamespaces={team-a,team-b}")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles, bindings = by_kind(docs, "Role"), by_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert role["rules"] == RULES
    (sa,) = by_kind(docs, "ServiceAccount")
    for b in bindings:
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[0]["metadata"]["name"]}
        assert b["subjects"][0]["namespace"] == NS and b["subjects"][0]["name"] == sa["metadata"]["name"]
    args = parse_args(deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.namespace == ["team-a", "team-b"] and not args.all_namespaces


def test_rules_grant_no_wildcards_and_no_pod_access() -> None:
    for rule in RULES:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "pods" not in rule["resources"]


def test_rbac_can_be_left_to_the_cluster_admin(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, "rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}
    assert deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# ------------------------------------------------------------------------------------ deployment
def test_operator_pod_is_locked_down(helm_env: dict[str, str]) -> None:
    pod = deployment(render(helm_env))["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the only writable place


def test_probes_hit_the_kopf_liveness_endpoint(helm_env: dict[str, str]) -> None:
    dep = deployment(render(helm_env))
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = parse_args(c["args"])
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"]["path"] == "/healthz" and port[probe["httpGet"]["port"]] == 8080
    assert args.metrics_port == port["metrics"] == 8000
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}  # kopf standalone


def test_env_is_what_the_operator_reads(helm_env: dict[str, str]) -> None:
    (c,) = deployment(render(helm_env, "runImages.trainer=reg.example/t:1", "pollSeconds=3"))["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    source = Path(operator_config.__file__).read_text()
    for name in (n for n in env if n.startswith("DCMDP_")):
        assert f'"{name}"' in source, f"the operator does not read {name}"
    os_env = dict(os.environ)
    try:
        os.environ.update(env)
        cfg = operator_config.OperatorConfig.from_env()
    finally:
        os.environ.clear()
        os.environ.update(os_env)
    assert cfg.trainer_image == "reg.example/t:1" and cfg.poll_seconds == 3.0
    assert cfg.allow_escalations == frozenset()  # the chart's default: restricted pods only
    assert cfg.rollout_image == "ghcr.io/dcmdp/rollout:0.1.0"


def test_images_and_pull_secrets_are_settable(helm_env: dict[str, str]) -> None:
    pod = deployment(
        render(helm_env, "image.repository=reg.example/op", "image.tag=v9", "imagePullSecrets[0].name=regcred")
    )["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "reg.example/op:v9"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    default = deployment(render(helm_env))["spec"]["template"]["spec"]
    assert default["containers"][0]["image"].endswith(":0.1.0") and "imagePullSecrets" not in default


def test_metrics_off_removes_service_and_port(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, "metrics.enabled=false", "metrics.serviceMonitor.enabled=true")
    assert not by_kind(docs, "Service") and not by_kind(docs, "ServiceMonitor")
    (c,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert parse_args(c["args"]).metrics_port == 0
    assert [p["name"] for p in c["ports"]] == ["health"]


def test_service_monitor_only_when_enabled(helm_env: dict[str, str]) -> None:
    assert not by_kind(render(helm_env), "ServiceMonitor")
    docs = render(helm_env, "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom")
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = by_kind(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["metadata"]["labels"]["release"] == "prom"


# ------------------------------------------------------------------------- all manifests valid
MODES = {
    "default": [],
    "namespaced": ["watchNamespaces={team-a,team-b}"],
    "everything": ["metrics.serviceMonitor.enabled=true", "imagePullSecrets[0].name=r", "nodeSelector.pool=ops",
                   "tolerations[0].key=ops", "tolerations[0].operator=Exists", "priorityClassName=high"],
}


@pytest.mark.parametrize("mode", MODES)
def test_rendered_manifests_pass_kubernetes_validate_strict(helm_env: dict[str, str], mode: str, tmp_path: Path) -> None:
    values = {"runs": [{"name": "from-values", "spec": {"algorithm": {"steps": 5}}}]}
    docs = render(helm_env, *MODES[mode], values=values, tmp=tmp_path)
    checked = set()
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # not a built-in kind; its shape is checked above
            continue
        if doc["kind"] == "DCMDPRun":
            stored, errors = admit(doc)
            assert not errors, errors
            S.parse_run(doc)
        else:
            kubernetes_validate.validate(doc, K8S, strict=True)
        checked.add(doc["kind"])
    assert {"Deployment", "ServiceAccount", "DCMDPRun"} <= checked


def test_kubernetes_validate_catches_a_bad_rendered_field(helm_env: dict[str, str]) -> None:
    dep = deployment(render(helm_env))
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S, strict=True)


# --------------------------------------------------------------------------------- values schema
def test_default_values_are_valid() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft4Validator(schema).validate(values)
    # runDefaults is a spec fragment: valid under the model and the CRD on its own
    S.parse_run({"metadata": {"name": "x"}, "spec": values["runDefaults"]})
    assert admit({"apiVersion": S.API_VERSION, "kind": S.KIND, "metadata": {"name": "x"}, "spec": values["runDefaults"]})[1] == []


def test_run_defaults_merge_under_each_run(helm_env: dict[str, str], tmp_path: Path) -> None:
    values = {
        "runDefaults": {"failurePolicy": {"maxRestarts": 7}, "trainer": {"precision": "bf16"}},
        "runs": [
            {"name": "a", "spec": {"trainer": {"replicas": 2}}},
            {"name": "b", "namespace": "team-b", "labels": {"team": "b"}, "spec": {"failurePolicy": {"maxRestarts": 1}}},
        ],
    }
    runs = by_kind(render(helm_env, values=values, tmp=tmp_path), "DCMDPRun")
    a, b = (S.parse_run(r) for r in runs)
    assert a.spec.trainer.replicas == 2 and a.spec.trainer.precision == "bf16" and a.spec.failure_policy.max_restarts == 7
    assert b.spec.failure_policy.max_restarts == 1 and b.metadata.namespace == "team-b"
    assert runs[0]["metadata"]["namespace"] == NS and runs[1]["metadata"]["labels"]["team"] == "b"


def test_gpu_values_example_trains_one_rank_per_gpu(helm_env: dict[str, str], tmp_path: Path) -> None:
    """examples/helm/gpu-values.yaml: its runs are on cuda with a micro-batch budget, and their
    trainer pods start one rank per GPU (torchrun, 8 per pod)."""
    from dcmdp_operator import children
    from dcmdp_operator.config import OperatorConfig

    values = yaml.safe_load((REPO / "examples" / "helm" / "gpu-values.yaml").read_text())
    (doc,) = by_kind(render(helm_env, values=values, tmp=tmp_path), "DCMDPRun")
    run = S.parse_run(doc)
    t = run.spec.trainer
    assert t.device == "cuda" and t.gpus_per_replica == 8 and t.micro_batch_tokens > 0 and t.replicas == 2
    objs = children.build(run, {"name": run.metadata.name, "namespace": NS, "uid": "u"}, token="t",
                          config=OperatorConfig(trainer_image="t:1", rollout_image="r:1"))
    (job,) = [o for o in objs if o["kind"] == "Job"]
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:5] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8"]


@pytest.mark.parametrize(
    "sets, field",
    [
        (["image.pullPolicy=Sometimes"], "pullPolicy"),
        (["watchNamespaces={Team_A}"], "watchNamespaces"),
        (["pollSeconds=0"], "pollSeconds"),
        (["podSecurity.allow={root}"], "podSecurity"),
        (["metrics.port=70000"], "port"),
        (["runDefaults.algorithm.steps=0"], "steps"),
        (["runDefaults.algorithm.stepz=5"], "stepz"),
        (["runDefaults.rollout.pools[0].name=Bad_Name"], "name"),
        (["runs[0].spec.suspend=1"], "runs"),
        (["surprise=1"], "surprise"),
    ],
)
def test_bad_values_are_rejected_by_the_schema(helm_env: dict[str, str], sets: list[str], field: str) -> None:
    args = ["template", "rel", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = helm(helm_env, *args, check=False)
    assert proc.returncode != 0
    assert "schema" in proc.stderr.lower() and re.search(field, proc.stderr), proc.stderr
