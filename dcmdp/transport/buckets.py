"""The bucketed wire layout of a weight snapshot: planned from the model, filled one bucket at a time.

A snapshot in wire dtype ``d`` is a virtual byte stream: every tensor (floating point ones cast
to ``d``, others as they are) at a 64-byte aligned offset, end to end. The stream is never built
whole: it is cut into buckets of ``bucket_bytes`` (a multiple of 64, so no element straddles a
bucket edge) and bucket ``i`` = bytes ``[i·B, min((i+1)·B, total))`` is filled on demand straight
from the model tensors, the cast and the copy in one ``copy_`` into the caller's buffer
(:func:`fill`). A sender therefore holds at most the buckets it has in flight, never a packed or
split copy of the model.

Each bucket carries a crc32 (zlib's polynomial and values; computed with ISA-L's vectorised crc32
from ``isal`` at ~10 GB/s where it is installed, else zlib's at ~1 GB/s), computed once by the
sender. A bucket that lies inside one tensor already in the wire dtype is sent as a view of it
(:func:`direct`), with no copy at all. The receiver turns buckets back
into whole tensors as they arrive (:class:`Assembler`): a tensor inside one bucket is a view of it,
one spanning buckets is put together from its pieces.

The in-process runner has no wire, yet its engines load what a worker would: :func:`loopback`
runs the same plan, check and fill, so both paths cast in :func:`fill` and nowhere else.

Before anything is sent, :func:`check_cast` proves the cast finite: a tensor whose largest
magnitude is not finite in the wire dtype raises :class:`WeightCastError` naming the tensor, the
magnitude and the dtype (an fp32 value above 65504 becomes inf in fp16).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Optional

from dcmdp.precision import TORCH_DTYPES, WIRE_DTYPES
from dcmdp.transport.tensors import ALIGN, WeightFormatError, TensorEntry, dtype_from_name, dtype_name

if TYPE_CHECKING:
    # optional and heavy (the ml extra): the core imports without it
    import torch

DEFAULT_BUCKET_BYTES = 64 << 20  # the one chunk size of the gRPC stream and the broadcast bucket (spec: trainer.weightBucketMiB)


class WeightCastError(ValueError):
    """A tensor is not finite after the cast to the wire dtype (nothing was sent)."""


def _wire_torch_dtype(dtype: str) -> "torch.dtype":
    if dtype not in WIRE_DTYPES:
        raise WeightFormatError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)} (got {dtype!r})")
    return dtype_from_name(TORCH_DTYPES[dtype])


try:  # ISA-L: the same crc32 as zlib (same polynomial, same values), ~10x faster (pclmul)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the always-there fallback
    from zlib import crc32 as _crc32


def bucket_crc(data, value: int = 0) -> int:
    """zlib crc32 of a bucket's bytes (a buffer or a contiguous uint8 CPU tensor), unsigned 32-bit;
    ``value`` is the crc of the bytes before (``bucket_crc(b, bucket_crc(a)) == bucket_crc(a + b)``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = data.numpy()
    return _crc32(data, value) & 0xFFFFFFFF


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, stop)`` of tensor ``entry`` lie at ``at`` in the bucket."""
    entry: TensorEntry
    start: int
    stop: int
    at: int


@dataclass(frozen=True)
class Layout:
    """Where every tensor's bytes lie in the wire stream, and how the stream is cut into buckets."""
    dtype: str  # the wire dtype floating-point tensors are cast to: fp32 | bf16 | fp16
    entries: tuple[TensorEntry, ...]
    total_bytes: int
    bucket_bytes: int

    def __post_init__(self) -> None:
        if self.bucket_bytes <= 0 or self.bucket_bytes % ALIGN:
            raise WeightFormatError(f"bucket_bytes must be a positive multiple of {ALIGN} (got {self.bucket_bytes})")
        if any(a.offset > b.offset for a, b in zip(self.entries, self.entries[1:])):
            raise WeightFormatError("tensor offsets must be in stream order")

    @cached_property
    def _ends(self) -> list[int]:
        return [e.offset + e.nbytes for e in self.entries]

    @property
    def buckets(self) -> int:
        return -(-self.total_bytes // self.bucket_bytes)

    def span(self, i: int) -> tuple[int, int]:
        """The stream byte range [start, stop) of bucket ``i``."""
        if not 0 <= i < self.buckets:
            raise WeightFormatError(f"bucket {i} is outside the {self.buckets} buckets of the snapshot")
        start = i * self.bucket_bytes
        return start, min(start + self.bucket_bytes, self.total_bytes)

    def pieces(self, i: int) -> list[Piece]:
        """The tensor pieces of bucket ``i`` (``at`` relative to the bucket's start)."""
        return self.pieces_in(*self.span(i))

    def parts(self, i: int, part_bytes: int) -> list[tuple[int, int]]:
        """Bucket ``i`` cut into stream byte ranges of at most ``part_bytes`` (the units a sender
        casts and puts on the wire; the bucket stays the unit of the crc and of loading)."""
        lo, hi = self.span(i)
        return [(a, min(a + part_bytes, hi)) for a in range(lo, hi, part_bytes)]

    def pieces_in(self, lo: int, hi: int) -> list[Piece]:
        """The tensor pieces of stream bytes [lo, hi) (``at`` relative to ``lo``)."""
        out = []
        for e in self.entries[bisect_right(self._ends, lo):]:  # the first tensor ending past lo, on
            if e.offset >= hi:
                break
            a, b = max(lo, e.offset), min(hi, e.offset + e.nbytes)
            if a < b:
                out.append(Piece(e, a - e.offset, b - e.offset, a - lo))
        return out


def plan(state: Mapping[str, "torch.Tensor"], dtype: str, skip: Iterable[str] = (),
         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Layout:
    """The layout of ``state`` cast to ``dtype``, without touching a byte of it."""
    target = _wire_torch_dtype(dtype)
    skip = set(skip)
    entries, offset = [], 0
    for name, t in state.items():
        if name in skip:
            continue
        dt = target if t.is_floating_point() else t.dtype
        nbytes = t.numel() * dt.itemsize
        offset = (offset + ALIGN - 1) // ALIGN * ALIGN
        entries.append(TensorEntry(name, tuple(t.shape), dtype_name(dt), offset, nbytes))
        offset += nbytes
    return Layout(dtype, tuple(entries), offset, bucket_bytes)


def check_cast(state: Mapping[str, "torch.Tensor"], layout: Layout) -> None:
    """Raise :class:`WeightCastError` if a floating-point tensor is not finite after the cast.

    Exact and copy-free: casts are monotone, so the cast of ``max |x|`` (from ``aminmax``) is
    finite iff every element's is."""
    # optional and heavy (the ml extra): the core imports without it
    import torch

    for e in layout.entries:
        t = state[e.name]
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = _peak(t.detach())
        if not torch.isfinite(peak.to(dtype_from_name(e.dtype))):
            raise WeightCastError(f"tensor {e.name}: largest magnitude {peak.item():.6g} ({t.dtype}) is not finite "
                                  f"in the wire dtype {e.dtype}; nothing was sent")


PEAK_CHUNK = 1 << 24  # elements upcast at a time where aminmax lacks the dtype (64 MiB of fp32)


def _peak(t: "torch.Tensor") -> "torch.Tensor":
    """``max |t|`` as a float64 scalar tensor (NaN if any element is NaN). ``aminmax`` where the
    dtype has it; else (the float8 types) over chunks upcast to fp32, an exact widening, so the
    check costs at most one chunk of memory."""
    # optional and heavy (the ml extra): the core imports without it
    import torch

    try:
        lo, hi = torch.aminmax(t)
        return torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
    except (NotImplementedError, RuntimeError):  # "aminmax_cpu" not implemented for 'Float8_e4m3fn'
        flat = t.reshape(-1)
        peaks = [flat[a:a + PEAK_CHUNK].float().abs().amax() for a in range(0, flat.numel(), PEAK_CHUNK)]
        return torch.stack(peaks).amax().to(torch.float64)  # (amax propagates NaN)


def fill(state: Mapping[str, "torch.Tensor"], layout: Layout, i: int, out: "torch.Tensor") -> "torch.Tensor":
    """Bucket ``i`` written into ``out`` (uint8, at least ``bucket_bytes`` long); returns the filled view.

    Each piece is cast and copied in one ``copy_`` from the model tensor (on its device) into the
    buffer; alignment gaps are zeroed so the bytes (and their crc) are deterministic."""
    return fill_range(state, layout, *layout.span(i), out)


def fill_range(state: Mapping[str, "torch.Tensor"], layout: Layout, lo: int, hi: int,
               out: "torch.Tensor") -> "torch.Tensor":
    """Stream bytes [lo, hi) written into ``out`` (uint8, at least hi - lo long), as :func:`fill`."""
    view = out[:hi - lo]
    at = 0
    for p in layout.pieces_in(lo, hi):
        view[at:p.at].zero_()  # an alignment gap
        dt = dtype_from_name(p.entry.dtype)
        size = dt.itemsize
        src = state[p.entry.name].detach().reshape(-1)[p.start // size:p.stop // size]
        dst = view[p.at:p.at + p.stop - p.start].view(dt)
        dst.copy_(src if src.device == dst.device else src.to(dst.device, non_blocking=False))
        at = p.at + p.stop - p.start
    view[at:].zero_()
    return view


def direct(state: Mapping[str, "torch.Tensor"], layout: Layout, i: int) -> Optional["torch.Tensor"]:
    """Bucket ``i`` as a uint8 view of its model tensor when no fill is needed, else None.

    That is when the bucket lies wholly inside one contiguous tensor whose dtype is already the
    wire dtype (an fp32 pool from fp32 weights, a bf16 pool from bf16 weights): the bytes are
    the tensor's own, so the sender hands them to the transport without a copy. The tensor must
    not change while the view is in use (snapshots are immutable)."""
    return direct_range(state, layout, *layout.span(i))


def direct_range(state: Mapping[str, "torch.Tensor"], layout: Layout, lo: int,
                 hi: int) -> Optional["torch.Tensor"]:
    """Stream bytes [lo, hi) as a view of their tensor, or None (see :func:`direct`)."""
    # optional and heavy (the ml extra): the core imports without it
    import torch

    pieces = layout.pieces_in(lo, hi)
    if len(pieces) != 1 or pieces[0].at != 0 or pieces[0].stop - pieces[0].start != hi - lo:
        return None
    p = pieces[0]
    src = state[p.entry.name].detach()
    if dtype_name(src.dtype) != p.entry.dtype or not src.is_contiguous():
        return None
    return src.reshape(-1).view(torch.uint8)[p.start:p.stop]


@dataclass(frozen=True)
class Slice:
    """Elements ``[start, start + values.numel())`` of the flattened tensor ``name`` of ``shape``:
    ``values`` is 1-D in the wire dtype, a view of the bucket buffer (valid while it is)."""
    name: str
    shape: tuple[int, ...]
    start: int
    values: "torch.Tensor"


class Assembler:
    """Receiver side: whole tensors out of buckets as they arrive (in any order).

    ``add(i, data)`` returns the (name, tensor) pairs completed by bucket ``i``: a tensor wholly
    inside the bucket is a view of ``data`` (valid while ``data`` is), one spanning buckets is an
    owned tensor assembled from its pieces. ``slices(i, data)`` instead returns bucket ``i``'s
    pieces as :class:`Slice` views, with no copy, for a loader that writes them in place."""

    def __init__(self, layout: Layout, device: Optional[str] = None):
        self.layout = layout
        self.device = device
        self._partial: dict[str, tuple["torch.Tensor", int]] = {}  # name -> (flat uint8, bytes still missing)
        self.done: set[int] = set()

    def add(self, i: int, data: "torch.Tensor") -> list[tuple[str, "torch.Tensor"]]:
        # optional and heavy (the ml extra): the core imports without it
        import torch

        self._accept(i, data)
        out = []
        for p in self.layout.pieces(i):
            e = p.entry
            dt = dtype_from_name(e.dtype)
            if p.start == 0 and p.stop == e.nbytes:
                out.append((e.name, data[p.at:p.at + e.nbytes].view(dt).reshape(e.shape)))
                continue
            flat, missing = self._partial.get(e.name, (None, e.nbytes))
            if flat is None:
                flat = torch.empty(e.nbytes, dtype=torch.uint8, device=data.device)
            flat[p.start:p.stop].copy_(data[p.at:p.at + p.stop - p.start])
            missing -= p.stop - p.start
            if missing:
                self._partial[e.name] = (flat, missing)
            else:
                self._partial.pop(e.name, None)
                out.append((e.name, flat.view(dt).reshape(e.shape)))
        return out

    def slices(self, i: int, data: "torch.Tensor") -> list[Slice]:
        self._accept(i, data)
        out = []
        for p in self.layout.pieces(i):
            dt = dtype_from_name(p.entry.dtype)
            out.append(Slice(p.entry.name, p.entry.shape, p.start // dt.itemsize,
                             data[p.at:p.at + p.stop - p.start].view(dt)))
        return out

    def _accept(self, i: int, data: "torch.Tensor") -> None:
        lo, hi = self.layout.span(i)
        if data.numel() != hi - lo:
            raise WeightFormatError(f"bucket {i}: {data.numel()} bytes, expected {hi - lo}")
        if i in self.done:
            raise WeightFormatError(f"bucket {i} delivered twice")
        self.done.add(i)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.layout.buckets


def iter_buckets(state: Mapping[str, "torch.Tensor"], layout: Layout, first: int = 0,
                 buffers: int = 1) -> Iterator[tuple[int, "torch.Tensor"]]:
    """(i, filled bucket) from bucket ``first`` on, cycling through ``buffers`` reusable buffers."""
    # optional and heavy (the ml extra): the core imports without it
    import torch

    if layout.buckets == 0:
        return
    device = next((t.device for t in state.values()), torch.device("cpu"))
    size = min(layout.bucket_bytes, layout.total_bytes)
    pool = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(buffers)]
    for i in range(first, layout.buckets):
        yield i, fill(state, layout, i, pool[i % buffers])


def loopback(state: Mapping[str, "torch.Tensor"], dtype: str, skip: Iterable[str] = ()) -> dict[str, "torch.Tensor"]:
    """What a receiver assembles from ``state`` sent in wire dtype ``dtype``, without a wire.

    The same :func:`plan`, :func:`check_cast` (``WeightCastError`` before anything is returned)
    and :func:`fill` as a sent snapshot, into one buffer of ``total_bytes`` on the device of
    ``state``'s first tensor: every returned tensor is a view of it (floating point ones in
    ``dtype``, others as they are), so the in-process runner loads the bytes a worker loads."""
    # optional and heavy (the ml extra): the core imports without it
    import torch

    layout = plan(state, dtype, skip)
    check_cast(state, layout)
    if layout.total_bytes == 0:
        return {}
    whole = replace(layout, bucket_bytes=-(-layout.total_bytes // ALIGN) * ALIGN)  # one bucket
    device = next(iter(state.values())).device
    image = fill(state, whole, 0, torch.empty(whole.total_bytes, dtype=torch.uint8, device=device))
    return dict(Assembler(whole).add(0, image))
