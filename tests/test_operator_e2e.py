"""End to end without a cluster: the operator (kopf) against the API emulator, and the real trainer
and rollout worker processes started the way their pods would be — the trainer on the run's
ConfigMap (`run.yaml`) and token Secret — while the test plays the Job controller. The run's status
follows the real trainer's GetStatus through to Succeeded."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys

import pytest
from kopf.testing import KopfRunner

from dcmdp_operator.config import CONFIG
from dcmdp_testing.emulator import EmulatorThread
from operator_helpers import Kube, wait_for

NS = "e2e"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SPEC = {
    "model": {"builtin": "tiny-qwen3", "hiddenSize": 32, "intermediateSize": 64, "numLayers": 1,
              "numHeads": 1, "numKvHeads": 1, "warmStart": {"steps": 0}},
    "task": {"name": "addition", "digits": 1, "heldOut": 8},
    # enough steps (a few seconds of training) for the operator, polling every 0.1 s, to see the run
    # move even on a loaded machine; the trainer lingers 10 s after the last step for the final read
    "algorithm": {"steps": 100, "groupSize": 2, "promptsPerStep": 4, "miniBatchSize": 4, "learningRate": 1e-4},
    "rollout": {"pools": [{"name": "bf16", "replicas": 1, "precision": "bf16"}]},
    "eval": {"everySteps": 0},
    "checkpoint": {"everySteps": 0},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry(name: str) -> list[str]:
    exe = shutil.which(name, path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail(f"{name} is not installed next to {sys.executable}: run make venv (pip install -e .)")
    return [exe]


def test_a_run_driven_by_the_real_trainer_and_worker(tmp_path):
    trainer_cmd, rollout_cmd = entry("dcmdp-trainer"), entry("dcmdp-rollout")
    port = free_port()
    saved = (CONFIG.poll_seconds, CONFIG.trainer_address, os.environ.get("KUBECONFIG"))
    procs: list[subprocess.Popen] = []
    with EmulatorThread() as emu:
        (tmp_path / "kubeconfig").write_text(emu.kubeconfig(NS))
        os.environ["KUBECONFIG"] = str(tmp_path / "kubeconfig")
        CONFIG.poll_seconds = 0.1
        CONFIG.trainer_address = f"127.0.0.1:{port}"
        k = Kube(emu.url)
        status = lambda: (k.get("DCMDPRun", NS, "real") or {}).get("status") or {}  # noqa: E731
        try:
            with KopfRunner(["run", "--standalone", "-n", NS, "-m", "dcmdp_operator.handlers"], timeout=30) as runner:
                k.create("DCMDPRun", NS, {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun",
                                          "metadata": {"name": "real"}, "spec": SPEC})
                wait_for(lambda: len(k.children(NS, "real")) == 5, what="children")
                # what the pods would mount: the token file and the ConfigMap's run.yaml
                (tmp_path / "token").write_text(base64.b64decode(k.get("Secret", NS, "real-token")["data"]["token"]).decode())
                (tmp_path / "run.yaml").write_text(k.get("ConfigMap", NS, "real-config")["data"]["run.yaml"])
                env = {**os.environ, "DCMDP_TOKEN_FILE": str(tmp_path / "token"), "OMP_NUM_THREADS": "1"}
                job = k.get("Job", NS, "real-trainer")["spec"]["template"]["spec"]["containers"][0]["command"]
                assert job[:3] == ["dcmdp-trainer", "--config", "/etc/dcmdp/run.yaml"]
                procs.append(subprocess.Popen(
                    trainer_cmd + ["--config", str(tmp_path / "run.yaml"), "--port", str(port),
                                   "--out", str(tmp_path / "out"), "--resume", "--linger", "10"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                k.patch("Job", NS, "real-trainer", {"status": {"active": 1, "ready": 1}}, sub="status")
                st = wait_for(lambda: (s := status()).get("trainerReachable") and s, timeout=120,
                              what="the operator reading the real trainer")
                assert st["phase"] == "Running" and st["totalSteps"] == 100
                procs.append(subprocess.Popen(
                    rollout_cmd + ["--trainer", f"127.0.0.1:{port}", "--pool", "bf16",
                                   "--token-file", str(tmp_path / "token"), "--threads", "1"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                try:
                    st = wait_for(lambda: (s := status()).get("step", 0) >= 1 and s["pools"][0].get("tokens", 0) > 0 and s,
                                  timeout=120, what="a trained step with the pool's tokens")
                except AssertionError:
                    for p in procs:
                        p.kill()
                    logs = [p.communicate()[0][-2500:] for p in procs]
                    raise AssertionError(f"no step seen; rc {[p.returncode for p in procs]}; status {status()}; "
                                         f"trainer: {logs[0]}; worker: {logs[1]}") from None
                assert st["pools"][0]["name"] == "bf16"
                assert st["probDiffMean"] > 0  # bf16 sampling vs the fp32 trainer: a real discrepancy
                out, _ = procs[0].communicate(timeout=120)
                assert procs[0].returncode == 0, out[-3000:]
                # the trainer's pod exited 0: the Job controller would mark the Job complete
                k.patch("Job", NS, "real-trainer", {"status": {"active": 0, "ready": 0, "succeeded": 1,
                                                               "conditions": [{"type": "Complete", "status": "True"}]}}, sub="status")
                st = wait_for(lambda: (s := status()).get("phase") == "Succeeded" and s, what="Succeeded")
                assert 1 <= st["step"] <= 100 and st["totalSteps"] == 100  # the last figures read before the trainer exited
                wait_for(lambda: k.get("Deployment", NS, "real-rollout-bf16")["spec"]["replicas"] == 0, what="pool stopped")
            assert runner.exception is None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
            CONFIG.poll_seconds, CONFIG.trainer_address = saved[0], saved[1]
            if saved[2] is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved[2]
