"""The bucketed wire layout: planned without copying, filled bucket by bucket, reassembled exactly."""

from __future__ import annotations

import pytest
import torch

from dcmdp.precision import TORCH_DTYPES
from dcmdp.transport.buckets import (Assembler, WeightCastError, bucket_crc, check_cast, direct, fill, fill_range,
                                     iter_buckets, loopback, plan)
from dcmdp.transport.tensors import WeightFormatError


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(10, 7, generator=g), "steps": torch.tensor([3, 4, 5], dtype=torch.int64),
            "b": torch.randn(33, generator=g), "big": torch.randn(100, generator=g), "tied": torch.randn(2)}


def cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The oracle: floating-point tensors rounded to the wire dtype by ``Tensor.to``."""
    return {k: v.to(getattr(torch, TORCH_DTYPES[dtype])) if v.is_floating_point() else v for k, v in state.items()}


def test_plan_places_cast_tensors_at_aligned_offsets():
    lay = plan(state_dict(), "bf16", skip=("tied",), bucket_bytes=128)
    assert [(e.name, e.dtype, e.offset, e.nbytes) for e in lay.entries] == [
        ("a", "bfloat16", 0, 140), ("steps", "int64", 192, 24), ("b", "bfloat16", 256, 66),
        ("big", "bfloat16", 384, 200)]
    assert lay.total_bytes == 584 and lay.buckets == 5 and lay.span(4) == (512, 584)
    with pytest.raises(WeightFormatError, match="multiple of 64"):
        plan(state_dict(), "bf16", bucket_bytes=100)
    with pytest.raises(WeightFormatError, match="wire dtype"):
        plan(state_dict(), "int4")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_buckets_reassemble_to_the_cast_tensors_in_any_order(dtype):
    state = state_dict()
    lay = plan(state, dtype, bucket_bytes=128)
    buckets = {i: b.clone() for i, b in iter_buckets(state, lay, buffers=2)}
    asm = Assembler(lay)
    got = {}
    for i in reversed(range(lay.buckets)):  # tensors spanning buckets complete when their last piece lands
        got.update({k: v.clone() for k, v in asm.add(i, buckets[i])})
    assert asm.complete
    want = cast(state, dtype)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    with pytest.raises(WeightFormatError, match="twice"):
        asm.add(0, buckets[0])
    with pytest.raises(WeightFormatError, match="expected"):
        Assembler(lay).add(0, buckets[0][:10])


def test_fill_is_deterministic_and_crc_is_zlib():
    state = state_dict()
    lay = plan(state, "bf16", bucket_bytes=128)
    a = fill(state, lay, 1, torch.full((128,), 7, dtype=torch.uint8)).clone()  # padding zeroed
    b = fill(state, lay, 1, torch.zeros(128, dtype=torch.uint8))
    assert torch.equal(a, b) and bucket_crc(a) == bucket_crc(bytes(a.numpy()))
    import zlib

    assert bucket_crc(a) == zlib.crc32(bytes(a.numpy()))


def test_a_cast_that_overflows_is_an_error_naming_tensor_magnitude_and_dtype():
    state = {"ok": torch.ones(3), "layer.w": torch.tensor([1.0, -70000.0, 2.0])}
    check_cast(state, plan(state, "bf16"))  # bf16 holds 7e4
    check_cast({"w": torch.tensor([65504.0])}, plan({"w": torch.tensor([65504.0])}, "fp16"))  # fp16 max: fine
    with pytest.raises(WeightCastError, match=r"tensor layer.w: largest magnitude 70000 \(torch.float32\) "
                                              r"is not finite in the wire dtype float16"):
        check_cast(state, plan(state, "fp16"))
    nan = {"w": torch.tensor([0.0, float("nan")])}
    with pytest.raises(WeightCastError, match="tensor w: largest magnitude nan"):
        check_cast(nan, plan(nan, "fp32"))


def test_fp8_weights_are_checked_and_sent_though_aminmax_lacks_the_dtype(monkeypatch):
    import dcmdp.transport.buckets as buckets

    monkeypatch.setattr(buckets, "PEAK_CHUNK", 4)  # several chunks, the last one short
    w = torch.tensor([0.5, -448.0, 3.0, 1.0, 2.0, -6.0, 0.25, 7.0, 9.0, 1.5], dtype=torch.float8_e4m3fn)
    state = {"layer.w": w}
    got = buckets.loopback(state, "bf16")["layer.w"]  # checked, filled and assembled as a worker would
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), w.float())
    nan = {"layer.w": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, float("nan")]).to(torch.float8_e4m3fn)}
    with pytest.raises(WeightCastError, match="tensor layer.w: largest magnitude nan"):
        check_cast(nan, plan(nan, "bf16"))


def test_a_bucket_inside_one_tensor_of_the_wire_dtype_is_a_view_of_it_not_a_copy():
    state = {"small": torch.randn(8), "big": torch.randn(128), "half": torch.randn(64).to(torch.bfloat16)}
    lay = plan(state, "fp32", bucket_bytes=128)  # small: [0, 32); big: [64, 576); half (cast): [576, 832)
    for i in range(lay.buckets):
        view = direct(state, lay, i)
        filled = fill(state, lay, i, torch.empty(128, dtype=torch.uint8))
        if view is None:
            continue
        assert torch.equal(view, filled) and bucket_crc(view) == bucket_crc(filled)
        assert state["big"].data_ptr() <= view.data_ptr() < state["big"].data_ptr() + 512  # the tensor's own bytes
    assert [direct(state, lay, i) is not None for i in range(lay.buckets)] == [False, True, True, True, False, False,
                                                                               False]
    assert all(direct(state, plan(state, "bf16", bucket_bytes=128), i) is None for i in range(2))  # a cast: filled


def test_parts_cut_a_bucket_and_their_crcs_chain_to_the_buckets():
    state = state_dict()
    lay = plan(state, "bf16", skip=("tied",), bucket_bytes=128)
    assert lay.parts(0, 64) == [(0, 64), (64, 128)] and lay.parts(4, 64) == [(512, 576), (576, 584)]
    whole = fill(state, lay, 4, torch.empty(128, dtype=torch.uint8)).clone()
    crc = 0
    for lo, hi in lay.parts(4, 64):
        crc = bucket_crc(fill_range(state, lay, lo, hi, torch.empty(64, dtype=torch.uint8)), crc)
    assert crc == bucket_crc(whole)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_loopback_is_what_a_receiver_assembles(dtype):
    """The in-process path: the same cast as the wire, as views of one buffer, skip honoured."""
    state = state_dict()
    got = loopback(state, dtype, skip=("tied",))
    want = cast({k: v for k, v in state.items() if k != "tied"}, dtype)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1
    assert loopback(state, dtype, skip=tuple(state)) == {}


def test_loopback_refuses_a_cast_that_is_not_finite():
    with pytest.raises(WeightCastError, match="tensor huge: largest magnitude 1e\\+06"):
        loopback({"huge": torch.tensor([1.0, -1e6])}, "fp16")


def test_the_spec_default_bucket_is_the_transport_default():
    from dcmdp.spec import TrainerSpec
    from dcmdp.transport.buckets import DEFAULT_BUCKET_BYTES

    assert TrainerSpec().weight_bucket_mib << 20 == DEFAULT_BUCKET_BYTES
