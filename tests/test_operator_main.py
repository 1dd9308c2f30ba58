"""``dcmdp-operator``: flags, and a restart — kopf in a thread first, then the real console entry
point as a process (health and metrics endpoints) — that creates nothing new and keeps the token."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from kopf.testing import KopfRunner

from dcmdp_operator.config import CONFIG, OperatorConfig
from dcmdp_testing.emulator import EmulatorThread
from dcmdp_operator.main import parse_args
from operator_helpers import Kube, api_requests, wait_for

NS = "restart"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flags():
    a = parse_args(["-n", "a", "--namespace", "b", "--metrics-port", "0"])
    assert a.namespace == ["a", "b"] and not a.all_namespaces and a.metrics_port == 0
    assert a.liveness == "http://0.0.0.0:8080/healthz"
    assert parse_args(["-A"]).all_namespaces
    for bad in ([], ["-A", "-n", "x"], ["-A", "--poll-seconds", "0"], ["-A", "--metrics-port", "70000"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_watch_namespaces_from_the_environment(monkeypatch):
    monkeypatch.setenv("DCMDP_WATCH_NAMESPACES", "x, y")
    assert parse_args([]).namespace == ["x", "y"]


def test_config_from_the_environment(monkeypatch):
    monkeypatch.setenv("DCMDP_TRAINER_IMAGE", "reg/t:9")
    monkeypatch.setenv("DCMDP_POLL_SECONDS", "2.5")
    monkeypatch.setenv("DCMDP_TRAINER_ADDRESS", "127.0.0.1:{port}")
    c = OperatorConfig.from_env()
    assert (c.trainer_image, c.poll_seconds, c.trainer_target("r", "n")) == ("reg/t:9", 2.5, "127.0.0.1:50051")
    assert OperatorConfig().trainer_target("r", "n") == "r-trainer-0.r-trainer.n.svc:50051"
    monkeypatch.setenv("DCMDP_POLL_SECONDS", "soon")
    with pytest.raises(ValueError, match="DCMDP_POLL_SECONDS"):
        OperatorConfig.from_env()
    with pytest.raises(ValueError, match="placeholder"):
        OperatorConfig(trainer_address="{host}:1").trainer_target("r", "n")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


@pytest.mark.timeout(120)
def test_restart_with_the_console_entry_point_creates_nothing_new(tmp_path):
    saved = (CONFIG.poll_seconds, os.environ.get("KUBECONFIG"))
    kubeconfig = tmp_path / "kubeconfig"
    with EmulatorThread() as emu:
        kubeconfig.write_text(emu.kubeconfig(NS))
        k = Kube(emu.url)
        os.environ["KUBECONFIG"] = str(kubeconfig)
        CONFIG.poll_seconds = 0.2
        try:
            # 1. the first operator (kopf in a thread) creates the run's children
            with KopfRunner(["run", "--standalone", "-n", NS, "-m", "dcmdp_operator.handlers"], timeout=30) as runner:
                k.create("DCMDPRun", NS, {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun",
                                          "metadata": {"name": "rs"}, "spec": {}})
                wait_for(lambda: len(k.children(NS, "rs")) == 5, what="children")
                wait_for(lambda: (k.get("DCMDPRun", NS, "rs").get("status") or {}).get("phase") == "Pending", what="status")
            assert runner.exception is None
        finally:
            CONFIG.poll_seconds = saved[0]
            if saved[1] is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved[1]
        token = k.get("Secret", NS, "rs-token")["data"]["token"]
        creates = [r for r in api_requests(emu) if r["verb"] == "create" and r["resource"] != "events"]
        assert len(creates) == 5

        # 2. the operator restarts: now the real `dcmdp-operator` process
        metrics_port, health_port = free_port(), free_port()
        exe = shutil.which("dcmdp-operator", path=os.path.dirname(sys.executable))
        cmd = [exe] if exe else [sys.executable, "-m", "dcmdp_operator.main"]
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "DCMDP_POLL_SECONDS": "0.2"}
        proc = subprocess.Popen(
            cmd + ["--namespace", NS, "--metrics-port", str(metrics_port), "--metrics-address", "127.0.0.1",
                   "--liveness", f"http://127.0.0.1:{health_port}/healthz"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_for(lambda: _get(f"http://127.0.0.1:{health_port}/healthz")[0] == 200, timeout=30, what="/healthz")
            # it resumes the run, polls it a few times, and writes nothing but the status
            metric = 'dcmdp_operator_reconciles_total{result="ok",trigger="poll"}'

            def polled() -> bool:
                text = _get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
                line = next((l for l in text.splitlines() if l.startswith(metric)), "")
                return bool(line) and float(line.split()[-1]) >= 3
            wait_for(polled, timeout=20, what="three polls in /metrics")
            text = _get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
            assert 'dcmdp_operator_reconciles_total{result="ok",trigger="resume"} 1.0' in text
            assert 'dcmdp_operator_runs{phase="Pending"} 1.0' in text
            assert "dcmdp_operator_reconcile_errors_total" in text
            creates = [r for r in api_requests(emu) if r["verb"] == "create" and r["resource"] != "events"]
            assert len(creates) == 5, creates[5:]
            writes = [r for r in api_requests(emu) if r["verb"] == "patch" and r["resource"] not in ("dcmdpruns", "dcmdpruns/status")]
            assert writes == []
            assert k.get("Secret", NS, "rs-token")["data"]["token"] == token
            assert len(base64.b64decode(token)) >= 40
            # and it acts on a change
            k.patch("DCMDPRun", NS, "rs", {"spec": {"suspend": True}})
            wait_for(lambda: k.get("Job", NS, "rs-trainer")["spec"]["suspend"] is True, what="suspend by the process")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        assert proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]


def test_backoff_doubles_per_failure_and_is_capped() -> None:
    from dcmdp_operator.handlers import MAX_BACKOFF_SECONDS, backoff

    assert [backoff(10.0, n) for n in range(6)] == [10.0, 20.0, 40.0, 80.0, 160.0, MAX_BACKOFF_SECONDS]
    assert backoff(10.0, 1000) == MAX_BACKOFF_SECONDS
    assert backoff(600.0, 3) == 600.0  # never shorter than the poll period
