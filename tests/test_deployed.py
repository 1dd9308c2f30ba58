"""constraint.mode deployed-penalty: π_Q(θ) with straight-through int4 weights, its gradient checked
by finite differences in float64, and a real training step with an int4 pool."""

from __future__ import annotations

import copy

import pytest
import torch

from dcmdp import losses
from dcmdp.int4 import int4_roundtrip_model_, quantized_weight_names
from dcmdp.models.tiny import build_model
from dcmdp_trainer.deployed import deployed_group_size, deployed_logprobs
from dcmdp_trainer.learner import Learner, collate
from dcmdp_trainer.logprobs import sequence_logprobs
from runs import tiny_run
from test_learner import make_rollouts

GROUP = 16


def _batch(model, tok):
    rolls = make_rollouts(model, tok, n_prompts=3, group=2)
    return collate(rolls, ["bf16"], tok.pad_token_id)


def test_deployed_penalty_exact_values_and_gradcheck() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9]], dtype=torch.float64))
    logp_q = torch.log(torch.tensor([[0.3, 0.2, 0.1]], dtype=torch.float64))
    lam = torch.tensor([[1.0, 2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])  # the third token is masked out, whatever its gap
    weighted, gap = losses.deployed_penalty(logp, logp_q, lam, mask)
    assert weighted.item() == pytest.approx((1.0 * 0.2 + 2.0 * 0.0) / 2, abs=1e-15)
    assert gap.item() == pytest.approx(0.1, abs=1e-15)
    # away from the kink |0|, the gradient in both arguments is the analytic one
    a = torch.log(torch.tensor([[0.5, 0.25, 0.7]], dtype=torch.float64)).requires_grad_()
    b = torch.log(torch.tensor([[0.3, 0.35, 0.1]], dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: losses.deployed_penalty(x, y, lam, torch.ones(1, 3))[0], (a, b))


def test_quantised_forward_equals_the_int4_engine_model() -> None:
    run = tiny_run()
    model, tok = build_model(run.spec.model, seed=0)
    batch = _batch(model, tok)
    served = copy.deepcopy(model)
    int4_roundtrip_model_(served, GROUP)
    with torch.no_grad():
        got = deployed_logprobs(model, batch.ids, batch.attn, batch.pos, 1.0, GROUP)
        want = sequence_logprobs(served, batch.ids, batch.attn, batch.pos, 1.0)
        own = sequence_logprobs(model, batch.ids, batch.attn, batch.pos, 1.0)
    m = batch.mask.bool()
    assert torch.allclose(got[m], want[m], atol=1e-6)
    assert not torch.allclose(got[m], own[m], atol=1e-4)  # the quantisation changes the policy
    # the model's own weights are untouched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), build_model(run.spec.model, seed=0)[0].state_dict().values()))


def test_straight_through_gradient_matches_finite_differences_in_float64() -> None:
    """∂/∂θ mean|π_θ − π_Q(θ)| = mean s_t (∇π_t(θ) − ∇π_t(w)|_{w=Q(θ)}), s_t = sign(π_θ − π_Q):
    autograd through deployed_logprobs vs central differences of the float64 policy at θ and at Q(θ)."""
    run = tiny_run()
    model, tok = build_model(run.spec.model, seed=0)
    batch = _batch(model, tok)
    model = model.double()
    m = batch.mask.bool()
    name = quantized_weight_names(model)[0]
    p = dict(model.named_parameters())[name]

    logp = sequence_logprobs(model, batch.ids, batch.attn, batch.pos, 1.0)
    logp_q = deployed_logprobs(model, batch.ids, batch.attn, batch.pos, 1.0, GROUP)
    assert logp.dtype == torch.float64 and logp_q.dtype == torch.float64
    loss, _ = losses.deployed_penalty(logp, logp_q, torch.ones_like(logp), batch.mask)
    (grad,) = torch.autograd.grad(loss, p)
    sign = torch.sign(logp.detach().exp() - logp_q.detach().exp())

    quantised = copy.deepcopy(model)
    int4_roundtrip_model_(quantised, GROUP)
    q_param = dict(quantised.named_parameters())[name]

    def weighted_policy(net, param, idx, eps):
        with torch.no_grad():
            param[idx] += eps
            lp = sequence_logprobs(net, batch.ids, batch.attn, batch.pos, 1.0)
            param[idx] -= eps
        return float(losses.masked_mean(sign * lp.exp(), m))

    eps = 1e-3  # Qwen3's RMSNorm computes its variance in float32: a smaller ε drowns in its rounding
    for idx in [(0, 0), (1, 3), (5, 7)]:
        d_train = (weighted_policy(model, p, idx, eps) - weighted_policy(model, p, idx, -eps)) / (2 * eps)
        d_deployed = (weighted_policy(quantised, q_param, idx, eps) - weighted_policy(quantised, q_param, idx, -eps)) / (2 * eps)
        # the two terms nearly cancel: the tolerance scales with them (each is good to ~1e-4)
        tol = 1e-3 * (abs(d_train) + abs(d_deployed))
        assert grad[idx].item() == pytest.approx(d_train - d_deployed, abs=tol), idx
    assert grad.abs().sum() > 0


def test_a_training_step_with_an_int4_pool_reports_the_gap() -> None:
    run = tiny_run(algorithm={"constraint": {"mode": "deployed-penalty", "lambdaInit": 0.5}},
                   rollout={"pools": [{"name": "q", "precision": "int4", "quantGroupSize": GROUP}]})
    model, tok = build_model(run.spec.model, seed=0)
    learner = Learner(run, model, tok.pad_token_id)
    assert learner.deployed_group == GROUP
    row = learner.train_step(make_rollouts(model, tok, pools=("q",)))
    assert row["constraint/penalty"] > 0 and row["loss/constraint"] == pytest.approx(0.5 * row["constraint/penalty"], rel=1e-5)
    # an fp32 pool's engine does not quantise: π_Q = π_θ, no penalty
    run32 = tiny_run(algorithm={"constraint": {"mode": "deployed-penalty", "lambdaInit": 0.5}},
                     rollout={"pools": [{"name": "f", "precision": "fp32"}]})
    model, tok = build_model(run32.spec.model, seed=0)
    row = Learner(run32, model, tok.pad_token_id).train_step(make_rollouts(model, tok, pools=("f",)))
    assert row["constraint/penalty"] == 0.0


@pytest.mark.parametrize("pools,trainer,match", [
    ([{"name": "b", "precision": "bf16"}], {}, r"rollout.pools\[0\] \('b'\) has precision 'bf16'"),
    ([{"name": "a", "precision": "int4", "quantGroupSize": 32}, {"name": "b", "precision": "int4"}], {},
     "one group size"),
    ([{"name": "a", "precision": "int4"}], {"gradientCheckpointing": True}, "gradientCheckpointing"),
])
def test_pools_it_cannot_reproduce_are_refused_naming_the_field(pools, trainer, match) -> None:
    run = tiny_run(algorithm={"constraint": {"mode": "deployed-penalty"}}, rollout={"pools": pools}, trainer=trainer)
    with pytest.raises(ValueError, match=match):
        deployed_group_size(run.spec, [p["name"] for p in pools])
