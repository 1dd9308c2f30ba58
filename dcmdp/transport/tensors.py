"""The manifest entry of a tensor in a weight snapshot.

A pool receives floating-point weights in its wire dtype (``dcmdp.precision``: the ``wire`` of its
precision). The byte layout itself, and the one place the cast to the wire dtype happens, is
``dcmdp.transport.buckets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ALIGN = 64


class WeightFormatError(ValueError):
    """A snapshot or manifest that cannot be what it claims (bad dtype, sizes, checksum)."""


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
