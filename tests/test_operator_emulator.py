"""The API emulator the operator tests run against: what it adds to KMock behaves like Kubernetes."""

from __future__ import annotations

import pytest

from dcmdp_testing.emulator import EmulatorThread, kubeconfig
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


def test_dcmdprun_admission_follows_the_crd(k):
    # unknown fields and CEL rules are refused with the field named (HTTP 422)
    with pytest.raises(AssertionError, match=r"HTTP 422.*spec.algorithm.stepz"):
        k.create("DCMDPRun", "e", {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "a1"},
                                   "spec": {"algorithm": {"stepz": 3}}})
    with pytest.raises(AssertionError, match=r"HTTP 422.*lambdaInit"):
        k.create("DCMDPRun", "e", {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "a2"},
                                   "spec": {"algorithm": {"constraint": {"lambdaInit": 5.0, "lambdaMax": 1.0}}}})
    assert k.get("DCMDPRun", "e", "a2") is None
    # defaults are filled in, as the API server does from the CRD
    run = k.create("DCMDPRun", "e", {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "a3"}, "spec": {}})
    assert run["spec"]["algorithm"]["steps"] == 100 and run["spec"]["rollout"]["pools"][0]["name"] == "default"
    # updates too; removing a field brings its default back
    run = k.patch("DCMDPRun", "e", "a3", {"spec": {"algorithm": {"steps": 7}}})
    assert run["spec"]["algorithm"]["steps"] == 7 and run["metadata"]["generation"] == 2
    with pytest.raises(AssertionError, match=r"HTTP 422"):
        k.patch("DCMDPRun", "e", "a3", {"spec": {"algorithm": {"steps": -1}}})
    run = k.patch("DCMDPRun", "e", "a3", {"spec": {"algorithm": {"steps": None}}})
    assert run["spec"]["algorithm"]["steps"] == 100
    # the status must match the CRD's status schema
    with pytest.raises(AssertionError, match=r"HTTP 422.*restarts"):
        k.patch("DCMDPRun", "e", "a3", {"status": {"restarts": -1}}, sub="status")
    assert k.patch("DCMDPRun", "e", "a3", {"status": {"restarts": 2}}, sub="status")["status"]["restarts"] == 2


def test_tables_carry_the_printer_columns(k):
    k.create("DCMDPRun", "t", {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "tab"}, "spec": {}})
    k.patch("DCMDPRun", "t", "tab", {"status": {"phase": "Running", "step": 4, "reward": 0.5}}, sub="status")
    import json
    import urllib.request

    req = urllib.request.Request(k.url + "/apis/dcmdp.io/v1alpha1/namespaces/t/dcmdpruns/tab",
                                 headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"})
    table = json.loads(urllib.request.urlopen(req, timeout=5).read())
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:4] == ["Name", "Phase", "Step", "Steps"]
    row = dict(zip(names, table["rows"][0]["cells"]))
    assert (row["Name"], row["Phase"], row["Step"], row["Steps"], row["Reward"]) == ("tab", "Running", 4, 100, 0.5)
    assert row["Age"].endswith("s")


def test_discovery_names_the_core_group_v1(k):
    import json
    import urllib.request

    core = json.loads(urllib.request.urlopen(k.url + "/api/v1", timeout=5).read())
    assert core["groupVersion"] == "v1"
    names = {r["name"]: r for r in core["resources"]}
    assert names["secrets"]["singularName"] == "secret" and names["configmaps"]["shortNames"] == ["cm"]
    runs = json.loads(urllib.request.urlopen(k.url + "/apis/dcmdp.io/v1alpha1", timeout=5).read())
    by_name = {r["name"]: r for r in runs["resources"]}
    assert by_name["dcmdpruns"]["shortNames"] == ["dcr"] and by_name["dcmdpruns/status"]["shortNames"] == []


def test_kubectl_works_against_it(tmp_path):
    from pathlib import Path
    import subprocess

    kubectl = Path(__file__).resolve().parent.parent / ".tools" / "kubectl"
    if not kubectl.exists():
        pytest.fail("no .tools/kubectl: run make tools (make test does)")
    example = Path(__file__).resolve().parent.parent / "examples" / "kind-cpu.yaml"
    with EmulatorThread() as emu:
        (tmp_path / "config").write_text(emu.kubeconfig("demo"))
        env = {"KUBECONFIG": str(tmp_path / "config"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        run = lambda *a: subprocess.run([str(kubectl), *a], env=env, capture_output=True, text=True, timeout=60)  # noqa: E731
        out = run("create", "--validate=false", "-f", str(example))
        assert out.returncode == 0, out.stderr
        Kube(emu.url).create("Secret", "demo", {"metadata": {"name": "s1"}})
        out = run("get", "dcr")
        assert out.returncode == 0, out.stderr
        header = out.stdout.splitlines()[0].split()
        assert header[:5] == ["NAME", "PHASE", "STEP", "STEPS", "REWARD"] and "kind-cpu" in out.stdout
        out = run("get", "secret", "s1", "-o", "jsonpath={.metadata.name}")
        assert out.returncode == 0 and out.stdout == "s1", out.stderr
