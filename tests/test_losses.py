"""GRPO surrogate, penalties (finite-difference gradient check), shaping and the passive corrections."""

import math

import pytest
import torch

from dcmdp import losses


def test_group_advantages_are_normalised_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    adv = losses.group_advantages(r, [4, 2, 1])
    assert adv[:4].tolist() == pytest.approx([1, -1, -1, 1], abs=1e-5)
    assert adv[4:].tolist() == pytest.approx([0, 0, 0])  # no signal in a uniform or single group


def test_clipped_surrogate_clips_with_separate_bounds():
    logp_old = torch.zeros(1, 4)
    ratio = torch.tensor([[0.5, 0.9, 1.1, 2.0]])
    adv = torch.tensor([[-1.0, 1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4)
    loss, info = losses.clipped_surrogate(ratio.log(), logp_old, adv, mask, clip_low=0.2, clip_high=0.28)
    # token 0: A<0, ratio .5 → min(-.5·-1... ) = max(.5, .8)·(-1) → -min(-.5, -.8) = .8
    expected = [0.8, -0.9, -1.1, -1.28]
    assert float(loss) == pytest.approx(sum(expected) / 4)
    assert info["clip_frac"] == pytest.approx(0.5)


def test_passive_corrections_weight_and_mask_by_the_train_inference_ratio():
    p_old = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5]])
    p_inf = torch.tensor([[0.5, 0.2, 0.05, 0.9, 0.001]])  # ratios 1, 2.5, 10, 0.556, 500
    ratio = (p_old / p_inf)[0]
    tis = losses.importance_weights(p_old.log(), p_inf.log(), ["tis"], cap=2.0)[0]
    assert tis.tolist() == pytest.approx([1.0, 2.0, 2.0, ratio[3].item(), 2.0], rel=1e-5)
    mis = losses.importance_weights(p_old.log(), p_inf.log(), ["mis"], cap=2.0)[0]
    assert mis.tolist() == pytest.approx([1.0, 0.0, 0.0, ratio[3].item(), 0.0], rel=1e-5)
    ice = losses.importance_weights(p_old.log(), p_inf.log(), ["icepop"], low=0.5, high=5.0)[0]
    assert ice.tolist() == pytest.approx([1.0, 2.5, 0.0, ratio[3].item(), 0.0], rel=1e-5)
    with pytest.raises(ValueError):
        losses.importance_weights(p_old.log(), p_inf.log(), ["nope"])


@pytest.mark.parametrize("mode", ["penalty", "squared-penalty", "k3-penalty"])
def test_penalty_gradient_matches_finite_differences(mode):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    logp_inf = torch.log_softmax(torch.randn(2, 5, 7, dtype=torch.float64), -1).gather(-1, targets[..., None]).squeeze(-1)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    lam = torch.tensor([[0.3] * 5, [0.7] * 5], dtype=torch.float64)

    def f(x):
        logp = torch.log_softmax(x, -1).gather(-1, targets[..., None]).squeeze(-1)
        return losses.constraint_penalty(logp, logp_inf, lam, mask, mode)[0]

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6)
    # and the value is the λ-weighted token mean of the chosen distance
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1).detach()
    p, q = logp.exp(), logp_inf.exp()
    dist = {"penalty": (p - q).abs(), "squared-penalty": (p - q) ** 2,
            "k3-penalty": (p / q) - 1 - (logp - logp_inf)}[mode]
    assert float(f(logits).detach()) == pytest.approx(float((lam * dist * mask).sum() / mask.sum()))


def test_penalty_unweighted_value_and_unknown_mode():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    li = torch.log(torch.tensor([[0.25, 0.25]]))
    weighted, raw = losses.constraint_penalty(lp, li, torch.full((1, 2), 2.0), torch.ones(1, 2))
    assert float(raw) == pytest.approx(0.125) and float(weighted) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        losses.constraint_penalty(lp, li, torch.ones(1, 2), torch.ones(1, 2), "advantage-shaping")


def test_hinge_penalty_pulls_back_only_tokens_beyond_the_tolerance():
    p = torch.tensor([[0.50, 0.50, 0.50, 0.50]], requires_grad=True)
    q = torch.tensor([[0.49, 0.30, 0.70, 0.50]])  # |p - q| = 0.01, 0.2, 0.2, 0
    mask, lam, c = torch.ones(1, 4), torch.full((1, 4), 2.0), torch.full((1, 4), 0.05)
    weighted, raw = losses.constraint_penalty(p.log(), q.log(), lam, mask, "hinge-penalty", c)
    assert float(raw) == pytest.approx((0.15 + 0.15) / 4) and weighted.item() == pytest.approx(2 * 0.3 / 4)
    weighted.backward()
    assert p.grad[0].tolist() == pytest.approx([0.0, 0.5, -0.5, 0.0])  # inside c: no gradient
    # without a tolerance it is the |·| penalty
    lp, li = p.detach().log(), q.log()
    assert float(losses.constraint_penalty(lp, li, lam, mask, "hinge-penalty")[0]) == pytest.approx(
        float(losses.constraint_penalty(lp, li, lam, mask, "penalty")[0]))


def test_advantage_shaping_subtracts_lambda_delta_without_gradient():
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    delta = torch.tensor([[0.1, 0.5, 0.2]], requires_grad=True)
    lam = torch.tensor([[0.5, 0.5, 2.0]])
    shaped = losses.shape_advantages(adv, delta, lam)
    assert shaped[0].tolist() == pytest.approx([0.95, 0.75, -1.4])
    assert not shaped.requires_grad


def test_reference_kl_is_zero_at_the_reference_and_positive_elsewhere():
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    assert float(losses.reference_kl(lp, lp, torch.ones(1, 2))) == pytest.approx(0.0)
    assert float(losses.reference_kl(lp, torch.log(torch.tensor([[0.2, 0.6]])), torch.ones(1, 2))) > 0
    r = 0.2 / 0.5
    assert float(losses.reference_kl(lp[:, :1], torch.log(torch.tensor([[0.2]])), torch.ones(1, 1))) == pytest.approx(r - 1 - math.log(r))
