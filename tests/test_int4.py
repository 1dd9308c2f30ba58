"""dcmdp.int4: exact values of the group-wise round-to-nearest int4 quantiser and its STE."""

from __future__ import annotations

import pytest
import torch

from dcmdp.int4 import (int4_quantize, int4_roundtrip, int4_roundtrip_model_, int4_ste, quantized_weight_names)


def test_one_group_exact_values() -> None:
    # s = (2 − (−1))/15 = 0.2, z = round(1/0.2) = 5; q = round(w/s) + z = 0, 5, round(2.5)=2 → 7, 15
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]], dtype=torch.float64)
    codes, scale, zero = int4_quantize(w, group_size=128)  # clipped to the width 4
    assert codes.tolist() == [[0, 5, 7, 15]]
    assert scale.item() == pytest.approx(0.2, abs=1e-15) and zero.tolist() == [[5]]
    assert int4_roundtrip(w, 128)[0].tolist() == pytest.approx([-1.0, 0.0, 0.4, 2.0], abs=1e-12)


def test_integer_grid_is_kept_and_groups_are_independent() -> None:
    w = torch.arange(16, dtype=torch.float32).reshape(1, 16)
    assert torch.equal(int4_roundtrip(w, 16), w)  # s = 1, z = 0: every value is a code
    # two groups of 2: each keeps its own min and max exactly, whatever the other's range
    # (second group: s = 150/15 = 10, z = 10, codes 0 and 15)
    w2 = torch.tensor([[0.0, 1.0, -100.0, 50.0]], dtype=torch.float64)
    assert int4_roundtrip(w2, 2)[0].tolist() == pytest.approx([0.0, 1.0, -100.0, 50.0], abs=1e-12)
    # one group of 4: 0 and 1 fall on the coarse grid of the wide group (s = 10): both become 0
    assert int4_roundtrip(w2, 4)[0].tolist() == pytest.approx([0.0, 0.0, -100.0, 50.0], abs=1e-12)
    # the zero point is rounded too (half to even): [-100, 100] → s = 40/3, z = round(7.5) = 8, so
    # −100 → (round(−7.5) + 8 − 8)·s = −8s
    w3 = torch.tensor([[-100.0, 100.0]], dtype=torch.float64)
    assert int4_roundtrip(w3, 2)[0].tolist() == pytest.approx([-8 * 40 / 3, 7 * 40 / 3], abs=1e-12)


def test_ragged_last_group_and_zero_group() -> None:
    w = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    # groups [0, 3], [1, 2], [0]: the range holds 0, so [1, 2] quantises over [0, 2] (s = 2/15,
    # 1 → round(7.5) = 8 → 16/15); the last group is all zero (s = 0), kept exactly
    out = int4_roundtrip(w, 2)
    assert out[0].tolist() == pytest.approx([0.0, 3.0, 16 / 15, 2.0, 0.0], abs=1e-12)
    codes, scale, zero = int4_quantize(w, 2)
    assert codes.shape == (1, 5) and scale.shape == (1, 3) and scale[0, 2].item() == 0.0
    assert zero.tolist() == [[0, 0, 0]]
    # a constant group c ≠ 0 is exact too: its range [0, c] puts c on code 15
    assert int4_roundtrip(torch.tensor([[7.5, 7.5]], dtype=torch.float64), 2)[0].tolist() == [7.5, 7.5]


def test_error_bound_is_one_step() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    out = int4_roundtrip(w, 16)
    grouped = w.reshape(8, 4, 16)
    step = (grouped.amax(-1).clamp(min=0) - grouped.amin(-1).clamp(max=0)) / 15
    err = (out - w).abs().reshape(8, 4, 16)
    # half a step from the value's rounding, at most half another from the zero point's
    assert bool((err <= step[..., None] + 1e-6).all())
    assert len(torch.unique(out[0, :16])) <= 16


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="groupSize"):
        int4_quantize(torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        int4_quantize(torch.zeros(4), 2)


def test_straight_through_gradient_is_the_identity() -> None:
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    y = int4_ste(w, 4)
    assert y[0].tolist() == pytest.approx([-1.0, 0.0, 0.4, 2.0], abs=1e-12)
    (y * torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)).sum().backward()
    assert w.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_which_weights_a_model_quantises() -> None:
    from dcmdp.models.tiny import build_model
    from dcmdp.spec import ModelSpec

    model, _ = build_model(ModelSpec(), seed=0)
    names = quantized_weight_names(model)
    assert names and all(n.endswith(".weight") for n in names)
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int4_roundtrip_model_(model, 32)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(names)
