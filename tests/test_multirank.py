"""Multi-GPU pods and multi-node, on CPU/gloo: 1 pod × 2 ranks and 2 pods × 1 rank take the same
step as 1 rank.

Each topology is started the way the operator's trainer pods start it: the command of
``dcmdp.ranks.torchrun_command`` (``torch.distributed.run``, static rendezvous at "pod 0"), one
torchrun agent per pod, here all on loopback. Every rank builds the same model and learner as
``dcmdp_trainer`` does (``init_distributed`` from torchrun's environment, the DeepSpeed learner;
without ``deepspeed.enabled``: ZeRO stage 0, plain data parallelism); rank 0 trains on a fixed
batch, the others follow. The reference is the one-process learner on the same batch.
Tolerance: fp32, every weight within 1e-6 of the reference after the step (measured 1.4e-8; the
step moves the weights by 2e-4, more than 100× the difference); losses within 1e-4 relative.
``dcmdp run`` with ``gpusPerReplica: 2`` (the local launcher's two ranks) reproduces the in-process
trainer's losses and λ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dcmdp import ranks
from dcmdp.models.tiny import build_model
from dcmdp_trainer.launcher import free_port
from dcmdp_trainer.learner import Learner
from runtime_helpers import tiny_run
from test_deepspeed import make_batch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent('''
    import json, os, sys, torch
    from runtime_helpers import tiny_run
    from dcmdp.models.tiny import build_model
    from dcmdp_trainer.distributed import DeepSpeedLearner, exit_process, init_distributed

    data_path, out, trainer = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    run = tiny_run(trainer=trainer)
    init_distributed(run)  # from torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    with open(f"{out}.rank{env['RANK']}.json", "w") as f:
        json.dump(env, f)
    data = torch.load(data_path, weights_only=False)
    model, tok = build_model(run.spec.model, seed=0)
    model.load_state_dict(data["state"])
    learner = DeepSpeedLearner(run, model, tok.pad_token_id)
    if learner.rank == 0:
        row = learner.train_step(data["rollouts"])
        torch.save({"row": row, "params": learner.module.state_dict()}, out)
        learner.shutdown()
    else:
        learner.follow()
    exit_process(0)  # as dcmdp_trainer ends a rank (a gloo group left to the interpreter's teardown can abort)
''')


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The fixed batch and the one-rank step on it."""
    run = tiny_run(trainer={"microBatchTokens": 48})
    state, rollouts = make_batch(run)
    data = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save({"state": state, "rollouts": rollouts}, data)
    torch.set_num_threads(1)
    model, tok = build_model(run.spec.model, seed=0)
    model.load_state_dict(state)
    learner = Learner(run, model, tok.pad_token_id)
    row = learner.train_step(rollouts)
    return data, state, row, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("topology, trainer", [
    ("1 pod × 2 ranks", {"replicas": 1, "gpusPerReplica": 2}),
    ("2 pods × 1 rank", {"replicas": 2, "template": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}),
])
def test_ranks_take_the_same_step_as_one_rank(tmp_path, reference, topology, trainer):
    data, state, ref_row, ref_params = reference
    trainer = {**trainer, "microBatchTokens": 48}
    spec = tiny_run(trainer=trainer).spec.trainer
    assert ranks.world_size(spec) == 2
    (tmp_path / "multirank_child.py").write_text(CHILD)
    out = tmp_path / "result.pt"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS)]))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # torchrun's to set
    pods = [subprocess.Popen(ranks.torchrun_command(spec, node_rank=str(i), master_addr="127.0.0.1", master_port=port,
                                                    args=[str(data), str(out), json.dumps(trainer)],
                                                    launcher=(sys.executable, "-m", "torch.distributed.run"),
                                                    module="multirank_child"),
                             env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for i in range(spec.replicas)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in pods]
    finally:
        for p in pods:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in pods), "\n".join(log[-4000:] for log in logs)

    per_pod = ranks.gpus_per_replica(spec)
    for r in range(2):  # torchrun's environment contract, as dcmdp_trainer reads it
        env_r = json.loads(Path(f"{out}.rank{r}.json").read_text())
        assert env_r == {"RANK": str(r), "LOCAL_RANK": str(r % per_pod), "WORLD_SIZE": "2",
                         "LOCAL_WORLD_SIZE": str(per_pod), "GROUP_RANK": str(r // per_pod)}, topology
    got = torch.load(out, weights_only=False)
    for key in ("loss/total", "loss/policy", "optim/grad_norm"):
        assert got["row"][key] == pytest.approx(ref_row[key], rel=1e-4, abs=1e-6), (topology, key)
    diff = max(float((got["params"][n] - p).abs().max()) for n, p in ref_params.items())
    moved = max(float((state[n] - p).abs().max()) for n, p in ref_params.items())
    print(f"{topology}: max |w - w_1rank| = {diff:.2e}, max |w - w_0| = {moved:.2e}")
    assert diff <= 1e-6 and moved > 100 * max(diff, 1e-7), (topology, diff, moved)


def test_dcmdp_run_starts_gpus_per_replica_ranks(tmp_path):
    """`dcmdp run` with gpusPerReplica 2 and no DeepSpeed asked for: two trainer ranks (ZeRO stage 0),
    workers, the numbers of the in-process trainer."""
    from dcmdp_trainer.launcher import run_processes
    from dcmdp_trainer.local import run_inprocess
    from runtime_helpers import rows

    algo = {"steps": 2, "klCoef": 0.5}  # the KL reference: rank 0's warm-started model, on every rank
    run = tiny_run(algorithm=algo, trainer={"gpusPerReplica": 2})
    summary = run_processes(run, tmp_path / "ranks", threads=1)
    assert {"trainer-0", "trainer-1"} <= set(summary["processes"])
    run_inprocess(tiny_run(algorithm=algo), tmp_path / "ref", threads=1)
    got, ref = rows(tmp_path / "ranks" / "metrics.jsonl"), rows(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1]
    for a, b in zip(ref, got):
        for key in ("loss/total", "loss/kl", "optim/grad_norm", "discrepancy/prob_diff_mean",
                    "pool/bf16/constraint/lambda", "reward/mean"):
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=1e-6), (a["step"], key)


def start_pod_after_two_steps(tmp_path, procs):
    """The trainer pod's command (torchrun, 2 ranks) and two workers started under ``procs``;
    returns (torchrun's process, the run folder, rank 0's pid) once two steps are written."""
    import secrets

    from runtime_helpers import read_ready, rows, trainer_args, wait_for, worker_args, write_manifest

    run = tiny_run(algorithm={"steps": 40}, trainer={"gpusPerReplica": 2})
    config, token, out, ready = tmp_path / "run.yaml", tmp_path / "token", tmp_path / "out", tmp_path / "ready.json"
    write_manifest(run, config)
    token.write_text(secrets.token_urlsafe(16))
    cmd = ranks.torchrun_command(run.spec.trainer, node_rank="0", master_addr="127.0.0.1", master_port=free_port(),
                                 args=trainer_args(config, out, token, ready)[2:],
                                 launcher=(sys.executable, "-m", "torch.distributed.run"))
    agent = procs.start("trainer", cmd[1:])
    wait_for(lambda: read_ready(ready), 180, "the trainer serving", procs)
    for pool in ("bf16", "int8"):
        procs.start(f"worker-{pool}", worker_args(read_ready(ready)["port"], pool, 0, token))
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(rows(metrics)) >= 2, 240, "two steps", procs)
    return agent, out, read_ready(ready)["pid"]


def test_the_pods_torchrun_command_serves_and_stops_at_a_checkpoint(tmp_path):
    """The trainer pod's command (torchrun, 2 ranks) with two workers: rank 0 serves and trains
    with rank 1; a SIGTERM to torchrun (what Kubernetes sends the pod) reaches both ranks: rank 1
    keeps following, rank 0 finishes its step, writes the checkpoint (gathering rank 1's state)
    and stops rank 1."""
    import signal

    from runtime_helpers import Procs

    procs = Procs(tmp_path)
    try:
        agent, out, _ = start_pod_after_two_steps(tmp_path, procs)
        os.kill(agent.pid, signal.SIGTERM)  # the pod's PID 1, not its process group
        agent.wait(timeout=120)
        records = procs.log_records("trainer")
        exits = [r for r in records if r.get("msg") == "trainer exits"]
        done = [r for r in records if r.get("msg") == "rank done"]
        assert [(r["rank"], r["code"]) for r in exits] == [(0, 143)], procs.log("trainer")[-3000:]
        step = exits[0]["steps"]
        assert [(r["rank"], r["steps"]) for r in done] == [(1, step)]  # rank 1 trained every step
        assert (out / "checkpoints" / f"step-{step:08d}.pt").exists()
    finally:
        procs.close()


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_rank_killed_mid_run_fails_the_pod_at_once(tmp_path):
    """A follower rank killed mid-run (OOM, a lost GPU): torchrun ends the other rank and exits
    non-zero within seconds (the pod fails and the Job's failurePolicy takes over), nothing is left
    running and nothing waits on a collective for gloo's 30-minute timeout."""
    import signal
    import time

    from runtime_helpers import Procs, wait_for

    procs = Procs(tmp_path)
    try:
        agent, _, rank0 = start_pod_after_two_steps(tmp_path, procs)
        children = [int(pid) for pid in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
        followers = [pid for pid in children if pid != rank0]
        assert rank0 in children and len(followers) == 1, (rank0, children)
        t0 = time.monotonic()
        os.kill(followers[0], signal.SIGKILL)
        code = agent.wait(timeout=120)
        took = time.monotonic() - t0
        assert code != 0 and took < 60, (code, took, procs.log("trainer")[-3000:])
        wait_for(lambda: not running(rank0), 10, "rank 0 ended with torchrun", procs)
        print(f"rank 1 killed: torchrun exited {code} after {took:.1f} s")
    finally:
        procs.close()
