"""The weight publisher: versioned snapshots served in buckets cast to each pool's wire dtype.

The trainer publishes the state dict of every new weight version. The newest is served from that
snapshot (shared, not copied). Older versions: given the pools' ``lags`` (wire dtype → largest
lag), each is kept only in the wire dtypes a worker may still fetch it in (a lagged pool's window,
or a version ``pinned`` by a lease or queued work), in the cheapest forms serving them, and never
beyond ``keep`` versions (``dcmdp_trainer.history``); without ``lags`` the last ``keep`` versions
are kept whole, as handed over. A reader asks
for (version, dtype): the publisher plans the bucketed layout once (``dcmdp.transport.buckets``),
proves the cast finite before a byte leaves (:class:`~dcmdp.transport.buckets.WeightCastError`
otherwise), and fills each bucket straight from the snapshot when it is sent. Nothing but the
layout and one crc32 per bucket (computed the first time the bucket is filled, then reused by
every reader and by the broadcast) is cached: memory per reader is the one bucket it has in flight.

There is one chunk size, the publisher's ``bucket_bytes``: a request for another is refused. A
chunk (one bucket) travels as consecutive pieces of at most :data:`STREAM_PIECE_BYTES`, each
carrying the bucket's crc32, so a stream holds one bucket buffer plus a few pieces on their way
through protobuf and gRPC, not several copies of a whole bucket (measured: ~5 buckets per stream
when a bucket was one message). (Tests damage and break streams from outside:
``dcmdp_testing.trainer_faults``.)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from dcmdp.transport.buckets import DEFAULT_BUCKET_BYTES, Layout, bucket_crc, check_cast, fill, plan
from dcmdp.precision import WIRE_DTYPES
from dcmdp_trainer.history import forms_for, narrow, wanted

STREAM_PIECE_BYTES = 4 << 20  # the largest message of a weight stream (a piece of one bucket)
SOURCE = "source"  # the form of a version that is the snapshot as handed over: it serves every wire dtype
Forms = dict[str, Mapping[str, torch.Tensor]]  # form (SOURCE or a 16-bit wire dtype) -> tensors


class WeightsUnavailable(LookupError):
    """The asked-for version is not (or no longer) kept."""


@dataclass
class Chunk:
    """A piece of a bucket: bytes [offset, offset + len(data)) of the snapshot; ``crc32`` is the
    whole bucket's."""
    version: int
    offset: int
    data: bytes
    crc32: int


@dataclass
class Prepared:
    """One (version, wire dtype): the layout, proven castable, and the crc32 of each bucket once known."""
    version: int
    state: Mapping[str, torch.Tensor]
    layout: Layout
    crcs: list[Optional[int]] = field(default_factory=list)


class WeightPublisher:
    def __init__(self, keep: int = 1, skip: tuple[str, ...] = (), bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtypes: tuple[str, ...] | list[str] = (), lags: Optional[Mapping[str, int]] = None,
                 pinned: Optional[Callable[[], Iterable[tuple[int, str]]]] = None,
                 held_elsewhere: Optional[Callable[[int], bool]] = None):
        """``keep``: versions kept at most (newest included); ``dtypes``: wire dtypes proven castable
        at publish time; ``lags``: wire dtype → the largest lag of its pools (None: keep the last
        ``keep`` versions whole); ``pinned()``: (version, wire dtype) pairs still named by leases or
        queued work, asked at each publish (settable later: the coordinator comes after the first
        publish); ``held_elsewhere(v)``: the trainer keeps version v's snapshot anyway (served from it,
        never copied)."""
        self.keep = max(1, keep)
        self.dtypes = tuple(dtypes)  # wire dtypes proven castable at publish time
        self.skip = skip  # e.g. a tied lm_head.weight (the receiver re-ties it)
        self.bucket_bytes = bucket_bytes
        self.lags = dict(lags) if lags is not None else None
        self.pinned = pinned
        self.held_elsewhere = held_elsewhere
        self._snapshots: "OrderedDict[int, Forms]" = OrderedDict()
        self._prepared: dict[tuple[int, str], Prepared] = {}  # ≤ keep × len(WIRE_DTYPES), no tensor bytes
        self._lock = threading.Lock()

    # -- publishing ------------------------------------------------------------------------------
    def publish(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        """Make ``version`` available (the tensors must not change afterwards: pass a snapshot).

        Raises :class:`~dcmdp.transport.buckets.WeightCastError` (and publishes nothing) when the
        snapshot is not finite in one of ``dtypes``."""
        for dtype in self.dtypes:
            check_cast(state, plan(state, dtype, self.skip, self.bucket_bytes))
        pins = list(self.pinned()) if self.pinned is not None else []  # outside our lock: it takes the coordinator's
        with self._lock:
            self._snapshots[version] = {SOURCE: state}
            older = {v: forms for v, forms in self._snapshots.items() if v < version}
        kept = self._retain(version, older, pins)  # copies (if any) are made outside the lock
        with self._lock:
            for v in older:
                if v in kept:
                    self._snapshots[v] = kept[v]
                else:
                    self._snapshots.pop(v, None)
            for key in list(self._prepared):
                self._refresh(key)

    def _retain(self, newest: int, older: dict[int, Forms], pins: list[tuple[int, str]]) -> dict[int, Forms]:
        """The forms each older version is kept in from now on (versions absent: dropped)."""
        recent = sorted(older)[-(self.keep - 1):] if self.keep > 1 else []
        if self.lags is None:
            return {v: older[v] for v in recent}
        out: dict[int, Forms] = {}
        for v, dtypes in wanted(newest, recent, self.lags, pins).items():
            forms = older[v]
            if SOURCE in forms and (self.held_elsewhere is not None and self.held_elsewhere(v)):
                out[v] = {SOURCE: forms[SOURCE]}  # the trainer holds it anyway: nothing held twice
                continue
            target = forms_for(dtypes)
            if SOURCE in forms:
                out[v] = ({SOURCE: forms[SOURCE]} if target == ("fp32",) else
                          {d: forms[d] if d in forms else narrow(forms[SOURCE], d) for d in target})
            else:  # already narrowed: keep the copies still wanted (a dropped form never comes back)
                left = {d: forms[d] for d in dtypes if d in forms}
                if left:
                    out[v] = left
        return out

    @staticmethod
    def _serving(forms: Forms, dtype: str) -> Optional[Mapping[str, torch.Tensor]]:
        return forms[dtype] if dtype in forms else forms.get(SOURCE)

    def _refresh(self, key: tuple[int, str]) -> None:
        """Point a cached layout at the form now serving it, or drop it (under the lock). A stream
        or broadcast already under way keeps the state it started with until it ends."""
        forms = self._snapshots.get(key[0])
        state = self._serving(forms, key[1]) if forms is not None else None
        prep = self._prepared[key]
        if state is None:
            del self._prepared[key]
        elif state is not prep.state:  # same layout and bytes (the copy is the wire rounding): crcs kept
            self._prepared[key] = Prepared(prep.version, state, prep.layout, prep.crcs)

    def kept_forms(self) -> dict[int, tuple[str, ...]]:
        """version → the forms it is kept in (``source`` and/or 16-bit wire dtypes), oldest first."""
        with self._lock:
            return {v: tuple(forms) for v, forms in self._snapshots.items()}

    @property
    def latest(self) -> int:
        with self._lock:
            return max(self._snapshots) if self._snapshots else -1

    def versions(self) -> list[int]:
        with self._lock:
            return list(self._snapshots)

    def prepared(self, version: int, dtype: str) -> Prepared:
        """The layout of ``version`` (-1 = latest) in ``dtype``; raises WeightsUnavailable,
        ValueError (unknown dtype) or WeightCastError (the cast would not be finite)."""
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(WIRE_DTYPES)} (got {dtype!r})")
        with self._lock:
            if version < 0 and self._snapshots:
                version = max(self._snapshots)
            found = self._prepared.get((version, dtype))
            if found is not None:
                return found
            forms = self._snapshots.get(version)
            state = self._serving(forms, dtype) if forms is not None else None
            if state is None:
                kept = ", ".join(map(str, self._snapshots)) or "none"
                what = "is not kept" if forms is None else f"is no longer kept in {dtype}"
                raise WeightsUnavailable(f"weight version {version} {what} (kept: {kept})")
        layout = plan(state, dtype, self.skip, self.bucket_bytes)
        check_cast(state, layout)
        prep = Prepared(version, state, layout, [None] * layout.buckets)
        with self._lock:
            forms = self._snapshots.get(version)
            if forms is not None and self._serving(forms, dtype) is state:
                prep = self._prepared.setdefault((version, dtype), prep)
        return prep

    def bucket(self, prep: Prepared, i: int, out: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(bucket ``i`` filled into ``out``, its crc32); the crc is computed the first time only."""
        data = fill(prep.state, prep.layout, i, out)
        return data, self.crc(prep, i, data)

    @staticmethod
    def crc(prep: Prepared, i: int, data: torch.Tensor) -> int:
        crc = prep.crcs[i]
        if crc is None:
            crc = prep.crcs[i] = bucket_crc(data if data.device.type == "cpu" else data.cpu())
        return crc

    def check_request(self, version: int, offset: int = 0, chunk_size: int = 0, length: int = 0) -> None:
        """Refuse a ``WeightRequest`` that no snapshot could serve: raises ValueError naming the field.

        ``version`` ≥ -1 (-1 = latest); ``chunk_size`` 0 or ``bucket_bytes`` (the one chunk size);
        ``offset`` ≥ 0 and a bucket boundary (a multiple of ``bucket_bytes``); ``length`` ≥ 0 bytes
        (0 = to the end). The same checks hold for every weight RPC; :meth:`check_offset` adds the
        one that needs the snapshot's size."""
        size = self.bucket_bytes
        if version < -1:
            raise ValueError(f"version must be >= 0, or -1 for the latest (got {version})")
        if chunk_size not in (0, size):
            raise ValueError(f"chunk_size must be 0 or this trainer's bucket size {size} (got {chunk_size})")
        if offset < 0 or offset % size:
            raise ValueError(f"offset must be >= 0 and a bucket boundary, a multiple of {size} bytes (got {offset})")
        if length < 0:
            raise ValueError(f"length must be >= 0 bytes, 0 = to the end (got {length})")

    @staticmethod
    def check_offset(prep: Prepared, offset: int) -> None:
        """Raises ValueError when ``offset`` (bytes) lies past the end of ``prep``'s snapshot."""
        if offset > prep.layout.total_bytes:
            raise ValueError(f"offset {offset} is past the end of the {prep.layout.total_bytes}-byte snapshot "
                             f"v{prep.version}/{prep.layout.dtype}")

    def chunks(self, version: int, dtype: str, offset: int = 0, chunk_size: int = 0,
               length: int = 0, piece_bytes: int = STREAM_PIECE_BYTES) -> Iterator[Chunk]:
        """The buckets of ``version``/``dtype`` from byte ``offset`` (a bucket boundary), ``length``
        bytes of them (0 = to the end), each as consecutive pieces of at most ``piece_bytes``
        (:class:`Chunk`), one reusable bucket buffer per stream. Raises ValueError (naming the field)
        for a request :meth:`check_request` or :meth:`check_offset` refuses."""
        self.check_request(version, offset, chunk_size, length)
        prep = self.prepared(version, dtype)
        self.check_offset(prep, offset)
        size = prep.layout.bucket_bytes
        first = offset // size
        last = prep.layout.buckets if length <= 0 else min(prep.layout.buckets, -(-(offset + length) // size))
        buf = torch.empty(min(size, prep.layout.total_bytes), dtype=torch.uint8)
        for i in range(first, last):
            view, crc = self.bucket(prep, i, buf)
            data = view.numpy()
            for lo in range(0, len(data), piece_bytes):
                yield Chunk(prep.version, i * size + lo, data[lo:lo + piece_bytes].tobytes(), crc)
