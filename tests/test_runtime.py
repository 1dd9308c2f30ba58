"""The multi-process runtime for real: trainer and rollout workers as separate processes on loopback.

* ``dcmdp run`` (the launcher): two pools of different precision run as separate processes, give
  the very numbers of the in-process runner, and each pool's λ follows its own dual update;
* a worker killed with SIGKILL while holding a lease: the lease expires, is re-issued, the run
  completes, no rollout is counted twice; a stale submission is dropped and counted;
* the trainer killed with SIGKILL and restarted with ``--resume``: it continues from the
  checkpoint with the same step and λ, and the workers reconnect by themselves.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from dcmdp.constraint import dual_ascent_step
from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.proto import dcmdp_pb2_grpc
from dcmdp.transport.channel import open_channel
from dcmdp_trainer import checkpoint
from dcmdp_trainer.launcher import free_port, run_processes
from dcmdp_trainer.local import run_inprocess
from runtime_helpers import (Procs, faults_env, get_status, launch_with_faults, proc_env, read_ready, rows,
                             same_numbers, tiny_run, trainer_args, wait_for, with_faults, worker_args, write_manifest)

pytestmark = pytest.mark.slow
P, G = 8, 4  # promptsPerStep, groupSize of the tiny manifest


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.close()


def token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text(secrets.token_urlsafe(16))
    return f


def children_of(pid: int) -> list[str]:
    """Command lines of ``pid``'s child processes, as ``ps`` lists them."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip() and "ps -ww" not in line]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_two_pools_as_processes_give_the_inprocess_numbers(tmp_path, monkeypatch):
    run = tiny_run()
    seen: dict[str, list[str]] = {}

    def on_step(row):
        if not seen:
            seen["ps"] = children_of(os.getpid())

    # weights go over the collective data plane (one round per version for both pools: both receive
    # bf16; through the trainer's shared-memory ring, the workers being local); the trainer damages
    # the first bucket it broadcasts: the worker must notice and re-fetch it over the stream
    launch_with_faults(monkeypatch, "dcmdp_trainer", "--corrupt-buckets", "1")
    summary = run_processes(run, tmp_path / "proc", threads=1, on_step=on_step)
    ps = seen["ps"]
    assert sum("dcmdp_testing.trainer_faults" in line for line in ps) == 1, ps
    assert sum("dcmdp_rollout" in line and "--pool bf16" in line for line in ps) == 1, ps
    assert sum("dcmdp_rollout" in line and "--pool int8" in line for line in ps) == 1, ps
    assert summary["steps"] == 6 and all(p["exit"] == 0 for p in summary["processes"].values())
    logs = "".join((tmp_path / "proc" / "logs" / f).read_text() for f in ("rollout-bf16-0.log", "rollout-int8-0.log"))
    assert logs.count("bucket crc mismatch: fetching it again") == 1
    loads = [json.loads(line) for line in logs.splitlines() if '"weights loaded"' in line]
    assert len(loads) >= 12 and sum(r["broadcast_bytes"] > 0 for r in loads) >= len(loads) // 2, loads
    assert any(r["ring"] for r in loads), loads  # (local workers: through the trainer's shared-memory ring)

    proc = rows(tmp_path / "proc" / "metrics.jsonl")
    ref_summary = run_inprocess(run, tmp_path / "inp", threads=1)
    ref = rows(tmp_path / "inp" / "metrics.jsonl")
    assert [r["step"] for r in proc] == list(range(6))
    for a, b in zip(ref, proc):
        assert set(a) <= set(b), set(a) - set(b)  # every in-process key, plus runtime ones
        assert same_numbers(a, b) == [], (a["step"], same_numbers(a, b))
        assert b["rollouts"] == P * G and b["rollouts/dropped_stale"] == 0 and b["version/lag_max"] == 0
    assert summary["lambdas"] == ref_summary["lambdas"]
    assert [e for e in rows(tmp_path / "proc" / "eval.jsonl")] == [e for e in rows(tmp_path / "inp" / "eval.jsonl")]

    # each pool's δ̄ is its own, and its λ follows its own dual update
    spec = run.spec.algorithm.constraint
    deltas = {p: [r[f"pool/{p}/discrepancy/prob_diff_mean"] for r in proc] for p in ("bf16", "int8")}
    assert all(a != b for a, b in zip(deltas["bf16"], deltas["int8"]))
    for pool, c in (("bf16", 0.003), ("int8", 0.006)):
        lam = [r[f"pool/{pool}/constraint/lambda"] for r in proc]
        assert lam[0] == spec.lambda_init and proc[0][f"pool/{pool}/constraint/tolerance"] == c
        for k in range(len(proc) - 1):
            want = dual_ascent_step(lam[k], deltas[pool][k], c, spec.lambda_lr, spec.lambda_min, spec.lambda_max)
            assert lam[k + 1] == pytest.approx(want, abs=1e-12), (pool, k)
    lam_final = {p: [r[f"pool/{p}/constraint/lambda"] for r in proc][-1] for p in ("bf16", "int8")}
    assert lam_final["bf16"] != lam_final["int8"]


def test_killed_worker_leases_are_reissued_and_stale_rollouts_dropped(tmp_path, procs):
    # 16 steps: long enough for the stale client below to get a lease, even on a slow machine
    run = tiny_run(algorithm={"steps": 16}, trainer={"weightBucketMiB": 1},
                   rollout={"leaseTimeoutSeconds": 3, "batchPrompts": 2,
                            "pools": [{"name": "bf16", "precision": "bf16", "replicas": 2},
                                      {"name": "int8", "precision": "int8"}]})
    config, tok, ready = write_manifest(run, tmp_path / "run.yaml"), token_file(tmp_path), tmp_path / "ready"
    token = tok.read_text()
    procs.start("trainer", trainer_args(config, tmp_path / "out", tok, ready, 0, "--metrics-port", "0"))
    port = wait_for(lambda: (read_ready(ready) or {}).get("port"), 120, "the trainer", procs)
    procs.start("bf16-0", worker_args(port, "bf16", 0, tok, "--metrics-port", "0", "--metrics-host", "127.0.0.1"))
    procs.start("int8-0", worker_args(port, "int8", 0, tok))
    procs.start("bf16-1", with_faults(worker_args(port, "bf16", 1, tok), "--sample-delay", "1.0"),
                env=faults_env(proc_env()))  # a slow worker: it certainly holds a lease when killed

    # calls without the run token are turned away by the real trainer too
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            dcmdp_pb2_grpc.TrainerStub(ch).GetStatus(pb.StatusRequest(), metadata=(("authorization", "Bearer x"),),
                                                     timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def victim_holds_a_lease():
        st = get_status(port, token)
        return st.step >= 1 and any(w.worker_id == "bf16-1" and w.leases > 0 for w in st.workers)

    wait_for(victim_holds_a_lease, 120, "the slow worker to hold a lease", procs, interval=0.05)

    # Prometheus on the trainer (per-step keys, per pool, and the runtime's own) and on a worker
    trainer_metrics = scrape(read_ready(ready)["metrics_port"])
    for name in ("dcmdp_pool_discrepancy_prob_diff_mean{pool=\"bf16\"}", "dcmdp_pool_constraint_lambda{pool=\"int8\"}",
                 "dcmdp_leases_outstanding", "dcmdp_lease_expirations", "dcmdp_version_lag{pool=\"bf16\"}",
                 "dcmdp_tokens_per_second", "dcmdp_weight_sync_bytes_total{dtype=\"bf16\",pool=\"bf16\"}",
                 "dcmdp_trainer_idle_fraction", "dcmdp_auth_rejected_total{reason=\"wrong run token\"} 1.0"):
        assert name in trainer_metrics, name
    worker_port = [r for r in procs.log_records("bf16-0") if r.get("msg") == "metrics"][0]["port"]
    worker_metrics = scrape(worker_port)
    for name in ("dcmdp_worker_tokens_total", "dcmdp_worker_weight_sync_bytes_total", "dcmdp_worker_weight_version",
                 "dcmdp_worker_sampling_seconds_bucket", "dcmdp_worker_tokens_per_second"):
        assert name in worker_metrics, name
    procs.kill("bf16-1")  # SIGKILL, lease in hand

    # a worker that samples with weights older than the bound allows (maxStaleness 0) is dropped
    stub = dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{port}", token))
    header = pb.Header(pool="bf16", worker_id="stale-client")
    stub.Register(pb.RegisterRequest(header=header, engine="hf", precision="bf16"), timeout=10)
    manifest = stub.GetWeightManifest(pb.WeightRequest(header=header, version=-1, dtype="bf16"), timeout=10)
    assert manifest.chunk_size == 1 << 20  # the spec's bucket size (default 64 MiB) reached the publisher
    lease = wait_for(lambda: (lambda l: l if l.lease_id and not l.eval else None)(
        stub.AcquireLease(pb.LeaseRequest(header=header), timeout=10)), 60, "a lease for the stale client")
    assert lease.header.weight_version >= 1
    samples = [pb.Sample(prompt_index=p.index, response_ids=[5], logprobs=[-1.0], finish_reason="length")
               for p in lease.prompts for _ in range(lease.group_size)]
    stale = pb.Header(pool="bf16", worker_id="stale-client", weight_version=lease.header.weight_version - 1)
    reply = stub.SubmitRollouts(pb.RolloutBatch(header=stale, lease_id=lease.lease_id, samples=samples), timeout=10)
    assert not reply.accepted and reply.reason.startswith("stale")
    again = stub.SubmitRollouts(pb.RolloutBatch(header=stale, lease_id=lease.lease_id, samples=samples), timeout=10)
    assert not again.accepted and again.reason == "released"
    # batchPrompts 2 over the pool's 5 prompts of a step: the lease holds 2 prompts, or the step's last 1
    assert len(lease.prompts) in (1, 2)
    assert get_status(port, token).rollouts_dropped_stale == len(samples) == len(lease.prompts) * G

    assert procs.wait("trainer", 240) == 0, procs.log("trainer")[-3000:]
    assert procs.wait("bf16-0", 60) == 0 and procs.wait("int8-0", 60) == 0
    trainer_log = procs.log_records("trainer")
    expired = [r for r in trainer_log if r.get("msg") == "lease expired"]
    assert any(r["worker"] == "bf16-1" for r in expired), expired
    metrics = rows(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(16))
    assert all(r["rollouts"] == P * G for r in metrics)  # every group exactly once
    assert sum(r["rollouts/dropped_stale"] for r in metrics) == len(samples)  # the stale client's, counted once
    assert metrics[-1]["leases/expired"] >= 1 and metrics[-1]["leases/reissued"] >= 2


def test_killed_trainer_resumes_from_its_checkpoint_and_workers_reconnect(tmp_path, procs):
    run = tiny_run(algorithm={"steps": 14}, checkpoint={"everySteps": 2})  # room to kill it mid-run on a slow machine
    config, tok, ready = write_manifest(run, tmp_path / "run.yaml"), token_file(tmp_path), tmp_path / "ready"
    out = tmp_path / "out"
    port = free_port()
    procs.start("trainer", trainer_args(config, out, tok, ready, port))
    wait_for(lambda: read_ready(ready), 120, "the trainer", procs)
    procs.start("bf16-0", worker_args(port, "bf16", 0, tok))
    procs.start("int8-0", worker_args(port, "int8", 0, tok))
    wait_for(lambda: len(rows(out / "metrics.jsonl")) >= 5, 180, "five steps", procs)
    procs.kill("trainer")  # SIGKILL: no chance to checkpoint
    before = rows(out / "metrics.jsonl")
    ckpt = checkpoint.latest(out)
    resume_step = int(ckpt.stem.split("-")[1])
    assert 4 <= resume_step <= 12 and len(before) >= resume_step
    workers = {n: procs.items[n].pid for n in ("bf16-0", "int8-0")}

    ready.unlink()
    procs.start("trainer2", trainer_args(config, out, tok, ready, port, "--resume"))
    assert procs.wait("trainer2", 240) == 0, procs.log("trainer2")[-3000:]
    serving = [r for r in procs.log_records("trainer2") if r.get("msg") == "serving"][0]
    assert serving["step"] == resume_step and serving["resumed"] is True
    for name, pid in workers.items():  # the same processes, reconnected on their own
        assert procs.items[name].pid == pid and procs.wait(name, 60) == 0
        msgs = [r.get("msg") for r in procs.log_records(name)]
        # it noticed the crash (the port closed, or the restarted trainer still starting) and re-registered
        assert {"trainer unreachable: retrying", "trainer starting: waiting",
                "trainer restarted: registering again"} & set(msgs), msgs
        assert "registered again" in msgs, msgs

    after = rows(out / "metrics.jsonl")
    assert [r["step"] for r in after] == list(range(14))
    for old in before:  # the same numbers before the crash and after the restart (λ included)
        new = after[old["step"]]
        assert same_numbers(old, new) == [], (old["step"], same_numbers(old, new))
    first = after[resume_step]
    for pool in ("bf16", "int8"):
        # λ applied at the resumed step = λ_{k+1} of the dual update at the step before the crash
        prev = after[resume_step - 1]
        c = prev[f"pool/{pool}/constraint/tolerance"]
        spec = run.spec.algorithm.constraint
        want = dual_ascent_step(prev[f"pool/{pool}/constraint/lambda"], prev[f"pool/{pool}/discrepancy/prob_diff_mean"],
                                c, spec.lambda_lr, spec.lambda_min, spec.lambda_max)
        assert first[f"pool/{pool}/constraint/lambda"] == pytest.approx(want, abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 14


@pytest.mark.vllm
def test_a_vllm_pool_runs_under_its_own_venv(tmp_path):
    """A vLLM bf16 pool (its worker under .venv-vllm's Python) beside an HF int8 pool."""
    run = tiny_run(algorithm={"steps": 3},
                   rollout={"pools": [{"name": "vllm", "engine": "vllm", "precision": "bf16", "tolerance": 0.003},
                                      {"name": "int8", "engine": "hf", "precision": "int8", "tolerance": 0.006}]})
    seen = {}

    def on_step(row):
        seen.setdefault("ps", children_of(os.getpid()))

    summary = run_processes(run, tmp_path / "out", threads=1, on_step=on_step)
    assert summary["steps"] == 3 and all(p["exit"] == 0 for p in summary["processes"].values())
    vllm_line = [line for line in seen["ps"] if "--pool vllm" in line][0]
    assert ".venv-vllm/bin/python" in vllm_line or os.environ.get("DCMDP_VLLM_PYTHON", "\0") in vllm_line
    log = [json.loads(line) for line in (tmp_path / "out" / "logs" / "rollout-vllm-0.log").read_text().splitlines()
           if line.startswith("{")]
    loaded = [r["version"] for r in log if r.get("msg") == "weights loaded"]
    assert loaded[0] == 0 and max(loaded) >= 2  # built from v0, then updated in place
    metrics = rows(tmp_path / "out" / "metrics.jsonl")
    assert all(r["rollouts"] == P * G for r in metrics)
    assert all(0 < r["pool/vllm/discrepancy/prob_diff_mean"] < 0.05 for r in metrics)


def _default_sigint() -> None:
    """A shell's background job (nohup … &, some CI runners) starts with SIGINT ignored, and the
    launcher would inherit that; give it the default disposition, as an interactive Ctrl-C has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(tmp_path, steps: int = 40):
    run = tiny_run(algorithm={"steps": steps}, checkpoint={"everySteps": 0})
    config = write_manifest(run, tmp_path / "run.yaml")
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "dcmdp.cli", "run", "-f", str(config), "--out", str(out),
                          "--threads", "1", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=proc_env(), start_new_session=True, preexec_fn=_default_sigint)
    return p, out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("how", ["ctrl-c", "worker-dies"])
def test_dcmdp_run_stops_every_process_on_ctrl_c_or_a_failure(tmp_path, how):
    # far more steps than the test waits for, so the interruption always lands mid-run, however
    # slowly a loaded machine lets the test see the first step
    launcher, out = _launch(tmp_path, steps=2000)
    try:
        wait_for(lambda: rows(out / "metrics.jsonl"), 180, "the first step")
        kids = {line.split()[0]: line for line in children_of(launcher.pid)}
        assert len(kids) == 3, kids  # trainer + two workers
        if how == "ctrl-c":
            os.kill(launcher.pid, signal.SIGINT)
        else:
            victim = next(pid for pid, line in kids.items() if "--pool int8" in line)
            os.kill(int(victim), signal.SIGKILL)
        output = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    if how == "ctrl-c":
        assert launcher.returncode == 130, output[-2000:]
        assert checkpoint.latest(out) is not None  # the trainer stopped at a step boundary and saved
    else:
        assert launcher.returncode == 1, output[-2000:]
        assert "worker int8-0" in output and "exited with code -9" in output, output[-2000:]
    deadline = time.monotonic() + 10
    while any(_alive(int(pid)) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in kids if _alive(int(pid))], "processes left behind"
    assert len(rows(out / "metrics.jsonl")) < 2000
