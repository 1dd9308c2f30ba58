"""Real in-process runs: the λ recursion holds in metrics.jsonl, λ saturates at its bounds,
resume continues bit for bit, and reward rises on the quickstart task."""

import json
import shutil

import pytest

from dcmdp.metrics import REQUIRED_KEYS, read_metrics
from dcmdp.spec import load_run
from dcmdp_trainer.local import run_inprocess
from runs import tiny_run


def check_dual_recursion(rows, prefix, spec):
    """λ_{k+1} = clip(λ_k + η(δ̄_k − c), λmin, λmax), from the file's own values."""
    c = spec.algorithm.constraint
    lam = prefix + "constraint/lambda" if prefix else "constraint/run_lambda"
    checked = 0
    for prev, nxt in zip(rows, rows[1:]):
        tol = prev[prefix + "constraint/tolerance"]
        if tol is None:  # auto tolerance still calibrating
            continue
        want = min(max(prev[lam] + c.lambda_lr * (prev[prefix + "discrepancy/prob_diff_mean"] - tol),
                       c.lambda_min), c.lambda_max)
        assert nxt[lam] == pytest.approx(want, abs=1e-12), (prefix, prev["step"])
        checked += 1
    return checked


def test_metrics_follow_the_dual_recursion_for_run_and_pools(tmp_path):
    run = tiny_run(algorithm={"steps": 6, "constraint": {"lambdaLR": 20.0}},
                   rollout={"pools": [{"name": "bf16", "precision": "bf16", "tolerance": 0.001},
                                      {"name": "int8", "precision": "int8", "tolerance": 0.002}]})
    run_inprocess(run, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(6))
    for key in REQUIRED_KEYS:
        assert key in rows[0], key
    assert check_dual_recursion(rows, "", run.spec) == 5
    for pool in ("bf16", "int8"):
        assert check_dual_recursion(rows, f"pool/{pool}/", run.spec) == 5
    assert {r["pool/bf16/constraint/lambda"] for r in rows} != {r["pool/int8/constraint/lambda"] for r in rows}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("tolerance,bound", [(1e-9, 1.0), (10.0, 0.0)])
def test_lambda_saturates_at_its_bounds(tmp_path, tolerance, bound):
    run = tiny_run(algorithm={"steps": 5, "constraint": {"tolerance": tolerance, "lambdaLR": 200.0, "lambdaInit": 0.5}},
                   rollout={"pools": [{"name": "noisy", "precision": "fp32", "noise": 1.0}]})
    run_inprocess(run, tmp_path)
    lams = [r["pool/noisy/constraint/lambda"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert lams[0] == 0.5
    assert lams[-1] == bound and lams[-2] == bound


def test_resume_continues_the_same_lambda_sequence_bit_for_bit(tmp_path):
    run = tiny_run(algorithm={"steps": 6, "constraint": {"lambdaLR": 20.0, "tolerance": 0.002}},
                   rollout={"pools": [{"name": "stale", "precision": "bf16", "lag": 1}]})
    full, part = tmp_path / "full", tmp_path / "part"
    run_inprocess(run, full)
    run_inprocess(run, part, steps=3)  # stops after step 3 with a checkpoint
    run_inprocess(run, part, steps=6, resume=True)
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(6))
    for key in ("constraint/run_lambda", "discrepancy/prob_diff_mean", "loss/policy", "reward/mean", "pool/stale/constraint/lambda"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # exact equality, not approx


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_inprocess(tiny_run(), tmp_path, resume=True)


@pytest.mark.slow
def test_quickstart_reward_rises(tmp_path):
    """The demo's setting, shortened: RL on top of the warm start raises reward and accuracy."""
    run = load_run("examples/quickstart.yaml")
    summary = run_inprocess(run, tmp_path, steps=40)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-10:]) / 10
    start, end = summary["eval"][0], summary["eval"][-1]
    print(f"reward {first:.3f} -> {last:.3f}; greedy {start['eval/accuracy_greedy']:.3f} -> "
          f"{end['eval/accuracy_greedy']:.3f}; sampled {start['eval/accuracy_sampled']:.3f} -> {end['eval/accuracy_sampled']:.3f}")
    assert last > first + 0.05
    assert end["eval/accuracy_sampled"] > start["eval/accuracy_sampled"]


def test_discrepancy_reference_sampled_separates_staleness_from_engine_numerics(tmp_path):
    """A stale fp32 pool: against the current weights δ̄ is the staleness; against the weights the
    rollouts were sampled with (still kept, lag ≤ history) it is the fp32 engine's ~1e-7."""
    spec = dict(algorithm={"steps": 5, "learningRate": 3e-3, "maxStaleness": 2, "discrepancyReference": "sampled"},
                rollout={"pools": [{"name": "stale", "precision": "fp32", "lag": 2}]})
    run_inprocess(tiny_run(**spec), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    late = rows[3:]  # from step 2 on the pool really samples with 2-versions-old weights
    assert all(r["version/lag_mean"] == 2 for r in late)
    assert all(r["discrepancy/prob_diff_mean"] < 1e-5 for r in rows)
    assert all(r["discrepancy/prob_diff_mean_vs_current"] > 100 * r["discrepancy/prob_diff_mean"] for r in late)
