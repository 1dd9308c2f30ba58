"""The precision table: exact values, and every user of it agreeing with it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dcmdp.precision import (POOL_PRECISIONS, PRECISIONS, TORCH_DTYPES, TRAINER_PRECISIONS, WIRE_DTYPES, Precision,
                             VLLMMapping, precision, wire_dtype)
from dcmdp.spec import ModelSpec, PoolSpec, TrainerSpec
from dcmdp_rollout.engines.hf import QUANTISERS

INT8_REFUSAL = "vLLM has no online int8 quantisation of an unquantised checkpoint; use engine 'hf' for int8"
INT4_REFUSAL = ("vLLM's online quantisation (0.32: fp8, int8, mxfp4, mxfp8, nvfp4) has no int4 of an unquantised "
                "checkpoint, and its CPU build serves int4 only from a pre-quantised AWQ checkpoint; use engine 'hf' "
                "for int4")


def test_the_table_exactly():
    assert PRECISIONS == {
        "fp32": Precision("fp32", "fp32", "fp32", vllm=VLLMMapping("float32"), trainer=True),
        "bf16": Precision("bf16", "bf16", "bf16", vllm=VLLMMapping("bfloat16"), trainer=True),
        "fp16": Precision("fp16", "fp16", "fp16", vllm=VLLMMapping("float16")),
        "int8": Precision("int8", "fp32", "bf16", quantisation="int8-dynamic", hf_cpu_only=True,
                          vllm_refusal=INT8_REFUSAL),
        "fp8": Precision("fp8", "fp32", "bf16", quantisation="fp8-e4m3", emulated=True,
                         vllm=VLLMMapping("bfloat16", quantization="fp8", gpu_only=True)),
        "int4": Precision("int4", "fp32", "bf16", quantisation="int4-rtn", emulated=True, vllm_refusal=INT4_REFUSAL),
    }
    assert POOL_PRECISIONS == ("fp32", "bf16", "fp16", "int8", "fp8", "int4")
    assert TRAINER_PRECISIONS == ("fp32", "bf16")
    assert WIRE_DTYPES == ("fp32", "bf16", "fp16")


def test_wire_dtypes_and_bytes():
    assert {n: wire_dtype(n) for n in POOL_PRECISIONS} == {
        "fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "bf16", "fp8": "bf16", "int4": "bf16"}
    # no non-fp32 pool moves more than half the bytes of fp32
    assert {n: getattr(torch, TORCH_DTYPES[wire_dtype(n)]).itemsize for n in POOL_PRECISIONS} == {
        "fp32": 4, "bf16": 2, "fp16": 2, "int8": 2, "fp8": 2, "int4": 2}
    with pytest.raises(ValueError, match=r"unknown precision 'int3' \(known: fp32, bf16, fp16, int8, fp8, int4\)"):
        wire_dtype("int3")


def test_torch_dtypes():
    assert {n: getattr(torch, t) for n, t in TORCH_DTYPES.items()} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert {n: getattr(torch, v.dtype) for n, p in PRECISIONS.items() if (v := p.vllm)} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def test_an_entry_must_be_coherent():
    with pytest.raises(ValueError, match="exactly one of vllm and vllm_refusal"):
        Precision("x", "fp32", "fp32")
    with pytest.raises(ValueError, match="exactly one of vllm and vllm_refusal"):
        Precision("x", "fp32", "fp32", vllm=VLLMMapping("float32"), vllm_refusal="no")
    with pytest.raises(ValueError, match="a float precision computes in itself"):
        Precision("fp16", "fp32", "fp16", vllm=VLLMMapping("float16"))
    assert precision("fp8").emulated and not precision("int8").emulated


def test_the_spec_takes_its_enums_from_the_table():
    def enum(model, field):
        return tuple(model.model_json_schema(by_alias=True)["properties"][field]["enum"])

    assert enum(PoolSpec, "precision") == POOL_PRECISIONS
    assert enum(TrainerSpec, "precision") == TRAINER_PRECISIONS
    assert enum(ModelSpec, "dtype") == TRAINER_PRECISIONS
    for name in POOL_PRECISIONS:
        assert PoolSpec(name="p", precision=name).precision == name
    with pytest.raises(ValueError, match="precision"):
        PoolSpec(name="p", precision="int3")


def test_the_hf_engine_has_a_quantiser_for_every_quantisation():
    assert set(QUANTISERS) == {p.quantisation for p in PRECISIONS.values() if p.quantisation}


def test_the_module_imports_without_torch():
    code = "import sys, dcmdp.precision; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
