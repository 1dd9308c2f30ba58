"""One reconcile, called directly, against the API emulator with the CRD's admission switched off
(as when the CRD is missing or out of date): the operator's own checks answer."""

from __future__ import annotations

import asyncio
import base64

import kopf
import pytest

from dcmdp_operator import kube, reconcile
from dcmdp_operator.config import OperatorConfig
from dcmdp_testing.emulator import EmulatorThread
from certs import self_signed
from operator_helpers import FakeTrainer, Kube

NS = "rc"
CONFIG = OperatorConfig(trainer_address="127.0.0.1:1", grpc_timeout_seconds=0.5)


@pytest.fixture(scope="module")
def emu():
    with EmulatorThread() as e:
        e.emulator.admission = False
        yield e


def reconcile_once(emu, name: str, config: OperatorConfig = CONFIG) -> reconcile.Result:
    async def go() -> reconcile.Result:
        client = kube.Client()
        client.configure(kopf.ConnectionInfo(server=emu.url, token="x"))
        try:
            body = Kube(emu.url).get("DCMDPRun", NS, name)
            return await reconcile.reconcile(body, client=client, config=config, trigger="test")
        finally:
            await client.close()
    return asyncio.run(go())


def make(k: Kube, name: str, spec: dict) -> None:
    k.create("DCMDPRun", NS, {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": name}, "spec": spec})


def test_an_invalid_spec_fails_with_the_field_named_then_recovers_when_fixed(emu):
    k = Kube(emu.url)
    make(k, "bad", {"algorithm": {"constraint": {"lambdaInit": 5.0, "lambdaMax": 1.0}}})
    result = reconcile_once(emu, "bad")
    st = k.get("DCMDPRun", NS, "bad")["status"]
    assert st == {k: v for k, v in result.status.items() if v is not None}  # None: removed by the merge patch
    assert st["phase"] == "Failed" and st["reason"] == "InvalidSpec"
    assert "spec.algorithm.constraint" in st["message"] and "lambdaInit" in st["message"]
    assert result.events == [("Warning", "Failed", st["message"])]
    assert k.children(NS, "bad") == {}
    k.patch("DCMDPRun", NS, "bad", {"spec": {"algorithm": {"constraint": {"lambdaInit": 0.5}}}})
    result = reconcile_once(emu, "bad")
    assert result.status["phase"] == "Pending" and len(k.children(NS, "bad")) == 5


def test_names_too_long_for_kubernetes_are_an_invalid_spec(emu):
    k = Kube(emu.url)
    make(k, "n" * 58, {})  # longer than the shared run-name rule allows (dcmdp.names)
    st = reconcile_once(emu, "n" * 58).status
    assert st["phase"] == "Failed" and st["reason"] == "InvalidSpec" and "at most 51" in st["message"]
    make(k, "m" * 50, {"rollout": {"pools": [{"name": "p" * 10}]}})  # <run>-rollout-<pool> too long
    st = reconcile_once(emu, "m" * 50).status
    assert st["phase"] == "Failed" and "spec.rollout.pools[0].name" in st["message"]


def test_a_foreign_object_in_the_way_is_reported_and_left_alone(emu):
    k = Kube(emu.url)
    k.create("ConfigMap", NS, {"metadata": {"name": "clash-config", "labels": {"dcmdp.io/run": "clash"}}, "data": {"mine": "1"}})
    make(k, "clash", {})
    result = reconcile_once(emu, "clash")
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict" and "ConfigMap clash-config" in ready["message"]
    assert k.get("ConfigMap", NS, "clash-config")["data"] == {"mine": "1"}  # untouched
    assert ("Job", "clash-trainer") in k.children(NS, "clash")  # the rest is built


def test_a_second_reconcile_writes_nothing_but_the_status(emu):
    k = Kube(emu.url)
    make(k, "twice", {"rollout": {"pools": [{"name": "a"}, {"name": "b"}]}})
    first = reconcile_once(emu, "twice")
    assert sorted(w[0] for w in first.writes) == ["ConfigMap", "Deployment", "Deployment", "Job", "Secret", "Service"]
    assert all(w[2] == "created" for w in first.writes)
    second = reconcile_once(emu, "twice")
    assert second.writes == [] and second.events == []
    # the trainer is "running" but not reachable: reported, not raised
    k.patch("Job", NS, "twice-trainer", {"status": {"active": 1}}, sub="status")
    third = reconcile_once(emu, "twice")
    assert third.status["phase"] == "Running" and third.status["trainerReachable"] is False
    ready = next(c for c in third.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "TrainerUnreachable" and "127.0.0.1:1" in ready["message"]


def test_lost_secret_and_config_are_recreated_without_touching_the_rest(emu):
    k = Kube(emu.url)
    make(k, "lost", {})
    reconcile_once(emu, "lost")
    job_rv = k.get("Job", NS, "lost-trainer")["metadata"]["resourceVersion"]
    k.delete("Secret", NS, "lost-token")
    k.delete("ConfigMap", NS, "lost-config")
    result = reconcile_once(emu, "lost")  # looks like a new run: creates first, conflicts fall back
    assert sorted(result.writes) == [("ConfigMap", "lost-config", "created"), ("Secret", "lost-token", "created")]
    assert k.get("Job", NS, "lost-trainer")["metadata"]["resourceVersion"] == job_rv


def test_tls_status_reads_use_the_runs_secret(emu, tmp_path):
    """spec.tls: the pods get the key pair and the CA, the operator reads the status over TLS with
    the CA from the Secret, and a missing Secret is reported, never answered in plaintext."""
    k = Kube(emu.url)
    cert, key = self_signed(tmp_path, ("secure-trainer-0.secure-trainer",))
    make(k, "secure", {"tls": {"secretName": "secure-tls", "caKey": "tls.crt"}})
    with FakeTrainer(tls=(cert.read_bytes(), key.read_bytes())) as trainer:
        config = OperatorConfig(trainer_address=f"127.0.0.1:{trainer.port}", grpc_timeout_seconds=2)
        reconcile_once(emu, "secure", config)
        kids = k.children(NS, "secure")
        trainer_pod = kids[("Job", "secure-trainer")]["spec"]["template"]["spec"]
        assert trainer_pod["containers"][0]["command"][-4:] == ["--tls-cert", "/etc/dcmdp/tls/tls.crt", "--tls-key", "/etc/dcmdp/tls/tls.key"]
        pool_pod = kids[("Deployment", "secure-rollout-default")]["spec"]["template"]["spec"]
        assert pool_pod["containers"][0]["command"][-4:] == ["--tls-ca", "/etc/dcmdp/tls/ca.crt", "--server-name", "secure-trainer-0.secure-trainer"]
        assert {"name": "dcmdp-tls", "secret": {"secretName": "secure-tls", "items": [{"key": "tls.crt", "path": "ca.crt"}]}} in pool_pod["volumes"]
        k.patch("Job", NS, "secure-trainer", {"status": {"active": 1}}, sub="status")
        result = reconcile_once(emu, "secure", config)
        ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "TrainerUnreachable" and "Secret secure-tls has no key 'tls.crt' (no such Secret)" in ready["message"]
        assert trainer.calls == 0  # nothing was sent in plaintext
        token = base64.b64decode(k.get("Secret", NS, "secure-token")["data"]["token"]).decode()
        trainer.statuses[token] = {"phase": "Running", "step": 4, "total_steps": 100}
        k.create("Secret", NS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "secure-tls"}, "type": "kubernetes.io/tls",
                                "data": {n: base64.b64encode(p.read_bytes()).decode() for n, p in (("tls.crt", cert), ("tls.key", key))}})
        result = reconcile_once(emu, "secure", config)
        assert result.status["step"] == 4 and result.status["trainerReachable"] is True
