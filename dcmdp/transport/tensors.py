"""Weight snapshots as one flat, checksummed byte stream, cast to the receiver's precision.

``pack`` lays the tensors of a state dict end to end (each at a 64-byte aligned offset), casting
floating-point tensors to the wire dtype first, so a bf16 pool is sent bf16 bytes, never fp32. The
result carries a manifest (name, shape, dtype, offset, byte count of every tensor) and the sha256
of the whole stream. ``unpack`` turns the bytes and the manifest back into tensors (views of one
buffer, no copy). Chunks of the stream carry a crc32 (``chunk_crc``), so a damaged chunk is
detected and fetched again before the sha256 of the whole is even checked.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    import torch

ALIGN = 64
WIRE_DTYPES = ("fp32", "bf16", "fp16")


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


@dataclass
class Packed:
    data: bytearray
    entries: list[TensorEntry]
    dtype: str  # the wire dtype floating-point tensors were cast to
    sha256: str

    @property
    def total_bytes(self) -> int:
        return len(self.data)


def chunk_crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(state: Mapping[str, "torch.Tensor"], dtype: str, skip: Iterable[str] = ()) -> Packed:
    """The state dict as one byte stream; floating-point tensors cast to ``dtype`` (fp32|bf16|fp16)."""
    # optional and heavy (the ml extra): the core imports without it
    import torch

    if dtype not in WIRE_DTYPES:
        raise WeightFormatError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)} (got {dtype!r})")
    target = _torch_dtypes()[dtype]
    skip = set(skip)
    tensors, entries, offset = [], [], 0
    for name, t in state.items():
        if name in skip:
            continue
        t = t.detach()
        if t.is_floating_point() and t.dtype != target:
            t = t.to(target)
        t = t.contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        offset = (offset + ALIGN - 1) // ALIGN * ALIGN
        entries.append(TensorEntry(name, tuple(t.shape), dtype_name(t.dtype), offset, nbytes))
        tensors.append(t)
        offset += nbytes
    buf = bytearray(offset)
    if offset:
        flat = torch.frombuffer(buf, dtype=torch.uint8)
        for e, t in zip(entries, tensors):
            if e.nbytes:
                flat[e.offset:e.offset + e.nbytes].copy_(t.reshape(-1).view(torch.uint8))
    return Packed(buf, entries, dtype, sha256(buf))


def unpack(data, entries: list[TensorEntry]) -> dict[str, "torch.Tensor"]:
    """Tensors (views of one writable buffer) from the bytes of a packed stream and its manifest."""
    # optional and heavy (the ml extra): the core imports without it
    import torch

    buf = data if isinstance(data, bytearray) else bytearray(data)
    flat = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    out = {}
    for e in entries:
        dt = dtype_from_name(e.dtype)
        elem = torch.empty((), dtype=dt).element_size()
        numel = 1
        for s in e.shape:
            numel *= s
        if e.nbytes != numel * elem or e.offset < 0 or e.offset + e.nbytes > len(buf):
            raise WeightFormatError(f"tensor {e.name}: {e.nbytes} bytes at offset {e.offset} do not fit "
                                    f"shape {list(e.shape)} {e.dtype} in a stream of {len(buf)} bytes")
        if e.offset % elem:
            raise WeightFormatError(f"tensor {e.name}: offset {e.offset} is not aligned to {elem} bytes")
        out[e.name] = flat[e.offset:e.offset + e.nbytes].view(dt).reshape(e.shape)
    return out
