"""Wire dtypes and the manifest entry of a tensor in a weight snapshot.

A pool receives floating-point weights in its wire dtype (:func:`wire_dtype`): its own precision
for fp32/bf16/fp16 pools, bf16 for pools whose engine quantises (int8, fp8), so no non-fp32 pool
moves more than half the bytes of fp32. The byte layout itself is ``dcmdp.transport.buckets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    import torch

ALIGN = 64
WIRE_DTYPES = ("fp32", "bf16", "fp16")


def wire_dtype(engine: str, precision: str) -> str:
    """The dtype a pool receives weights in: its own float precision, bf16 when the engine
    quantises (int8, fp8: the engine quantises from 16-bit weights, so the wire carries half the
    bytes of fp32)."""
    if precision in ("bf16", "fp16", "fp32"):
        return precision
    return "bf16"


def wire_cast(state: Mapping[str, "torch.Tensor"], dtype: str) -> dict[str, "torch.Tensor"]:
    """``state`` with floating-point tensors rounded to the wire dtype (what a worker receives)."""
    target = _torch_dtypes()[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


class WeightFormatError(ValueError):
    """A snapshot or manifest that cannot be what it claims (bad dtype, sizes, checksum)."""


def _torch_dtypes() -> dict[str, "torch.dtype"]:
    # optional and heavy (the ml extra): the core imports without it
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> "torch.dtype":
    # optional and heavy (the ml extra): the core imports without it
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise WeightFormatError(f"unknown tensor dtype {name!r} in a weight manifest")
    return dt


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name: float32, bfloat16, int64, ...
    offset: int
    nbytes: int
