"""The DC-GRPO step: batch layout, π_old, per-pool λ, corrections and the dual update."""

import math

import pytest
import torch

from dcmdp.engine import Rollout
from dcmdp.models.tiny import build_model
from dcmdp_trainer.learner import Learner, collate, token_logprobs
from runs import tiny_run
from test_metrics import documented


def make_rollouts(model, tok, pools=("bf16",), shift=0.0, n_prompts=8, group=4, seed=0):
    """Rollouts sampled from ``model`` itself, with p_inf = p_train·e^shift (a known mismatch)."""
    from dcmdp.generation import sample

    g = torch.Generator().manual_seed(seed)
    prompts = [[tok.bos_token_id] + tok(f"{i}+{i}=", add_special_tokens=False)["input_ids"] for i in range(n_prompts)]
    out = sample(model, prompts, n=group, max_new_tokens=3, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=g)
    rolls = []
    for k, (resp, lp) in enumerate(zip(out.responses, out.logprobs)):
        i = k // group
        rolls.append(Rollout(i, prompts[i], resp, [x + shift for x in lp], float(k % 2), pools[i % len(pools)], 0))
    return rolls


def test_collate_aligns_inference_logprobs_with_teacher_forcing():
    run = tiny_run()
    model, tok = build_model(run.spec.model)
    rolls = make_rollouts(model, tok)
    batch = collate(rolls, ["bf16"], tok.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(model, batch, slice(0, batch.size), 1.0)
    m = batch.mask.bool()
    assert int(m.sum()) == sum(len(r.response_ids) for r in rolls)
    # sampled fp32 logprobs and teacher-forced ones agree: positions and padding are right
    assert torch.allclose(lp[m], batch.logp_inf[m], atol=1e-5)
    assert batch.groups == [4] * 8


def test_train_step_reports_every_metric_and_updates_lambda_per_pool():
    run = tiny_run(rollout={"pools": [{"name": "a", "precision": "fp32", "tolerance": 0.001},
                                      {"name": "b", "precision": "fp32", "tolerance": 0.5}]})
    model, tok = build_model(run.spec.model)
    learner = Learner(run, model, tok.pad_token_id)
    rolls = make_rollouts(model, tok, pools=("a", "b"), shift=-0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = learner.train_step(rolls)
    for key in ("reward/mean", "discrepancy/prob_diff_mean", "discrepancy/prob_diff_max", "discrepancy/k3_kl",
                "discrepancy/logprob_abs_diff_mean", "constraint/run_lambda", "constraint/tolerance", "loss/policy",
                "loss/constraint", "pool/a/constraint/lambda", "pool/b/discrepancy/prob_diff_mean"):
        assert key in row, key
    assert [k for k in row if not documented(k)] == []  # docs/metrics.md names every key
    d_a = row["pool/a/discrepancy/prob_diff_mean"]
    d_b = row["pool/b/discrepancy/prob_diff_mean"]
    assert d_a > 0 and d_b > 0
    assert learner.constraints.pools["a"].value == pytest.approx(min(1.0, 0.1 + (d_a - 0.001)))
    assert learner.constraints.pools["b"].value == pytest.approx(max(0.0, 0.1 + (d_b - 0.5)))
    assert row["loss/constraint"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradients_left_on_the_model_do_not_enter_the_first_update():
    """The warm start leaves .grad on the parameters: the first step is the same as from clean ones."""
    run = tiny_run()
    rows, states = [], []
    for stale in (False, True):
        model, tok = build_model(run.spec.model, seed=0)
        if stale:
            sum(p.sum() for p in model.parameters()).backward()
        learner = Learner(run, model, tok.pad_token_id)
        rows.append(learner.train_step(make_rollouts(model, tok, shift=-0.05)))
        states.append(model.state_dict())
    assert rows[1]["optim/grad_norm"] == pytest.approx(rows[0]["optim/grad_norm"], rel=1e-6)
    assert rows[1]["loss/total"] == pytest.approx(rows[0]["loss/total"], rel=1e-6)
    assert all(torch.equal(states[0][k], v) for k, v in states[1].items())


def test_plain_grpo_ignores_p_inf_and_keeps_lambda_at_zero():
    run = tiny_run(algorithm={"name": "grpo"})
    model, tok = build_model(run.spec.model, seed=1)
    rolls = make_rollouts(model, tok)
    shifted = [Rollout(r.prompt_index, r.prompt_ids, r.response_ids, [x - 1.0 for x in r.logprobs], r.reward, r.pool, 0)
               for r in rolls]
    rows = []
    for data in (rolls, shifted):
        m, _ = build_model(run.spec.model, seed=1)
        rows.append(Learner(run, m, tok.pad_token_id).train_step(data))
    assert rows[0]["loss/policy"] == pytest.approx(rows[1]["loss/policy"])  # p_inf does not enter GRPO
    assert rows[1]["discrepancy/prob_diff_mean"] > rows[0]["discrepancy/prob_diff_mean"]
    assert rows[0]["constraint/run_lambda"] == 0.0 and rows[0]["loss/constraint"] == 0.0


def test_corrections_change_the_surrogate_and_report_masking():
    model, tok = build_model(tiny_run().spec.model, seed=2)
    rolls = make_rollouts(model, tok, shift=-2.0)  # ratio p_train/p_inf = e² ≈ 7.4 on every token
    rows = {}
    for name in ("grpo", "tis", "mis", "icepop"):
        run = tiny_run(algorithm={"name": name})
        m, _ = build_model(run.spec.model, seed=2)
        rows[name] = Learner(run, m, tok.pad_token_id).train_step(rolls)
    assert rows["tis"]["correction/weight_mean"] == pytest.approx(2.0, rel=1e-4)  # capped at C = 2
    assert rows["mis"]["correction/masked_frac"] == pytest.approx(1.0)  # every ratio above C
    assert rows["icepop"]["correction/masked_frac"] == pytest.approx(1.0)  # every ratio above 5
    assert rows["mis"]["loss/policy"] == 0.0
    assert rows["tis"]["loss/policy"] == pytest.approx(2.0 * rows["grpo"]["loss/policy"], rel=1e-3, abs=1e-6)


def test_advantage_shaping_leaves_no_penalty_term():
    run = tiny_run(algorithm={"constraint": {"mode": "advantage-shaping", "lambdaInit": 1.0}})
    model, tok = build_model(run.spec.model)
    row = Learner(run, model, tok.pad_token_id).train_step(make_rollouts(model, tok, shift=-0.5))
    assert row["loss/constraint"] == 0.0 and row["constraint/run_lambda"] == 1.0


def test_state_dict_round_trip_restores_lambda_and_optimizer():
    run = tiny_run()
    model, tok = build_model(run.spec.model)
    learner = Learner(run, model, tok.pad_token_id)
    learner.train_step(make_rollouts(model, tok, shift=-0.3))
    state = learner.state_dict()
    m2, _ = build_model(run.spec.model, seed=5)
    other = Learner(run, m2, tok.pad_token_id)
    other.load_state_dict(state)
    assert other.constraints.pools["bf16"].value == learner.constraints.pools["bf16"].value
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), model.state_dict().values()))


def varied_rollouts(tok, pools=("a", "b"), n_prompts=8, group=4, seed=0):
    """Rollouts of very different lengths (prompts 1–12 digits, responses 1–9 tokens), random p_inf and rewards."""
    g = torch.Generator().manual_seed(seed)
    digits = [str(d) for d in range(10)]
    rolls = []
    for i in range(n_prompts):
        text = "".join(digits[(i * 7 + j) % 10] for j in range(1 + (i * 5) % 12)) + "="
        prompt = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        for _ in range(group):
            k = int(torch.randint(1, 10, (), generator=g))
            resp = torch.randint(3, len(tok), (k,), generator=g).tolist()
            lp = (-3 * torch.rand(k, generator=g)).tolist()
            rolls.append(Rollout(i, prompt, resp, lp, float(torch.rand((), generator=g) < 0.5), pools[i % len(pools)], 0))
    return rolls


@pytest.mark.parametrize("algorithm", [
    {"name": "dc-grpo", "klCoef": 0.1, "corrections": ["tis"]},
    {"name": "dc-grpo", "constraint": {"mode": "advantage-shaping"}},
    {"name": "dc-grpo", "corrections": ["icepop"], "lossAggregation": "seq-mean-token-mean", "lossDenominator": "kept"},
])
def test_micro_batched_step_equals_the_full_batch_step(algorithm):
    """fp32: the same update (relative weight difference ≤ 1e-6) whatever the micro-batch budget."""
    pools = [{"name": "a", "precision": "fp32", "tolerance": 0.01}, {"name": "b", "precision": "fp32"}]
    results = []
    for budget in (0, 40, 1):  # one pass; several rows per micro-batch; one row per micro-batch
        run = tiny_run(algorithm=algorithm, rollout={"pools": pools}, trainer={"microBatchTokens": budget})
        model, tok = build_model(run.spec.model, seed=4)
        w0 = {k: v.clone() for k, v in model.state_dict().items()}
        learner = Learner(run, model, tok.pad_token_id)
        rows = [learner.train_step(varied_rollouts(tok)) for _ in range(2)]
        results.append((rows, {k: v.clone() for k, v in model.state_dict().items()}))
    (ref_rows, ref), others = results[0], results[1:]
    moved = torch.sqrt(sum(((ref[k] - w0[k]) ** 2).sum() for k in ref))
    norm = torch.sqrt(sum((v ** 2).sum() for v in ref.values()))
    assert moved > 1e-3
    for rows, got in others:
        diff = torch.sqrt(sum(((got[k] - ref[k]) ** 2).sum() for k in ref))
        assert diff / norm <= 1e-6, float(diff / norm)
        assert diff / moved <= 1e-4, float(diff / moved)
        for a, b in zip(ref_rows, rows):
            for key in ("loss/total", "loss/policy", "loss/kl", "loss/constraint", "optim/grad_norm",
                        "optim/clip_frac", "discrepancy/prob_diff_mean", "constraint/run_lambda_next"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_gradient_checkpointing_takes_the_same_step():
    rolls = None
    params = []
    for ckpt in (False, True):
        run = tiny_run(trainer={"gradientCheckpointing": ckpt, "microBatchTokens": 64})
        model, tok = build_model(run.spec.model, seed=4)
        rolls = rolls or varied_rollouts(tok, pools=("bf16",))
        Learner(run, model, tok.pad_token_id).train_step(rolls)
        assert model.is_activation_checkpointing == ckpt
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-7, rtol=1e-6)


def test_cuda_where_there_is_none_fails_naming_the_field():
    from dcmdp.device import DeviceError

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    run = tiny_run(trainer={"device": "cuda"})
    model, tok = build_model(run.spec.model)
    with pytest.raises(DeviceError, match="spec.trainer.device"):
        Learner(run, model, tok.pad_token_id)
    assert Learner(tiny_run(trainer={"device": "auto"}), model, tok.pad_token_id).device.type == "cpu"


@pytest.mark.parametrize("algorithm", [
    {"name": "dc-grpo", "corrections": ["icepop", "mis"], "constraint": {"mode": "k3-penalty"}},
    {"name": "dc-grpo", "corrections": ["tis"], "constraint": {"mode": "penalty"}},
    {"name": "tis"},
])
def test_extreme_finite_logprobs_never_poison_the_weights(algorithm):
    """A sentinel (−9999) or merely extreme (−95) submitted logprob leaves every weight finite."""
    run = tiny_run(algorithm=algorithm)
    model, tok = build_model(run.spec.model)
    rolls = make_rollouts(model, tok)
    for k, r in enumerate(rolls[:6]):
        r.logprobs[0] = (-9999.0, -95.0)[k % 2]
    learner = Learner(run, model, tok.pad_token_id)
    row = learner.train_step(rolls)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def _first_update_grad_norm(algorithm, rolls, tok):
    """Grad norm of a single mini-batch update (π_θ = π_old: ratio 1, no clipping), no penalty."""
    run = tiny_run(algorithm={"name": "grpo", "miniBatchSize": 8, "gradClip": 0, **algorithm})
    model, _ = build_model(run.spec.model, seed=3)
    return Learner(run, model, tok.pad_token_id).train_step(rolls)


def test_advantage_std_and_aggregation_constant_scale_the_update_exactly():
    model, tok = build_model(tiny_run().spec.model, seed=3)
    rolls = make_rollouts(model, tok)  # rewards 0, 1, 0, 1 in every group of 4
    norm = {k: _first_update_grad_norm(a, rolls, tok)["optim/grad_norm"] for k, a in {
        "population": {}, "unbiased": {"advantageStd": "unbiased"}, "none": {"advantageStd": "none"},
        "sum1": {"lossAggregation": "seq-mean-token-sum"},
        "sum4": {"lossAggregation": "seq-mean-token-sum", "lossAggregationConstant": 4.0}}.items()}
    # Â = (r − ½) / (σ + ε): σ = ½ (population), √(1/3) (unbiased), none = no division
    assert norm["unbiased"] / norm["population"] == pytest.approx((0.5 + 1e-6) / (math.sqrt(1 / 3) + 1e-6), rel=1e-4)
    assert norm["none"] / norm["population"] == pytest.approx(0.5 + 1e-6, rel=1e-4)
    assert norm["sum4"] / norm["sum1"] == pytest.approx(0.25, rel=1e-4)


def test_kept_denominator_divides_by_the_tokens_mis_keeps():
    model, tok = build_model(tiny_run().spec.model, seed=3)
    rolls = make_rollouts(model, tok)
    for r in rolls[::3]:  # these sequences get r = π_old/p_inf = e² > C: mis drops them
        r.logprobs = [x - 2.0 for x in r.logprobs]
    rows = {d: _first_update_grad_norm({"name": "mis", "lossDenominator": d}, rolls, tok) for d in ("all", "kept")}
    kept_frac = 1 - rows["all"]["correction/masked_frac"]
    assert 0 < kept_frac < 1
    assert rows["all"]["optim/grad_norm"] / rows["kept"]["optim/grad_norm"] == pytest.approx(kept_frac, rel=1e-4)
