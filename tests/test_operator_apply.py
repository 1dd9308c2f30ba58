"""Create-or-patch: the pure comparison, and the real client against the API emulator."""

from __future__ import annotations

import asyncio

import kopf
import pytest

from dcmdp.spec import parse_run
from dcmdp_operator import apply, children, kube
from dcmdp_operator.apply import is_subset, patchable
from dcmdp_operator.config import OperatorConfig
from dcmdp_testing.emulator import EmulatorThread


def test_is_subset():
    assert is_subset({"a": 1}, {"a": 1, "b": 2})
    assert not is_subset({"a": 1, "c": 1}, {"a": 1})
    assert is_subset({"l": [{"x": 1}]}, {"l": [{"x": 1, "y": 2}]})
    assert not is_subset({"l": [{"x": 1}]}, {"l": [{"x": 1}, {"x": 2}]})
    assert is_subset({"gpu": 1}, {"gpu": "1"})  # the server stringifies quantities
    assert not is_subset({"flag": True}, {"flag": "True"})
    assert not is_subset({"a": {"b": 1}}, {"a": 1})


def test_patchable_keeps_immutable_and_write_once_fields_out():
    run = parse_run({"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "r"},
                     "spec": {"checkpoint": {"pvc": {"enabled": True}}}})
    objs = {o["kind"]: o for o in children.build(run, {"name": "r", "namespace": "n", "uid": "u"}, token="t", config=OperatorConfig())}
    assert set(patchable(objs["Job"])["spec"]) == {"suspend", "parallelism"}
    assert "data" not in patchable(objs["Secret"])  # the token is never rewritten
    assert patchable(objs["PersistentVolumeClaim"])["spec"] == {"resources": {"requests": {"storage": "10Gi"}}}
    assert patchable(objs["Deployment"])["spec"] == objs["Deployment"]["spec"]


@pytest.fixture(scope="module")
def emu():
    with EmulatorThread() as e:
        yield e


def test_apply_creates_once_patches_changes_and_refuses_foreign_objects(emu):
    async def scenario():
        client = kube.Client()
        client.configure(kopf.ConnectionInfo(server=emu.url, token="x"))
        run = parse_run({"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "r"}, "spec": {}})
        meta = {"name": "r", "namespace": "ap", "uid": "uid-1"}
        objs = {o["kind"]: o for o in children.build(run, meta, token="tok-1", config=OperatorConfig())}
        dep = objs["Deployment"]
        created, action = await apply.apply(client, dep)
        assert action == "created" and created["metadata"]["uid"]
        again, action = await apply.apply(client, dep)
        assert action == "unchanged"
        scaled = {**dep, "spec": {**dep["spec"], "replicas": 7}}
        patched, action = await apply.apply(client, scaled)
        assert action == "patched" and patched["spec"]["replicas"] == 7
        # the Secret keeps its first token whatever a later build says
        await apply.apply(client, objs["Secret"])
        other = next(o for o in children.build(run, meta, token="tok-2", config=OperatorConfig()) if o["kind"] == "Secret")
        kept, action = await apply.apply(client, other)
        assert action == "unchanged" and children.read_token(kept) == "tok-1"
        # an object of the same name owned by someone else is left alone
        foreign = {**objs["ConfigMap"], "metadata": {**objs["ConfigMap"]["metadata"], "ownerReferences": []}}
        await client.create(kube.RESOURCES["ConfigMap"], "ap", foreign)
        with pytest.raises(apply.ChildConflict, match="not owned by this run"):
            await apply.apply(client, objs["ConfigMap"])
        # errors carry the status and the path
        with pytest.raises(kube.APIError, match="HTTP 409"):
            await client.create(kube.RESOURCES["ConfigMap"], "ap", foreign)
        await client.close()

    asyncio.run(scenario())
