"""Receiving a weight snapshot: over the collective data plane, or the gRPC stream as fallback.

The worker asks for the version its lease names in its pool's wire dtype (``dcmdp.precision.wire_dtype``: bf16
for bf16, int8 and fp8 pools, which quantise in the engine). Either way the snapshot arrives in
buckets (``dcmdp.transport.buckets``), each with the crc32 the trainer computed once:

* :func:`receive_broadcast` joins the trainer's broadcast (``JoinBroadcast`` hands out the group;
  ``dcmdp.transport.collective`` opens it) and receives bucket after bucket into the
  ``RECEIVE_DEPTH`` reusable buffers of its link: over the group, or, when the trainer offers a
  shared-memory ring and every worker of the round maps it (all on the trainer's machine), copied
  out of the ring's slots as the group signals them (``dcmdp.transport.shared_ring``);
* :func:`fetch_weights` pulls buckets over ``StreamWeights`` (a joiner beyond the two rounds of a
  version under way, no data plane, or the buckets a broadcast lost or damaged); a broken stream
  resumes at the next bucket.

A :class:`BucketReceiver` checks each bucket's crc32 and hands its whole tensors to the sink
(the engine's loader) in a thread of its own, while the next bucket is being received. A bucket
whose crc does not match is never loaded: it is fetched again over the stream.
"""

from __future__ import annotations

import random
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc
import torch

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.transport.buckets import Assembler, Layout, bucket_crc
from dcmdp.transport.collective import FLAG_RING, Heartbeat, broadcast, gather, proof_tensor, wait
from dcmdp.transport.shared_ring import RingError, SharedRing
from dcmdp_rollout.broadcast_link import BroadcastLink
from dcmdp.transport.tensors import TensorEntry, WeightFormatError

__all__ = ["fetch_weights", "receive_broadcast", "BucketReceiver", "FetchStats", "LoadError", "WeightFetchError"]

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
Sink = Callable[[list], None]  # (name, tensor) pairs, or Slices
RECEIVE_DEPTH = 4  # bucket buffers a worker receives into: receives posted ahead while earlier ones load
PATH_RING = 1  # the round's first operation says (version, path): 1 = through the ring (dcmdp_trainer.broadcast)


class WeightFetchError(RuntimeError):
    pass


class LoadError(Exception):
    """The sink (the engine's loader) failed on a bucket: the update is not complete. Not a
    RuntimeError, so it is never mistaken for a transport failure and the bucket re-fetched."""


@dataclass
class FetchStats:
    version: int = -1
    dtype: str = ""
    bytes: int = 0  # bytes received (re-fetches included)
    total_bytes: int = 0  # size of the snapshot
    seconds: float = 0.0
    crc_errors: int = 0
    resumes: int = 0
    broadcast_bytes: int = 0  # of ``bytes``: over the collective data plane
    refetched: int = 0  # buckets fetched over the stream after a broadcast lost or damaged them
    load_seconds: float = 0.0  # spent checking crcs and loading buckets (in the loading thread, overlapped)
    connect_seconds: float = 0.0  # spent joining the broadcast's group (the rendezvous; ~0 when reused)
    reused_group: bool = False  # the broadcast went over the group kept from the worker's last one
    ring: bool = False  # the buckets came through the trainer's shared-memory ring (not over the group)
    events: list[str] = field(default_factory=list)


def layout_of(manifest: pb.WeightManifest) -> Layout:
    entries = tuple(TensorEntry(t.name, tuple(t.shape), t.dtype, t.offset, t.nbytes) for t in manifest.tensors)
    try:
        layout = Layout(manifest.dtype, entries, manifest.total_bytes, manifest.chunk_size)
        for e in entries:
            if e.offset < 0 or e.offset + e.nbytes > manifest.total_bytes:
                raise WeightFormatError(f"tensor {e.name}: {e.nbytes} bytes at offset {e.offset} do not fit "
                                        f"a stream of {manifest.total_bytes} bytes")
    except WeightFormatError as exc:
        raise WeightFetchError(f"weights v{manifest.version}/{manifest.dtype}: {exc}") from None
    return layout


class BucketReceiver:
    """Checks and loads buckets off the receiving thread, in arrival order.

    ``submit(i, data, crc)`` queues bucket ``i``: its crc32 is checked, then its completed tensors
    go to ``sink`` (or, with ``slices``, its pieces as :class:`~dcmdp.transport.buckets.Slice`
    views of ``data``, with no copy: for an engine that writes them into its weights in place); ``data`` must stay untouched until ``wait_for(i)`` returns. A bucket that
    fails its crc is remembered in ``bad`` and not loaded."""

    def __init__(self, layout: Layout, sink: Sink, stats: FetchStats, slices: bool = False):
        self.layout, self.sink, self.stats, self.slices = layout, sink, stats, slices
        self.assembler = Assembler(layout)
        self.bad: set[int] = set()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._futures: dict[int, Future] = {}

    def _load(self, i: int, data: torch.Tensor, crc: int) -> None:
        t0 = time.perf_counter()
        try:
            if bucket_crc(data if data.device.type == "cpu" else data.cpu()) != crc:
                self.bad.add(i)
                self.stats.crc_errors += 1
                return
            self.bad.discard(i)
            pieces = self.assembler.slices(i, data) if self.slices else self.assembler.add(i, data)
            try:
                self.sink(pieces)
            except Exception as exc:  # the engine's error, not the transport's: never taken for a lost bucket
                raise LoadError(f"loading bucket {i} into the engine failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.stats.load_seconds += time.perf_counter() - t0

    def submit(self, i: int, data: torch.Tensor, crc: int) -> None:
        self._futures[i] = self._pool.submit(self._load, i, data, crc)

    def wait_for(self, i: int) -> None:
        f = self._futures.pop(i, None)
        if f is not None:
            f.result()

    def drain(self) -> None:
        for i in sorted(self._futures):
            self.wait_for(i)

    def missing(self) -> list[int]:
        self.drain()
        return [i for i in range(self.layout.buckets) if i not in self.assembler.done]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def collect_into(out: dict[str, torch.Tensor]) -> Sink:
    """A sink that keeps every tensor (copied out of the bucket buffers they may be views of)."""
    def sink(pairs: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in pairs:
            out[name] = t.clone()
    return sink


def _runs(buckets: list[int]) -> list[tuple[int, int]]:
    """Consecutive bucket indices as [first, last] runs."""
    runs: list[tuple[int, int]] = []
    for i in sorted(buckets):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def stream_buckets(stub, header: pb.Header, manifest: pb.WeightManifest, receiver: BucketReceiver,
                   wanted: list[int], stats: FetchStats, *, max_attempts: int = 8, timeout: Optional[float] = 600.0,
                   event: Callable[..., None] = lambda what, **f: None) -> None:
    """Pull the buckets ``wanted`` over ``StreamWeights`` until each has arrived intact.

    ``max_attempts`` failures in a row without progress (a broken stream, a damaged or misplaced
    chunk) raise :class:`WeightFetchError`. A trainer whose stream slots are all taken answers
    RESOURCE_EXHAUSTED: that is no failure, and the worker asks again (backoff up to 2 s, jittered,
    so the workers of a failed broadcast round do not ask in step) until ``timeout`` seconds have
    passed in all."""
    layout = receiver.layout
    failures = busy = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while wanted:
        if failures >= max_attempts:
            raise WeightFetchError(f"weights v{manifest.version}/{manifest.dtype}: gave up after {failures} failed "
                                   f"attempts, buckets {wanted[:5]} still missing")
        first, last = _runs(wanted)[0]
        lo, hi = layout.span(first)[0], layout.span(last)[1]
        stream = stub.StreamWeights(pb.WeightRequest(header=header, version=manifest.version, dtype=manifest.dtype,
                                                     offset=lo, length=hi - lo, chunk_size=layout.bucket_bytes),
                                    timeout=timeout)
        i, progressed = first, False
        buf, got = None, 0  # bucket i as its pieces arrive
        try:
            for ch in stream:
                data = ch.data  # (each attribute read of a bytes field is a fresh copy)
                stats.bytes += len(data)
                start, stop = layout.span(i)
                if ch.version != manifest.version or ch.offset != start + got or not 0 < len(data) <= stop - start - got:
                    event("chunk out of place", offset=start + got, got_offset=ch.offset, got_version=ch.version)
                    stream.cancel()
                    failures += 1
                    break
                if buf is None:
                    buf = bytearray(stop - start)
                buf[got:got + len(data)] = data
                got += len(data)
                if got < stop - start:
                    continue  # more pieces of bucket i to come
                receiver.submit(i, torch.frombuffer(buf, dtype=torch.uint8), ch.crc32)
                buf, got = None, 0
                receiver.wait_for(i)
                if i in receiver.bad:
                    failures += 1
                    event("chunk crc mismatch: fetching it again", offset=start, bytes=len(data))
                    stream.cancel()
                    break
                wanted.remove(i)
                progressed, failures = True, 0
                i += 1
                if i > last:
                    break
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not progressed:  # every slot taken
                if deadline is not None and time.monotonic() > deadline:
                    raise WeightFetchError(f"weights v{manifest.version}/{manifest.dtype}: the trainer's weight "
                                           f"streams stayed busy for {timeout:.0f} s") from None
                busy += 1
                if busy == 1:
                    event("stream slots busy: waiting", code=exc.code().name)
                time.sleep(min(2.0, 0.05 * 2 ** min(busy, 6)) * random.uniform(0.5, 1.5))
                continue
            stats.resumes += 1
            failures += 0 if progressed else 1
            event("stream broken: resuming", offset=layout.span(i)[0] if i <= last else hi, code=exc.code().name)
            time.sleep(min(2.0, 0.05 * (2 ** failures)))


def _receive_ring(pg, ring: SharedRing, layout: Layout, part: int, bufs: list[torch.Tensor],
                  receiver: BucketReceiver, stats: FetchStats, timeout_s: float, stop) -> None:
    """Every bucket through the trainer's ring: for part p, its index over the group (a check that
    both ends are in step), its bytes copied out of slot p mod ``ring.slots`` into the bucket's
    buffer, then "copied" in a gather to the trainer (which then writes that slot again); after a
    bucket's parts, its crc32 over the group, and the bucket goes to ``receiver``. The trainer
    never rewrites a slot before every worker's "copied", so a bucket whose crc arrived was copied
    whole; a torn copy (a round given up midway) fails the crc like any damage."""
    copied: deque = deque()  # this worker's gathers on their way to the trainer
    p = 0
    for i in range(layout.buckets):
        lo, hi = layout.span(i)
        if i >= RECEIVE_DEPTH:
            receiver.wait_for(i - RECEIVE_DEPTH)  # its buffer is checked and loaded: free again
        data = bufs[i % RECEIVE_DEPTH][:hi - lo]
        for a, b in layout.parts(i, part):
            index = torch.full((1,), -1, dtype=torch.int64)
            wait(broadcast(pg, index, timeout_s), stop)
            if int(index.item()) != p:
                raise RuntimeError(f"broadcast group out of step: the trainer signals part {int(index.item())}, "
                                   f"this worker expects {p}")
            try:
                ring.copy_out(p % ring.slots, data[a - lo:b - lo])
            except RingError as exc:  # (a transport failure like any other: the rest comes over the stream)
                raise RuntimeError(f"shared-memory ring: {exc}") from exc
            copied.append(gather(pg, [], torch.zeros(1, dtype=torch.int64), timeout_s))
            while len(copied) > ring.slots:
                wait(copied.popleft(), stop)
            p += 1
        crc = torch.zeros(1, dtype=torch.int64)
        wait(broadcast(pg, crc, timeout_s), stop)
        stats.bytes += data.numel()
        stats.broadcast_bytes += data.numel()
        receiver.submit(i, data, int(crc.item()))
    while copied:
        wait(copied.popleft(), stop)


def fetch_weights(stub, header: pb.Header, version: int, dtype: str, *, sink: Optional[Sink] = None,
                  slices: bool = False, max_attempts: int = 8, timeout: Optional[float] = 600.0,
                  on_event: Optional[Callable[[str, dict], None]] = None):
    """Fetch ``version`` (-1 = latest) in ``dtype`` over the gRPC stream.

    Returns (tensors by name, FetchStats); with a ``sink`` the tensors (with ``slices``: the
    buckets' Slices) go to it bucket by bucket as they arrive and the dict is empty."""
    stats = FetchStats(dtype=dtype)
    t0 = time.perf_counter()

    def event(what: str, **fields) -> None:
        stats.events.append(what)
        if on_event:
            on_event(what, fields)

    manifest = stub.GetWeightManifest(pb.WeightRequest(header=header, version=version, dtype=dtype), timeout=timeout)
    layout = layout_of(manifest)
    stats.version, stats.total_bytes = manifest.version, manifest.total_bytes
    out: dict[str, torch.Tensor] = {}
    receiver = BucketReceiver(layout, sink or collect_into(out), stats, slices=slices and sink is not None)
    try:
        stream_buckets(stub, header, manifest, receiver, list(range(layout.buckets)), stats,
                       max_attempts=max_attempts, timeout=timeout, event=event)
        receiver.drain()
    finally:
        receiver.close()
    stats.seconds = time.perf_counter() - t0
    return out, stats


def receive_broadcast(stub, header: pb.Header, ticket: pb.BroadcastTicket, host: str, *, sink: Optional[Sink] = None,
                      slices: bool = False, timeout: Optional[float] = 600.0, on_event: Optional[Callable[[str, dict], None]] = None,
                      link: Optional[BroadcastLink] = None):
    """Receive the broadcast ``ticket`` names; buckets it loses or damages come over the stream.

    ``link``: the worker's :class:`~dcmdp_rollout.broadcast_link.BroadcastLink`, whose group and
    buffers are reused when the ticket names the group it holds, and kept for the next broadcast
    when this one completes (None: a group and buffers for this broadcast alone).
    Returns (tensors by name, FetchStats) like :func:`fetch_weights`."""
    stats = FetchStats(dtype=ticket.manifest.dtype)
    t0 = time.perf_counter()

    def event(what: str, **fields) -> None:
        stats.events.append(what)
        if on_event:
            on_event(what, fields)

    manifest = ticket.manifest
    layout = layout_of(manifest)
    stats.version, stats.total_bytes = manifest.version, manifest.total_bytes
    out: dict[str, torch.Tensor] = {}
    receiver = BucketReceiver(layout, sink or collect_into(out), stats, slices=slices and sink is not None)
    timeout_s = max(1.0, ticket.timeout_ms / 1000)
    join_s = max(1.0, ticket.join_timeout_ms / 1000) if ticket.join_timeout_ms else timeout_s
    own = link is None
    link = link or BroadcastLink()
    completed = False
    beat: Optional[Heartbeat] = None
    pg = posted = started = proved = None
    try:
        try:
            pg, stats.reused_group = link.group(ticket, host, timeout_s, join_s)
            stats.connect_seconds = time.perf_counter() - t0
            # signs of life while receiving, on the link's store connection: the trainer fails the
            # round at once if this process dies
            beat = Heartbeat(link.store, ticket.group, ticket.rank)
            size = min(layout.bucket_bytes, layout.total_bytes)
            device = "cuda" if ticket.backend == "nccl" else "cpu"  # NCCL moves device memory only
            bufs, crcs = link.buffers(RECEIVE_DEPTH, size, device)
            posted = {}

            part = ticket.part_bytes or layout.bucket_bytes

            def post(i: int) -> None:  # bucket i's receives, queued ahead of time (gloo matches ops by order)
                lo, hi = layout.span(i)
                k = i % RECEIVE_DEPTH
                data = bufs[k][:hi - lo]
                works = [broadcast(pg, data[a - lo:b - lo], timeout_s) for a, b in layout.parts(i, part)]
                posted[i] = (data, crcs[k], works + [broadcast(pg, crcs[k], timeout_s)])

            ring = link.ring(ticket)  # (None when none is offered; unmaps the rings their trainer deleted)
            if ring is None and link.ring_error:  # (said once per ring)
                event("shared-memory ring not mapped: over the group", error=link.ring_error[:200])
            proved = gather(pg, [], proof_tensor(ticket.proof, device, FLAG_RING if ring is not None else 0), join_s,
                            root=0)  # (see the trainer's check)
            start = torch.full((2,), -1, dtype=torch.int64, device=device)
            started = broadcast(pg, start, join_s)  # (version, path), sent once every proof checked out
            if ring is None:  # (the path is gloo for sure: post the receives ahead)
                for i in range(min(RECEIVE_DEPTH, layout.buckets)):
                    post(i)
            wait(proved, beat.failed)
            wait(started, beat.failed)
            if int(start[0].item()) != manifest.version:
                raise RuntimeError(f"broadcast group out of step: the trainer sends version {int(start[0].item())}, "
                                   f"the ticket names {manifest.version}")
            if int(start[1].item()) == PATH_RING:
                if ring is None:
                    raise RuntimeError("broadcast group out of step: the trainer sends through a ring this worker "
                                       "did not map")
                stats.ring = True
                _receive_ring(pg, ring, layout, part, bufs, receiver, stats, timeout_s, beat.failed)
            else:
                if ring is not None:
                    for i in range(min(RECEIVE_DEPTH, layout.buckets)):
                        post(i)
                for i in range(layout.buckets):
                    data, crc, works = posted.pop(i)
                    for w in works:
                        wait(w, beat.failed)  # (the trainer gave the round up: leave now, not at the data timeout)
                    stats.bytes += data.numel()
                    stats.broadcast_bytes += data.numel()
                    receiver.submit(i, data, int(crc.item()))
                    if i >= 1 and i - 1 + RECEIVE_DEPTH < layout.buckets:
                        receiver.wait_for(i - 1)  # bucket i-1 checked and loaded: its buffer takes bucket i-1+depth
                        post(i - 1 + RECEIVE_DEPTH)
            completed = True  # every operation of the round done: the group is in step with the trainer's
            beat.close(done=True)  # (the trainer waits for every worker's)
            receiver.drain()
        except RuntimeError as exc:  # a peer died, the trainer aborted the group, a timeout
            event("broadcast failed: fetching the rest over the stream", error=str(exc).splitlines()[0][:200])
        finally:
            if beat is not None:
                beat.close()
            # no reference to the group may outlive the link's: the last one runs gloo's teardown, which
            # after a lost peer blocks until the operations' timeout (release_group does it off this thread)
            pg = posted = started = proved = None
            if own or not completed:
                link.drop(buffers=not completed)  # (a group left mid-round is out of step: never reused)
            if own:
                link.unmap_rings()
        missing = receiver.missing()
        if missing:
            stats.refetched = len(missing)
            if receiver.bad:
                event("bucket crc mismatch: fetching it again", buckets=sorted(receiver.bad)[:8])
            stream_buckets(stub, header, manifest, receiver, missing, stats, timeout=timeout, event=event)
            receiver.drain()
    finally:
        receiver.close()
    stats.seconds = time.perf_counter() - t0
    return out, stats
