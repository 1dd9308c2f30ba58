"""rbac.RULES grants exactly what the operator uses: derived from the code and from its traffic."""

from __future__ import annotations

import os

import pytest
from kopf.testing import KopfRunner

from dcmdp.spec import parse_run
from dcmdp_operator import children, kube, rbac
from dcmdp_operator.config import CONFIG, OperatorConfig
from dcmdp_testing.emulator import EmulatorThread
from operator_helpers import Kube, api_requests, wait_for

VARIANTS = [
    {},
    {"checkpoint": {"pvc": {"enabled": True}}, "scheduling": {"gang": "volcano"}},
    {"scheduling": {"gang": "kueue", "queueName": "q"}, "suspend": True},
]


def child_kinds() -> set[str]:
    kinds = set()
    for spec in VARIANTS:
        run = parse_run({"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "r"}, "spec": spec})
        kinds |= {o["kind"] for o in children.build(run, {"name": "r", "namespace": "n", "uid": "u"}, token="t", config=OperatorConfig())}
    return kinds


def test_every_child_kind_is_known_and_granted_exactly_get_create_patch():
    kinds = child_kinds()
    assert kinds == {"Secret", "ConfigMap", "PersistentVolumeClaim", "PodGroup", "Service", "Job", "Deployment"}
    granted = rbac.triples()
    for kind in kinds:
        res = kube.RESOURCES[kind]
        for verb in ("get", "create", "patch", "update", "delete", "list", "watch"):
            assert ((res.group, res.plural, verb) in granted) == (verb in rbac.CHILD_VERBS), (kind, verb)


def test_rules_are_well_formed():
    for rule in rbac.RULES:
        assert set(rule) == {"apiGroups", "resources", "verbs"}
        assert all(isinstance(v, list) and v for v in rule.values())
    flat = [t for rule in rbac.RULES for t in rbac.triples([rule])]
    assert len(flat) == len(set(flat)), "a permission is granted twice"


@pytest.mark.timeout(120)
def test_the_operators_requests_need_exactly_the_rules(tmp_path):
    """Run the operator through create, resync, drift repair, update, suspend, finish + TTL and deletion, and
    compare every API request it sent with the rules: all covered, none unused."""
    saved = (CONFIG.poll_seconds, os.environ.get("KUBECONFIG"))
    ns = "rbac"
    with EmulatorThread() as emu:
        (tmp_path / "kubeconfig").write_text(emu.kubeconfig(ns))
        os.environ["KUBECONFIG"] = str(tmp_path / "kubeconfig")
        CONFIG.poll_seconds = 0.2
        k = Kube(emu.url)
        try:
            with KopfRunner(["run", "--standalone", "-n", ns, "-m", "dcmdp_operator.handlers"], timeout=30) as runner:
                for name, spec in (("one", VARIANTS[1] | {"ttlSecondsAfterFinished": 0}), ("two", {})):
                    k.create("DCMDPRun", ns, {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun",
                                              "metadata": {"name": name}, "spec": spec})
                wait_for(lambda: len(k.children(ns, "one")) == 7 and len(k.children(ns, "two")) == 5, what="children")
                # someone edits the children: the operator puts its labels back (a patch of each kind)
                drift = {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}}
                for kind, name in (("Secret", "one-token"), ("Service", "one-trainer"),
                                   ("PersistentVolumeClaim", "one-checkpoints"), ("ConfigMap", "one-config")):
                    k.patch(kind, ns, name, drift)
                    wait_for(lambda: "app.kubernetes.io/managed-by" in k.get(kind, ns, name)["metadata"]["labels"],
                             what=f"{kind} relabelled")
                # a safe change: more replicas in a pool (the Deployment and the PodGroup follow)
                k.patch("DCMDPRun", ns, "one", {"spec": {"rollout": {"pools": [{"name": "default", "replicas": 3}]}}})
                wait_for(lambda: k.get("PodGroup", ns, "one")["spec"]["minMember"] == 4, what="minMember 4")
                k.patch("DCMDPRun", ns, "two", {"spec": {"suspend": True}})
                wait_for(lambda: k.get("Job", ns, "two-trainer")["spec"]["suspend"], what="suspended")
                k.patch("Job", ns, "one-trainer", {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, sub="status")
                wait_for(lambda: k.get("DCMDPRun", ns, "one") is None, what="TTL deletion")
                k.delete("DCMDPRun", ns, "two")
                wait_for(lambda: k.get("DCMDPRun", ns, "two") is None, what="deletion")
        finally:
            CONFIG.poll_seconds = saved[0]
            if saved[1] is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved[1]
        used = {(r["group"], r["resource"], r["verb"]) for r in api_requests(emu)}
    assert runner.exception is None
    granted = rbac.triples()
    assert used - granted == set(), "requests the rules do not allow"
    assert granted - used - set(rbac.IMPLIED) == set(), "rules no request needed"
