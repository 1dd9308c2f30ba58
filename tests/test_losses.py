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
    tis = losses.importance_weights(p_old.log(), p_inf.log(), ["tis"], cap=2.0)
    assert tis.weight[0].tolist() == pytest.approx([1.0, 2.0, 2.0, ratio[3].item(), 2.0], rel=1e-5)
    assert tis.keep.all()
    mis = losses.importance_weights(p_old.log(), p_inf.log(), ["mis"], cap=2.0)
    assert mis.weight[0].tolist() == pytest.approx([1.0, 0.0, 0.0, ratio[3].item(), 0.0], rel=1e-5)
    assert mis.keep[0].tolist() == [True, False, False, True, False]
    ice = losses.importance_weights(p_old.log(), p_inf.log(), ["icepop"], low=0.5, high=5.0)
    assert ice.weight[0].tolist() == pytest.approx([1.0, 2.5, 0.0, ratio[3].item(), 0.0], rel=1e-5)
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


# --------------------------------------------------------------- conventions (verl / TRL / papers)
def test_advantage_std_conventions_on_rewards_one_and_zero():
    r = torch.tensor([1.0, 0.0])
    assert losses.group_advantages(r, [2]).tolist() == pytest.approx([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)])
    s = math.sqrt(0.5)  # unbiased std of [1, 0]
    assert losses.group_advantages(r, [2], std="unbiased").tolist() == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6)])
    assert losses.group_advantages(r, [2], std="none").tolist() == [0.5, -0.5]
    for std in ("population", "unbiased", "none"):  # a group of one carries no relative signal
        assert losses.group_advantages(torch.tensor([1.0]), [1], std=std).tolist() == [0.0]
    with pytest.raises(ValueError, match="advantageStd"):
        losses.group_advantages(r, [2], std="sample")


def _one_token(log_ratio: float, adv: float, dtype=torch.float32):
    logp = torch.tensor([[log_ratio]], dtype=dtype, requires_grad=True)
    return logp, torch.zeros(1, 1, dtype=dtype), torch.tensor([[adv]], dtype=dtype), torch.ones(1, 1)


def test_dual_clip_caps_the_loss_of_a_negative_advantage():
    logp, old, adv, mask = _one_token(2.0, -1.0)
    loss, _ = losses.clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(2)) and logp.grad.item() == pytest.approx(math.exp(2))  # 7.39
    logp, old, adv, mask = _one_token(2.0, -1.0)
    loss, info = losses.clipped_surrogate(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(3.0) and logp.grad.item() == 0.0  # capped at c·|A|, no gradient
    logp, old, adv, mask = _one_token(2.0, 1.0)  # a positive advantage is untouched by dual-clip
    assert losses.clipped_surrogate(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0)[0].item() == pytest.approx(-1.28)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("adv", [1.0, -1.0])
@pytest.mark.parametrize("log_ratio", [-100.0, -88.0, -20.0, 20.0, 50.0, 88.0, 89.0, 100.0])
def test_float32_gradients_stay_finite_for_log_ratios_up_to_100(log_ratio, adv, dual_clip):
    logp, old, a, mask = _one_token(log_ratio, adv)
    loss, _ = losses.clipped_surrogate(logp, old, a, mask, 0.2, 0.28, dual_clip=dual_clip)
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(logp.grad.item())


def test_log_ratio_clamp_bounds_the_ratio():
    logp, old, adv, mask = _one_token(100.0, -1.0)
    loss, _ = losses.clipped_surrogate(logp, old, adv, mask, 0.2, 0.28, log_ratio_clamp=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(3.0)) and logp.grad.item() == 0.0
    logp, old, adv, mask = _one_token(100.0, 1.0)  # a positive advantage: the clipped branch, no gradient
    loss, _ = losses.clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    loss.backward()
    assert loss.item() == pytest.approx(-1.28) and logp.grad.item() == 0.0


def test_a_nan_in_a_padded_position_changes_nothing():
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    clean = dict(logp=torch.tensor([[-1.0, -0.5, -2.0]]), old=torch.tensor([[-1.0, -0.7, -1.5]]),
                 inf=torch.tensor([[0.0, -0.6, -1.9]]), adv=torch.tensor([[1.0, 1.0, 1.0]]),
                 ref=torch.tensor([[-1.0, -0.4, -2.2]]))
    nan = {k: v.clone() for k, v in clean.items()}
    for v in nan.values():
        v[0, 0] = float("nan")

    def total(t, mode):
        logp = t["logp"].clone().requires_grad_(True)
        w, keep = losses.importance_weights(t["old"], t["inf"], ["tis"], mask=mask)
        pg = losses.clipped_surrogate(logp, t["old"], t["adv"], mask, 0.2, 0.2, w)[0]
        pen = losses.constraint_penalty(logp, t["inf"], torch.full_like(logp, 0.5), mask, mode,
                                        torch.full_like(logp, float("nan")) if mode == "hinge-penalty" else None)[0]
        loss = pg + pen + losses.reference_kl(logp, t["ref"], mask)
        loss.backward()
        return loss.item(), logp.grad

    for mode in ("penalty", "squared-penalty", "k3-penalty"):
        (a, ga), (b, gb) = total(clean, mode), total(nan, mode)
        assert math.isfinite(b) and b == pytest.approx(a)
        assert torch.isfinite(gb).all() and torch.allclose(ga, gb) and gb[0, 0] == 0.0
    assert losses.masked_mean(torch.tensor([float("nan"), 2.0]), torch.tensor([0, 1])).item() == 2.0


def test_masked_token_denominator_all_or_kept():
    # r = π_old/p_inf = [3, 1], C = 2: mis drops the first token; ratio π_θ/π_old = 1, A = 1
    old = torch.zeros(1, 2)
    inf = torch.log(torch.tensor([[1 / 3, 1.0]]))
    mask = torch.ones(1, 2)
    w, keep = losses.importance_weights(old, inf, ["mis"], cap=2.0, mask=mask)
    adv = torch.ones(1, 2)
    all_tokens = losses.clipped_surrogate(old, old, adv, mask, 0.2, 0.2, w)[0]
    kept_tokens = losses.clipped_surrogate(old, old, adv, keep, 0.2, 0.2, w)[0]
    assert all_tokens.item() == pytest.approx(-0.5) and kept_tokens.item() == pytest.approx(-1.0)


def test_loss_aggregations_and_a_mini_batch_denominator_shared_by_micro_batches():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert losses.aggregate(per_token, mask).item() == pytest.approx(10 / 4)
    assert losses.aggregate(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert losses.aggregate(per_token, mask, "seq-mean-token-sum", constant=2.0).item() == pytest.approx((6 + 4) / (2 * 2))
    for mode in losses.AGGREGATIONS:
        d = losses.aggregation_denominator(mask, mode)
        split = sum(losses.aggregate(per_token[i:i + 1], mask[i:i + 1], mode, d, 2.0) for i in range(2))
        assert split.item() == pytest.approx(losses.aggregate(per_token, mask, mode, constant=2.0).item())
    assert losses.aggregation_denominator(torch.zeros(2, 3), "token-mean") == 1.0  # an empty batch is 0, not NaN
    with pytest.raises(ValueError, match="lossAggregation"):
        losses.aggregate(per_token, mask, "sum")


def test_mis_lower_bound_rejects_small_ratios():
    old = torch.zeros(1, 3)
    inf = -torch.log(torch.tensor([[0.1, 1.0, 3.0]]))  # r = 0.1, 1, 3
    assert losses.importance_weights(old, inf, ["mis"], cap=2.0).weight[0].tolist() == pytest.approx([0.1, 1.0, 0.0])
    assert losses.importance_weights(old, inf, ["mis"], cap=2.0, mis_low=0.5).weight[0].tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_sequence_and_geometric_levels_share_one_ratio_per_sequence():
    old = torch.zeros(2, 3)
    r = torch.tensor([[2.0, 0.5, 4.0], [3.0, 1.0, 1.0]])  # sequence 0: product 4, geometric mean 4^(1/3)
    inf = -r.log()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # sequence 1: one token, r = 3
    g = 4 ** (1 / 3)

    def w(corr, level, **kw):
        return losses.importance_weights(old, inf, [corr], level=level, mask=mask, **kw).weight.flatten().tolist()

    assert w("tis", "sequence") == pytest.approx([2, 2, 2, 2, 0, 0])
    assert w("tis", "geometric") == pytest.approx([g, g, g, 2, 0, 0])
    assert w("mis", "sequence") == pytest.approx([0, 0, 0, 0, 0, 0])  # 4 > C and 3 > C: both dropped
    assert w("mis", "geometric") == pytest.approx([g, g, g, 0, 0, 0])
    assert w("icepop", "sequence") == pytest.approx([4, 4, 4, 3, 0, 0])
    assert w("tis", "token") == pytest.approx([2, 0.5, 2, 2, 0, 0])
    with pytest.raises(ValueError, match="correctionLevel"):
        w("tis", "batch")


# ------------------------------------------------ extreme finite inputs never make inf or NaN (issue 13)
EXTREME = [-9999.0, -95.0, -torch.finfo(torch.float32).max]


@pytest.mark.parametrize("level", losses.CORRECTION_LEVELS)
@pytest.mark.parametrize("corrections", [[], ["tis"], ["mis"], ["icepop"], ["tis", "icepop"], ["mis", "icepop"]])
@pytest.mark.parametrize("mode", ["penalty", "squared-penalty", "k3-penalty", "hinge-penalty", None])
def test_extreme_finite_logprobs_give_finite_losses_and_gradients(level, corrections, mode):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[..., 0]
    old = logp.detach()
    inf = torch.tensor([[EXTREME[0], -0.5, -1.0, 0.0], [-1.0, EXTREME[1], -2.0, -0.1], [EXTREME[2], EXTREME[0], -1.0, -0.3]])
    old = torch.where(torch.tensor([[False, False, True, False]] * 3), torch.full_like(old, -95.0), old)  # π_old ≪ p_inf too
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    w, keep = losses.importance_weights(old, inf, corrections, mask=mask, level=level, mis_low=0.1)
    assert torch.isfinite(w).all()
    adv = torch.tensor([[1.0], [-1.0], [0.5]]).expand(3, 4)
    loss = losses.clipped_surrogate(logp, old, adv, keep, 0.2, 0.2, w, dual_clip=3.0)[0]
    if mode is not None:
        loss = loss + losses.constraint_penalty(logp, inf, torch.full_like(logp, 0.5), mask, mode,
                                                torch.full_like(logp, 0.01))[0]
    loss = loss + losses.reference_kl(logp, inf, mask)  # an extreme reference, too
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()
