"""Pod security: escalations in a template are refused by the spec model, by the CRD's CEL rules
and by the operator on the final pod; rendered children meet the `restricted` standard; a cluster
admin's allow-list widens all three."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from dcmdp import crd as C
from dcmdp import podsecurity
from dcmdp_testing.admission import admit
from dcmdp.spec import SpecError, load_run, parse_run
from dcmdp_operator import children
from dcmdp_operator.config import OperatorConfig
from restricted_pss import check as restricted
from test_crd import ESCALATING_TEMPLATES, SAFE_TEMPLATES

META = {"name": "demo", "namespace": "ml", "uid": "uid-1"}
CONFIG = OperatorConfig(trainer_image="reg/trainer:1", rollout_image="reg/rollout:1")
EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))

# The manifest from the issue: every escalation at once, in the trainer and in a pool.
ATTACK: dict[str, Any] = {
    "spec": {
        "hostPID": True,
        "hostNetwork": True,
        "serviceAccountName": "dcmdp-operator",
        "securityContext": {"runAsUser": 0},
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "containers": [
            {"name": "trainer", "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}},
            {"name": "miner", "image": "evil/sidecar", "securityContext": {"privileged": True}},
        ],
    }
}


def manifest(template: dict[str, Any], pool_template: dict[str, Any] | None = None) -> dict[str, Any]:
    pool: dict[str, Any] = {"name": "p"}
    if pool_template is not None:
        pool["template"] = pool_template
    return {
        "apiVersion": "dcmdp.io/v1alpha1",
        "kind": "DCMDPRun",
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": {"trainer": {"template": template}, "rollout": {"pools": [pool]}},
    }


def pod_templates(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"] for o in objs if o["kind"] in ("Job", "Deployment")]


def test_the_attack_is_refused_by_model_and_cel_naming_every_field() -> None:
    m = manifest(ATTACK, ATTACK)
    with pytest.raises(SpecError) as err:
        parse_run(m)
    text = str(err.value)
    for field in ("hostPID", "hostNetwork", "serviceAccountName", "runAsUser", "hostPath", "privileged", "capabilities.add", "containers[1]"):
        assert field in text, field
    assert "spec.rollout.pools[0].template" in text and "podSecurity.allow" in text
    stored, errors = admit(m)
    assert stored is None
    paths = {p for p, _ in errors}
    for path in (
        "spec.trainer.template.spec.hostPID",
        "spec.trainer.template.spec.volumes[0].hostPath",
        "spec.trainer.template.spec.containers[1].securityContext.privileged",
        "spec.trainer.template.spec.containers[0].securityContext.capabilities.add",
        "spec.rollout.pools[0].template.spec.serviceAccountName",
        "spec.rollout.pools[0].template.spec.securityContext.runAsUser",
    ):
        assert path in paths, (path, sorted(paths))


@pytest.mark.parametrize("label,template,field", ESCALATING_TEMPLATES, ids=[t[0] for t in ESCALATING_TEMPLATES])
def test_each_escalation_is_refused_and_allowed_only_by_its_own_name(label: str, template: dict, field: str) -> None:
    found = podsecurity.violations(template, "t")
    assert len(found) == 1 and field in found[0][0]
    name = next(e for e in podsecurity.ESCALATIONS if podsecurity.violations(template, "t", allow={e}) == [])
    others = frozenset(podsecurity.ESCALATIONS) - {name}
    assert podsecurity.violations(template, "t", allow=others) == found
    with pytest.raises(SpecError):
        parse_run(manifest(template), allow_escalations=others)
    parse_run(manifest(template), allow_escalations=frozenset({name}))
    # the CRD generated for that allow-list admits it too; the committed one refuses it
    schema = C.crd(frozenset({name}))
    assert admit(manifest(template))[1]
    assert not _admit_with(schema, manifest(template))


def _admit_with(crd: dict[str, Any], m: dict[str, Any]) -> list[tuple[str, str]]:
    from dcmdp_testing import admission

    admission._root_schema.cache_clear()
    original = admission.C.crd
    admission.C.crd = lambda: crd  # type: ignore[assignment]
    try:
        return admission.admit(m)[1]
    finally:
        admission.C.crd = original  # type: ignore[assignment]
        admission._root_schema.cache_clear()


def test_allow_names_are_checked() -> None:
    assert podsecurity.check_allow(["hostPath"]) == {"hostPath"}
    with pytest.raises(ValueError, match="unknown escalation 'root'"):
        podsecurity.check_allow(["root"])
    with pytest.raises(SystemExit):
        C.main(["--allow", "root"])


@pytest.mark.parametrize("label,template", SAFE_TEMPLATES, ids=[t[0] for t in SAFE_TEMPLATES])
def test_harmless_templates_build_restricted_pods(label: str, template: dict) -> None:
    run = parse_run(manifest(template, template))
    for pod in pod_templates(children.build(run, META, token="t", config=CONFIG)):
        assert restricted(pod) == [], label


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_renders_restricted_valid_pods(path: Path) -> None:
    objs = children.build(load_run(path), META, token="t", config=CONFIG)
    for obj in objs:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
    pods = pod_templates(objs)
    assert pods
    for pod in pods:
        assert restricted(pod) == [], path.name
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
        assert spec["securityContext"]["fsGroup"] == children.RUN_AS_USER  # the checkpoint PVC is writable
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_the_operator_refuses_an_escalation_the_model_let_through() -> None:
    """Defense in depth: a run parsed with an allow-list the operator does not share."""
    run = parse_run(manifest({"hostNetwork": True}), allow_escalations=frozenset({"hostNamespaces"}))
    with pytest.raises(children.BuildError) as err:
        children.build(run, META, token="t", config=CONFIG)
    assert err.value.path == "spec.trainer.template.hostNetwork"


def test_an_admin_allow_list_gives_working_but_unrestricted_pods() -> None:
    allow = frozenset(podsecurity.ESCALATIONS)
    config = OperatorConfig(trainer_image="t", rollout_image="r", allow_escalations=allow)
    run = parse_run(manifest(ATTACK), allow_escalations=allow)
    job = next(o for o in children.build(run, META, token="t", config=config) if o["kind"] == "Job")
    pod = job["spec"]["template"]
    kubernetes_validate.validate(job, "1.33.0", strict=True)
    assert {p for p, _ in restricted(pod)} >= {"spec.hostPID", "spec.volumes[0].hostPath", "spec.securityContext.runAsUser"}
    main, sidecar = pod["spec"]["containers"]
    # what the API server and kubelet would refuse is left out: privileged without
    # allowPrivilegeEscalation false, uid 0 without runAsNonRoot
    assert main["securityContext"]["privileged"] is True and "allowPrivilegeEscalation" not in main["securityContext"]
    assert "runAsNonRoot" not in pod["spec"]["securityContext"] and "runAsNonRoot" not in sidecar["securityContext"]
    assert pod["spec"]["serviceAccountName"] == "dcmdp-operator"


def test_operator_reads_the_allow_list_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMDP_POD_SECURITY_ALLOW", "hostPath, runAsRoot")
    assert OperatorConfig.from_env().allow_escalations == {"hostPath", "runAsRoot"}
    monkeypatch.setenv("DCMDP_POD_SECURITY_ALLOW", "everything")
    with pytest.raises(ValueError, match="DCMDP_POD_SECURITY_ALLOW"):
        OperatorConfig.from_env()


def test_the_model_declares_exactly_the_allow_list() -> None:
    """The CRD's template schema (from the model) and the checker agree on what is allowed."""
    from dcmdp import spec as S

    def aliases(model: Any) -> set[str]:
        return {f.alias or n for n, f in model.model_fields.items()}

    P = podsecurity
    assert aliases(S.PodFields) == P.POD_FIELDS | set(P.GATED_POD_FIELDS)
    assert aliases(S.PodTemplate) == aliases(S.PodFields) | P.SHORT_CONTAINER_FIELDS | P.TEMPLATE_METADATA_FIELDS | {"spec", "metadata"}
    assert aliases(S.ContainerFields) == P.SHORT_CONTAINER_FIELDS
    assert aliases(S.Container) == P.CONTAINER_FIELDS
    assert aliases(S.TemplateMetadata) == P.TEMPLATE_METADATA_FIELDS
    assert aliases(S.PodSecurityContext) == P.POD_SECURITY_CONTEXT_FIELDS
    assert aliases(S.ContainerSecurityContext) == P.CONTAINER_SECURITY_CONTEXT_FIELDS
    assert aliases(S.ContainerPort) == P.PORT_FIELDS
    assert aliases(S.VolumeMount) == P.VOLUME_MOUNT_FIELDS
    assert (aliases(S.EnvVar), aliases(S.EnvVarSource), aliases(S.EnvFromSource)) == (P.ENV_FIELDS, P.ENV_SOURCE_FIELDS, P.ENV_FROM_FIELDS)
    assert aliases(S.Volume) == P.VOLUME_KINDS | {"name", "hostPath", "secret"}
    assert (aliases(S.ProjectedVolume), aliases(S.ProjectedSource)) == (P.PROJECTED_FIELDS, P.PROJECTED_SOURCES)


def test_the_final_pod_check_knows_the_operators_own_secret() -> None:
    """The run's token volume is the operator's; a user's volume of the same Secret is refused."""
    mine = {"volumes": [{"name": "dcmdp-token", "secret": {"secretName": "demo-token"}}], "restartPolicy": "Never"}
    assert podsecurity.violations(mine, "p", own_secrets=frozenset({"demo-token"}), operator_fields=children.OPERATOR_POD_FIELDS) == []
    assert sorted(p for p, _ in podsecurity.violations(mine, "p")) == ["p.restartPolicy", "p.volumes[0].secret"]
    other = {"volumes": [{"name": "x", "secret": {"secretName": "other-token"}}]}
    assert podsecurity.violations(other, "p", own_secrets=frozenset({"demo-token"}))[0][0] == "p.volumes[0].secret"


def test_tls_pods_mount_only_the_runs_own_secrets_and_stay_restricted() -> None:
    m = manifest({}, {})
    m["spec"]["tls"] = {"secretName": "demo-tls"}
    objs = children.build(parse_run(m), META, token="t", config=CONFIG)
    for pod in pod_templates(objs):
        assert restricted(pod) == []
        secrets = {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
        assert secrets == {"demo-token", "demo-tls"}
    for obj in objs:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
