"""δ metrics, dual ascent, PID and auto tolerance against hand-computed values."""

import math

import pytest
import torch

from dcmdp.constraint import ConstraintSet, Multiplier, discrepancy_stats, dual_ascent_step, token_discrepancy
from dcmdp.spec import ConstraintSpec


def test_discrepancy_stats_match_hand_computed_values():
    p_train = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.7, 0.3]])
    p_inf = torch.tensor([[0.4, 0.25, 0.9], [0.3, 0.7, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the 0.9/0.9 token is a prompt token
    s = discrepancy_stats(p_train.log(), p_inf.log(), mask)
    deltas = [0.1, 0.05, 0.2, 0.0, 0.2]
    assert s["prob_diff_mean"] == pytest.approx(sum(deltas) / 5)
    assert s["prob_diff_max"] == pytest.approx(0.2)
    logs = [math.log(0.5 / 0.4), math.log(0.2 / 0.25), math.log(0.1 / 0.3), 0.0, math.log(0.3 / 0.5)]
    assert s["logprob_abs_diff_mean"] == pytest.approx(sum(abs(x) for x in logs) / 5)
    k3 = [math.exp(x) - 1 - x for x in logs]
    assert s["k3_kl"] == pytest.approx(sum(k3) / 5)
    assert s["tokens"] == 5
    assert torch.allclose(token_discrepancy(p_train.log(), p_inf.log()), (p_train - p_inf).abs())


def test_discrepancy_of_an_empty_mask_is_zero():
    z = torch.zeros(2, 3)
    assert discrepancy_stats(z, z, z)["prob_diff_mean"] == 0.0


def test_dual_ascent_step_and_clipping_at_both_bounds():
    assert dual_ascent_step(0.1, 0.005, 0.0037, 1.0, 0.0, 1.0) == pytest.approx(0.1 + 0.0013)
    assert dual_ascent_step(0.1, 0.0, 0.5, 1.0, 0.0, 1.0) == 0.0  # clipped at λ_min
    assert dual_ascent_step(0.9, 2.0, 0.5, 1.0, 0.0, 1.0) == 1.0  # clipped at λ_max
    assert dual_ascent_step(0.3, 0.1, 0.2, 2.0, 0.25, 0.8) == 0.25


def test_multiplier_follows_projected_dual_ascent():
    spec = ConstraintSpec(tolerance=0.01, lambda_init=0.2, lambda_lr=5.0, lambda_min=0.05, lambda_max=0.5)
    m = Multiplier(spec)
    lam = 0.2
    for d in [0.02, 0.05, 0.1, 0.0, 0.0, 0.0, 0.3, 0.3]:
        assert m.value == pytest.approx(lam)
        m.update(d)
        lam = min(max(lam + 5.0 * (d - 0.01), 0.05), 0.5)
    assert m.value == pytest.approx(0.5)


def test_pid_with_only_integral_gain_is_dual_ascent():
    da = ConstraintSpec(tolerance=0.01, lambda_lr=3.0)
    pid = ConstraintSpec(tolerance=0.01, controller="pid", pid={"kp": 0.0, "ki": 3.0, "kd": 0.0})
    a, b = Multiplier(da), Multiplier(pid)
    for d in [0.05, 0.0, 0.02, 0.2, 0.0, 0.0, 0.011]:
        assert a.update(d) == pytest.approx(b.update(d))


def test_pid_step_response_and_anti_windup():
    # a step in δ̄ from 0 to 0.3 above c: P reacts at once, I ramps, D kicks on the step only
    spec = ConstraintSpec(tolerance=0.1, lambda_init=0.0, lambda_max=10.0, controller="pid",
                          pid={"kp": 2.0, "ki": 0.5, "kd": 1.0})
    m = Multiplier(spec)
    out = [m.update(d) for d in [0.1, 0.4, 0.4, 0.4]]
    # e = 0, .3, .3, .3 ; I = 0, .15, .3, .45 ; D = -, .3, 0, 0
    assert out == pytest.approx([0.0, 2 * 0.3 + 0.15 + 0.3, 2 * 0.3 + 0.3, 2 * 0.3 + 0.45])
    # anti-windup: a long violation cannot push the integral past λ_max ...
    spec = ConstraintSpec(tolerance=0.1, lambda_init=0.0, lambda_max=1.0, controller="pid",
                          pid={"kp": 0.0, "ki": 1.0, "kd": 0.0})
    m = Multiplier(spec)
    for _ in range(100):
        m.update(1.1)
    assert m.value == 1.0 and m.integral == 1.0
    # ... so λ leaves the bound as soon as δ̄ falls below c
    m.update(0.0)
    assert m.value == pytest.approx(0.9)


def test_auto_tolerance_calibrates_then_freezes():
    spec = ConstraintSpec(tolerance="auto", lambda_init=0.3, auto={"calibrationSteps": 3, "factor": 2.0})
    m = Multiplier(spec)
    assert m.calibrating
    for d in (0.01, 0.02, 0.03):
        m.update(d)
        assert m.value == 0.3  # λ holds while calibrating
    assert m.tolerance == pytest.approx(2.0 * 0.02)
    m.update(0.1)
    assert m.value == pytest.approx(0.3 + 1.0 * (0.1 - 0.04))
    m.update(0.0)
    assert m.tolerance == pytest.approx(0.04)  # frozen


def test_per_pool_multipliers_are_independent_and_round_trip():
    spec = ConstraintSpec(tolerance=0.01, lambda_init=0.1)
    cs = ConstraintSet(spec, {"bf16": 0.002, "int8": "auto"})
    cs.update(0.01, {"bf16": 0.012, "int8": 0.5})
    assert cs.pools["bf16"].value == pytest.approx(0.11)
    assert cs.pools["int8"].value == pytest.approx(0.1) and cs.pools["int8"].calibrating
    assert cs.run.value == pytest.approx(0.1)
    other = ConstraintSet(spec, {"bf16": 0.002, "int8": "auto"})
    other.load_state_dict(cs.state_dict())
    for name in ("bf16", "int8"):
        assert other.pools[name].state_dict() == cs.pools[name].state_dict()


def test_discrepancy_stats_stay_finite_for_extreme_finite_logprobs():
    lt = torch.tensor([[-0.1, -95.0, -1.0]])
    li = torch.tensor([[-9999.0, -0.2, -torch.finfo(torch.float32).max]])
    s = discrepancy_stats(lt, li, torch.ones(1, 3))
    assert all(math.isfinite(v) for v in s.values())
    assert s["k3_kl"] == pytest.approx(((math.exp(20) - 21) + (math.exp(-94.8) - 1 + 94.8) + (math.exp(20) - 21)) / 3)
