"""DeepSpeed ZeRO-2 and ZeRO-3 over two ranks (gloo, two real processes) take the same step as one rank.

The same model and the same batch of rollouts: the plain one-process learner here (one pass per
mini-batch), and the DeepSpeed learner in two ranks, each accumulating micro-batches of ≤ 48 tokens. Losses, λ and every parameter agree after three DC-GRPO steps
(two mini-batch updates each); a checkpoint gathered from both ranks' optimizer partitions and
loaded into fresh engines continues with the same step. Under ZeRO-3 the weights compared are
those the trainer publishes: gathered one parameter at a time from both ranks' partitions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dcmdp.engine import Rollout
from dcmdp.generation import sample
from dcmdp.models.tiny import build_model
from dcmdp.tasks import build_task
from dcmdp_trainer.launcher import free_port
from dcmdp_trainer.learner import Learner
from dcmdp_trainer.warmstart import prompt_ids
from runtime_helpers import tiny_run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import copy, sys, torch
    sys.path.insert(0, sys.argv[3])
    from runtime_helpers import tiny_run
    from dcmdp.models.tiny import build_model
    from dcmdp_trainer.distributed import DeepSpeedLearner, exit_process, init_distributed
    torch.set_num_threads(1)
    stage = int(sys.argv[4])
    run = tiny_run(trainer={"replicas": 2, "deepspeed": {"enabled": True, "zeroStage": stage}, "microBatchTokens": 48})
    init_distributed(run)
    data = torch.load(sys.argv[1], weights_only=False)

    def learner():
        model, tok = build_model(run.spec.model, seed=0)
        model.load_state_dict(data["state"])
        sum(p.sum() for p in model.parameters()).backward()  # stale .grad, as a warm start leaves them
        return DeepSpeedLearner(run, model, tok.pad_token_id)

    a = learner()
    if a.rank == 0:
        rows = [a.train_step(data["rollouts"]) for _ in range(2)]
        state = copy.deepcopy(a.state_dict())  # state_dict() shares the live tensors, as torch's does
        rows.append(a.train_step(data["rollouts"]))
        params_a = {k: v.clone() for k, v, _ in a.weights() if v is not None}  # what the trainer publishes
        a.shutdown()
    else:
        a.follow()
    b = learner()  # fresh engines, loaded from the gathered checkpoint
    if b.rank == 0:
        b.load_state_dict(state)
        row_b = b.train_step(data["rollouts"])
        params_b = {k: v.clone() for k, v, _ in b.weights() if v is not None}
        b.shutdown()
        torch.save({"rows": rows, "row_b": row_b, "params": params_a,
                    "resume_diff": max(float((params_a[k] - params_b[k]).abs().max()) for k in params_a)},
                   sys.argv[2])
    else:
        b.follow()
    exit_process(0)  # as dcmdp_trainer ends a rank (a gloo group left to the interpreter's teardown can abort)
''')


def make_batch(run):
    """A fixed batch of rollouts: noisy samples (p_inf ≠ π) of the tiny model, random rewards."""
    torch.manual_seed(0)
    model, tok = build_model(run.spec.model, seed=0)
    task = build_task(run.spec.task)
    import random

    problems = task.sample(random.Random(0), 8)
    prompts = [prompt_ids(tok, p.prompt) for p in problems]
    out = sample(model, prompts, n=4, max_new_tokens=task.max_new_tokens, eos_id=tok.eos_token_id,
                 pad_id=tok.pad_token_id, temperature=1.0, noise=0.3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    rollouts = []
    for i, (resp, lp) in enumerate(zip(out.responses, out.logprobs)):
        p = i // 4
        pool = "bf16" if p < 4 else "int8"
        rollouts.append(Rollout(p, prompts[p], resp, lp, float(torch.rand((), generator=g) < 0.5), pool, 0))
    return model.state_dict(), rollouts


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_gloo_ranks_matches_one_rank(tmp_path, stage):
    run = tiny_run()
    state, rollouts = make_batch(run)
    data = tmp_path / "batch.pt"
    torch.save({"state": state, "rollouts": rollouts}, data)

    # one rank, no DeepSpeed
    torch.set_num_threads(1)
    model, tok = build_model(run.spec.model, seed=0)
    model.load_state_dict(state)
    ref = Learner(run, model, tok.pad_token_id)
    ref_rows = [ref.train_step(rollouts) for _ in range(3)]

    port = free_port()
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    result = tmp_path / "result.pt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    tests_dir = str(Path(__file__).resolve().parent)
    ranks = [subprocess.Popen([sys.executable, str(script), str(data), str(result), tests_dir, str(stage)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=420)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in ranks), "\n".join(o[-3000:] for o in outs)
    got = torch.load(result, weights_only=False)

    for k, (a, b) in enumerate(zip(ref_rows, got["rows"])):
        for key in ("loss/total", "loss/policy", "loss/constraint", "optim/clip_frac"):  # summed over the ranks
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (k, key)
        assert b["optim/grad_norm"] == pytest.approx(a["optim/grad_norm"], rel=1e-4), k
        for key in a:  # δ̄, λ and rewards come from the whole batch on every rank: identical
            if key.startswith(("discrepancy/", "constraint/", "reward/", "pool/")) and key != "constraint/penalty":
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (k, key)
    want = ref.model.state_dict()
    assert set(got["params"]) == set(want) - {"lm_head.weight"}  # the tied head is handed over once
    diff = max(float((p - want[n]).abs().max()) for n, p in got["params"].items())
    assert diff < 1e-5, diff
    moved = max(float((state[n] - p).abs().max()) for n, p in ref.model.state_dict().items())
    assert moved > 100 * max(diff, 1e-7)  # the steps did move the weights
    assert got["resume_diff"] == 0.0  # the gathered checkpoint continues with exactly the same step


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_with_two_zero_ranks_runs_as_the_inprocess_trainer(tmp_path, stage):
    """`dcmdp run` with trainer.replicas 2 and ZeRO-2/3: two trainer ranks, workers, same numbers
    (ZeRO-3: the ranks gather together to publish, evaluate and checkpoint)."""
    from dcmdp_trainer.launcher import run_processes
    from dcmdp_trainer.local import run_inprocess
    from runtime_helpers import rows

    run = tiny_run(algorithm={"steps": 3}, checkpoint={"everySteps": 2},
                   trainer={"replicas": 2, "deepspeed": {"enabled": True, "zeroStage": stage}})
    summary = run_processes(run, tmp_path / "ds", threads=1)
    assert {"trainer-0", "trainer-1"} <= set(summary["processes"])
    assert (tmp_path / "ds" / "checkpoints" / "step-00000003.pt").exists()
    plain = tiny_run(algorithm={"steps": 3})
    run_inprocess(plain, tmp_path / "ref", threads=1)
    ds, ref = rows(tmp_path / "ds" / "metrics.jsonl"), rows(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in ds] == [0, 1, 2]
    for a, b in zip(ref, ds):
        for key in ("loss/total", "optim/grad_norm", "discrepancy/prob_diff_mean", "pool/bf16/constraint/lambda",
                    "pool/int8/constraint/lambda", "reward/mean"):
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("algorithm, field", [
    ({"klCoef": 0.1}, "klCoef"),
    ({"discrepancyReference": "sampled"}, "discrepancyReference"),
    ({"constraint": {"mode": "deployed-penalty"}}, "deployed-penalty"),
])
def test_zero3_refuses_what_would_need_whole_replicas(algorithm, field):
    from dcmdp_trainer.distributed import DistributedError, init_distributed

    run = tiny_run(algorithm=algorithm, trainer={"deepspeed": {"enabled": True, "zeroStage": 3}})
    with pytest.raises(DistributedError, match=field):
        init_distributed(run)
