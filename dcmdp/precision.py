"""What each precision means, in one typed table.

A pool's ``precision`` says how its engine holds and computes with the policy's weights; the
trainer's model ``dtype`` and ``precision`` use the float subset. Every other module (the spec,
the wire, the engines, the trainer's weight path) reads its meaning here, so adding a precision is
one :class:`Precision` entry in :data:`PRECISIONS` (plus, for a new quantisation kind, its
quantiser in the engine that serves it).

Each entry gives:

* ``compute``: the float dtype of the engine's activations and of every layer it does not
  quantise (``fp32`` | ``bf16`` | ``fp16``);
* ``wire``: the float dtype a pool receives weights in. Float pools receive their own dtype;
  quantising pools receive bf16 (the engine quantises from 16-bit weights, so no non-fp32 pool
  moves more than half the bytes of fp32);
* ``quantisation``: the ``hf`` engine's weight quantisation, redone after every update (``None``:
  the weights are only cast to ``compute``): ``int8-dynamic`` = torch's ``quantize_dynamic`` of
  every Linear (int8 weights, activations quantised per batch, CPU kernels); ``fp8-e4m3`` = every
  Linear weight rounded through float8-e4m3 with a per-output-channel absmax scale; ``int4-rtn`` =
  weight-only round-to-nearest int4, group-wise (the pool's ``quantGroupSize``), of every decoder
  Linear (:mod:`dcmdp.int4`, the quantiser ``constraint.mode: deployed-penalty`` reproduces);
* ``emulated``: the ``hf`` engine reproduces the format's *weight error* in ``compute`` dtype,
  not its kernels;
* ``hf_cpu_only``: the ``hf`` engine's quantisation has CPU kernels only;
* ``vllm``: vLLM's ``dtype=`` / ``quantization=`` (and whether it needs a GPU), or ``None`` with
  ``vllm_refusal`` saying why vLLM cannot serve it.

Names are the spec's (``fp32``, ``bf16``, ...); :data:`TORCH_DTYPES` maps a float name to the
torch dtype name (``getattr(torch, TORCH_DTYPES["bf16"])``). The module imports nothing heavy
(not even torch lazily): the operator reads it through the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

FloatName = Literal["fp32", "bf16", "fp16"]
Quantisation = Literal["int8-dynamic", "fp8-e4m3", "int4-rtn"]

# float name -> torch dtype name (``getattr(torch, name)``)
TORCH_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
WIRE_DTYPES: tuple[str, ...] = tuple(TORCH_DTYPES)


@dataclass(frozen=True)
class VLLMMapping:
    """How vLLM serves a precision: ``LLM(dtype=dtype, quantization=quantization)``."""

    dtype: str  # torch dtype name, vLLM's ``dtype=``
    quantization: Optional[str] = None  # vLLM's ``quantization=`` (online, from an unquantised checkpoint)
    gpu_only: bool = False  # the quantisation has no CPU kernels in vLLM


@dataclass(frozen=True)
class Precision:
    """One precision (see the module docstring for each field's meaning)."""

    name: str
    compute: FloatName
    wire: FloatName
    quantisation: Optional[Quantisation] = None
    emulated: bool = False
    hf_cpu_only: bool = False
    vllm: Optional[VLLMMapping] = None
    vllm_refusal: str = ""
    trainer: bool = False  # also a trainer weight dtype / autocast precision

    def __post_init__(self) -> None:
        if (self.vllm is None) == (not self.vllm_refusal):
            raise ValueError(f"precision {self.name}: give exactly one of vllm and vllm_refusal")
        if self.quantisation is None and self.compute != self.name:
            raise ValueError(f"precision {self.name}: a float precision computes in itself")


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", compute="fp32", wire="fp32", vllm=VLLMMapping("float32"), trainer=True),
    Precision("bf16", compute="bf16", wire="bf16", vllm=VLLMMapping("bfloat16"), trainer=True),
    Precision("fp16", compute="fp16", wire="fp16", vllm=VLLMMapping("float16")),
    Precision("int8", compute="fp32", wire="bf16", quantisation="int8-dynamic", hf_cpu_only=True,
              vllm_refusal="vLLM has no online int8 quantisation of an unquantised checkpoint; "
                           "use engine 'hf' for int8"),
    Precision("fp8", compute="fp32", wire="bf16", quantisation="fp8-e4m3", emulated=True,
              vllm=VLLMMapping("bfloat16", quantization="fp8", gpu_only=True)),
    Precision("int4", compute="fp32", wire="bf16", quantisation="int4-rtn", emulated=True,
              vllm_refusal="vLLM's online quantisation (0.32: fp8, int8, mxfp4, mxfp8, nvfp4) has no int4 of an "
                           "unquantised checkpoint, and its CPU build serves int4 only from a pre-quantised AWQ "
                           "checkpoint; use engine 'hf' for int4"),
)}

POOL_PRECISIONS: tuple[str, ...] = tuple(PRECISIONS)
TRAINER_PRECISIONS: tuple[str, ...] = tuple(n for n, p in PRECISIONS.items() if p.trainer)

# The spec's types, derived from the table (pydantic and the CRD see the same enum).
PoolPrecision = Literal[POOL_PRECISIONS]  # type: ignore[valid-type]
TrainerPrecision = Literal[TRAINER_PRECISIONS]  # type: ignore[valid-type]


def precision(name: str) -> Precision:
    """The entry for ``name``; ``ValueError`` naming the known precisions otherwise."""
    found = PRECISIONS.get(name)
    if found is None:
        raise ValueError(f"unknown precision {name!r} (known: {', '.join(PRECISIONS)})")
    return found


def wire_dtype(name: str) -> str:
    """The float dtype (``fp32`` | ``bf16`` | ``fp16``) a pool of precision ``name`` receives weights in."""
    return precision(name).wire
