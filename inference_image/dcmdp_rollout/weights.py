"""Pulling a weight snapshot from the trainer: manifest, checked chunks, resume, whole-stream sha256.

The worker asks for the version its lease names, in its pool's wire dtype (``wire_dtype``: a bf16
pool gets bf16 bytes; int8/fp8-emulated pools quantise from fp32). Every chunk's crc32 is checked
as it arrives; a bad chunk is fetched again from its offset. A stream that breaks (connection
reset, trainer busy) is resumed from the last good byte. The whole is checked against the
manifest's sha256 before any tensor is used; a mismatch fetches the whole snapshot again.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.transport.tensors import TensorEntry, WeightFormatError, chunk_crc, unpack

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def wire_dtype(engine: str, precision: str) -> str:
    """The dtype a pool receives weights in: its own float precision, fp32 when it quantises itself."""
    if precision in ("bf16", "fp16", "fp32"):
        return precision
    if engine == "vllm" and precision == "fp8":
        return "bf16"  # vLLM's online fp8 quantisation starts from 16-bit weights
    return "fp32"  # int8 / emulated fp8 quantise from full precision


class WeightFetchError(RuntimeError):
    pass


class _Hasher:
    """sha256 of the accepted chunks, in order, in a thread of its own: hashlib releases the GIL,
    so the digest of chunk i is computed while chunk i+1 is being received."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._digest.update(data)

    def update(self, data: bytes) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._digest.hexdigest()


@dataclass
class FetchStats:
    version: int = -1
    dtype: str = ""
    bytes: int = 0  # bytes received (re-fetches included)
    total_bytes: int = 0  # size of the snapshot
    seconds: float = 0.0
    crc_errors: int = 0
    resumes: int = 0
    sha_failures: int = 0
    events: list[str] = field(default_factory=list)


def fetch_weights(stub, header: pb.Header, version: int, dtype: str, *, chunk_size: int = 0,
                  max_attempts: int = 8, timeout: Optional[float] = 600.0,
                  on_event: Optional[Callable[[str, dict], None]] = None):
    """(tensors by name, FetchStats) of ``version`` (-1 = latest) in ``dtype``."""
    stats = FetchStats(dtype=dtype)
    t0 = time.perf_counter()

    def event(what: str, **fields) -> None:
        stats.events.append(what)
        if on_event:
            on_event(what, fields)

    for whole in range(3):
        manifest = stub.GetWeightManifest(pb.WeightRequest(header=header, version=version, dtype=dtype,
                                                           chunk_size=chunk_size), timeout=timeout)
        stats.version, stats.total_bytes = manifest.version, manifest.total_bytes
        req_version = manifest.version
        buf = bytearray(manifest.total_bytes)
        digest = _Hasher()  # over the accepted bytes, in order, while the next chunk arrives
        offset, failures = 0, 0
        while offset < manifest.total_bytes:
            if failures >= max_attempts:
                raise WeightFetchError(f"weights v{req_version}/{dtype}: gave up after {failures} failed "
                                       f"attempts at byte {offset} of {manifest.total_bytes}")
            stream = stub.StreamWeights(pb.WeightRequest(header=header, version=req_version, dtype=dtype,
                                                         offset=offset, chunk_size=chunk_size), timeout=timeout)
            progressed = False
            try:
                for ch in stream:
                    data = ch.data  # (each attribute read of a bytes field is a fresh copy)
                    n = len(data)
                    stats.bytes += n
                    if ch.version != req_version or ch.offset != offset or offset + n > manifest.total_bytes:
                        event("chunk out of place", offset=offset, got_offset=ch.offset, got_version=ch.version)
                        stream.cancel()
                        failures += 1
                        break
                    if chunk_crc(data) != ch.crc32:
                        stats.crc_errors += 1
                        failures += 1
                        event("chunk crc mismatch: fetching it again", offset=offset, bytes=n)
                        stream.cancel()
                        break
                    buf[offset:offset + n] = data
                    digest.update(data)
                    offset += n
                    progressed = True
                    failures = 0
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                stats.resumes += 1
                failures += 0 if progressed else 1
                event("stream broken: resuming", offset=offset, code=exc.code().name)
                time.sleep(min(2.0, 0.05 * (2 ** failures)))
        if digest.hexdigest() == manifest.sha256:
            entries = [TensorEntry(t.name, tuple(t.shape), t.dtype, t.offset, t.nbytes) for t in manifest.tensors]
            try:
                tensors = unpack(buf, entries)
            except WeightFormatError as exc:
                raise WeightFetchError(f"weights v{req_version}/{dtype}: {exc}") from None
            stats.seconds = time.perf_counter() - t0
            return tensors, stats
        stats.sha_failures += 1
        event("sha256 mismatch: fetching the whole snapshot again", version=req_version)
        version = req_version
    raise WeightFetchError(f"weights v{version}/{dtype}: sha256 mismatch three times")
