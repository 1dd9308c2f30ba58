"""The weight publisher: versioned snapshots, cast on the fly to each pool's wire dtype, in chunks.

The trainer publishes the state dict of every new weight version; the publisher keeps the last
``keep`` versions (as many as the staleness bound and the pools' lags can ask for). A worker asks
for (version, dtype): the snapshot is cast and packed once per (version, dtype) — a bf16 pool
gets bf16 bytes — and cached, then served as a manifest plus a stream of crc32-checked chunks
from any byte offset (a broken stream resumes where it stopped).

Test hooks (environment, read once): ``DCMDP_TEST_CORRUPT_CHUNKS=N`` damages the bytes (not the
crc) of the first chunk of each of the first N streams served; ``DCMDP_TEST_BREAK_STREAM=N`` aborts the first
stream after N chunks. They exist to prove that workers detect and recover from both.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from dcmdp.transport.channel import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES
from dcmdp.transport.tensors import WIRE_DTYPES, Packed, chunk_crc, pack


class WeightsUnavailable(LookupError):
    """The asked-for version is not (or no longer) kept."""


@dataclass
class Chunk:
    version: int
    offset: int
    data: bytes
    crc32: int


class WeightPublisher:
    def __init__(self, keep: int = 1, skip: tuple[str, ...] = (), cache: int = 6):
        self.keep = max(1, keep)
        self.skip = skip  # e.g. a tied lm_head.weight (the receiver re-ties it)
        self._snapshots: "OrderedDict[int, Mapping[str, torch.Tensor]]" = OrderedDict()
        self._packed: "OrderedDict[tuple[int, str], Packed]" = OrderedDict()
        # (version, dtype, chunk size) -> [(offset, bytes, crc32)]: split and checksummed once, then
        # served to every worker without a copy per request (costs one more copy of the snapshot)
        self._split: dict[tuple[int, str, int], list[tuple[int, bytes, int]]] = {}
        self._cache = cache
        self._lock = threading.Lock()
        self._building: dict[tuple[int, str], threading.Lock] = {}
        self._corrupt = int(os.environ.get("DCMDP_TEST_CORRUPT_CHUNKS", "0") or 0)
        self._break = int(os.environ.get("DCMDP_TEST_BREAK_STREAM", "0") or 0)
        self.corrupted_sent = 0
        self.breaks_done = 0

    # -- publishing ------------------------------------------------------------------------------
    def publish(self, version: int, state: Mapping[str, torch.Tensor]) -> None:
        """Make ``version`` available (the tensors must not change afterwards: pass a snapshot)."""
        with self._lock:
            self._snapshots[version] = state
            while len(self._snapshots) > self.keep:
                old, _ = self._snapshots.popitem(last=False)
                for key in [k for k in self._packed if k[0] == old]:
                    del self._packed[key]
                for key in [k for k in self._split if k[0] == old]:
                    del self._split[key]

    @property
    def latest(self) -> int:
        with self._lock:
            return max(self._snapshots) if self._snapshots else -1

    def versions(self) -> list[int]:
        with self._lock:
            return list(self._snapshots)

    def packed(self, version: int, dtype: str) -> Packed:
        """The (cached) packed snapshot of ``version`` cast to ``dtype``; -1 = latest."""
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(WIRE_DTYPES)} (got {dtype!r})")
        with self._lock:
            if version < 0 and self._snapshots:
                version = max(self._snapshots)
            key = (version, dtype)
            if key in self._packed:
                self._packed.move_to_end(key)
                return self._packed[key]
            if version not in self._snapshots:
                kept = ", ".join(map(str, self._snapshots)) or "none"
                raise WeightsUnavailable(f"weight version {version} is not kept (kept: {kept})")
            state = self._snapshots[version]
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:  # one build per (version, dtype), other askers wait for it
            with self._lock:
                if key in self._packed:
                    return self._packed[key]
            p = pack(state, dtype, self.skip)
            with self._lock:
                self._packed[key] = p
                self._building.pop(key, None)
                while len(self._packed) > self._cache:
                    gone, _ = self._packed.popitem(last=False)
                    for k in [k for k in self._split if k[:2] == gone]:
                        del self._split[k]
            return p

    def _chunk_list(self, version: int, dtype: str, size: int, p: Packed) -> list[tuple[int, bytes, int]]:
        key = (version, dtype, size)
        with self._lock:
            found = self._split.get(key)
        if found is None:
            view = memoryview(p.data)
            found = []
            for start in range(0, p.total_bytes, size):
                data = bytes(view[start:start + size])
                found.append((start, data, chunk_crc(data)))
            with self._lock:
                if (version, dtype) in self._packed:
                    self._split[key] = found
        return found

    def _claim_corruption(self) -> bool:
        with self._lock:
            if self.corrupted_sent < self._corrupt:
                self.corrupted_sent += 1
                return True
            return False

    def chunks(self, version: int, dtype: str, offset: int = 0, chunk_size: int = 0) -> Iterator[Chunk]:
        """The stream of ``version``/``dtype`` from ``offset``, in crc32-checked chunks."""
        p = self.packed(version, dtype)
        if version < 0:
            version = self.latest
        size = chunk_size or DEFAULT_CHUNK_BYTES
        if not 0 < size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK_BYTES}] bytes (got {chunk_size})")
        if not 0 <= offset <= p.total_bytes:
            raise ValueError(f"offset {offset} is outside the {p.total_bytes}-byte snapshot")
        if offset % size == 0:  # the usual case: whole chunks, split and checksummed once
            pieces = self._chunk_list(version, dtype, size, p)[offset // size:]
        else:  # resuming inside a chunk
            view = memoryview(p.data)
            pieces = ((s, bytes(view[s:s + size]), None) for s in range(offset, p.total_bytes, size))
        sent = 0
        for start, data, crc in pieces:
            if self._break and self.breaks_done == 0 and sent >= self._break:
                self.breaks_done += 1
                raise ConnectionAbortedError(f"test hook: stream broken after {sent} chunks")
            if crc is None:
                crc = chunk_crc(data)
            if sent == 0 and self._corrupt and self._claim_corruption():
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            sent += 1
            yield Chunk(version, start, data, crc)
