"""The API emulator the operator tests run against: what it adds to KMock behaves like Kubernetes."""

from __future__ import annotations

import pytest

from dcmdp_operator.emulator import EmulatorThread, kubeconfig
from operator_helpers import Kube, wait_for


@pytest.fixture(scope="module")
def k():
    with EmulatorThread() as emu:
        yield Kube(emu.url)


def test_metadata_generation_and_the_status_subresource(k):
    run = k.create("DCMDPRun", "e", {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun",
                                     "metadata": {"name": "g"}, "spec": {"suspend": False}, "status": {"phase": "X"}})
    md = run["metadata"]
    assert md["uid"] and md["creationTimestamp"].endswith("Z") and md["generation"] == 1 and md["namespace"] == "e"
    assert "status" not in run  # ignored on create, as with a status subresource
    rv = int(md["resourceVersion"])
    after = k.patch("DCMDPRun", "e", "g", {"metadata": {"annotations": {"a": "b"}}, "status": {"phase": "Y"}})
    assert after["metadata"]["generation"] == 1 and "status" not in after  # metadata only; status ignored
    assert int(after["metadata"]["resourceVersion"]) > rv
    after = k.patch("DCMDPRun", "e", "g", {"status": {"phase": "Running"}, "spec": {"suspend": True}}, sub="status")
    assert after["status"] == {"phase": "Running"} and after["spec"]["suspend"] is False
    assert after["metadata"]["generation"] == 1
    after = k.patch("DCMDPRun", "e", "g", {"spec": {"suspend": True}})
    assert after["metadata"]["generation"] == 2 and after["metadata"]["uid"] == md["uid"]
    same = k.patch("DCMDPRun", "e", "g", {"spec": {"suspend": True}})
    assert same["metadata"]["generation"] == 2  # no change, no new generation


def test_deleting_an_owner_collects_what_it_owned(k):
    owner = k.create("ConfigMap", "e", {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    child = k.create("Secret", "e", {"metadata": {"name": "child", "ownerReferences": [ref]}})
    grandchild_ref = {"apiVersion": "v1", "kind": "Secret", "name": "child", "uid": child["metadata"]["uid"]}
    k.create("Service", "e", {"metadata": {"name": "grandchild", "ownerReferences": [grandchild_ref]}})
    k.create("Service", "e", {"metadata": {"name": "bystander"}})
    k.delete("ConfigMap", "e", "owner")
    wait_for(lambda: k.get("Secret", "e", "child") is None and k.get("Service", "e", "grandchild") is None, what="GC")
    assert k.get("Service", "e", "bystander") is not None


def test_generate_name_and_typed_lists(k):
    ev = k.create("Event", "e", {"metadata": {"generateName": "run."}, "reason": "X"})
    assert ev["metadata"]["name"].startswith("run.") and len(ev["metadata"]["name"]) > 4
    listing = k._req("GET", "/api/v1/namespaces/e/events")
    assert listing["kind"] == "EventList" and listing["apiVersion"] == "v1"


def test_kubeconfig_points_at_the_emulator():
    text = kubeconfig("http://127.0.0.1:1234", "ns1")
    assert "server: http://127.0.0.1:1234" in text and "namespace: ns1" in text and "current-context: emulator" in text
