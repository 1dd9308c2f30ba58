"""The trainer's side of the collective data plane: one broadcast per (version, wire dtype) round.

A worker that needs version v in dtype d calls ``JoinBroadcast``. The first caller opens a round
for (v, d); the round gathers joiners for up to ``gather_s`` seconds (or until every worker that
``expected(d)`` counts has joined), then closes: every joiner gets the same secret group name,
its rank and the world size, and the trainer (rank 0) broadcasts the buckets over a fresh
torch.distributed group (``dcmdp.transport.collective``). A worker that asks while a round of
(v, d) is broadcasting is told to use the gRPC stream (the late joiner's fallback); one that asks
after it ended opens a new round.

A bucket that lies inside one tensor already in the wire dtype goes on the wire as a view of it
(no copy); every other bucket is cast and copied straight from the snapshot into one of a pair of
bucket buffers, allocated by the first round and reused by every later one (the only memory a
broadcast adds to the trainer; a pair per round running at the same time): bucket i+1 is filled
while bucket i is on the wire. Each bucket is followed by its crc32 (computed once per (version,
dtype), shared with the stream).

Every rank must connect within ``join_timeout_s`` (default 10 s): a ticket holder that never
connects fails the rendezvous then, and the joiners that did connect fetch over the stream. Once
connected, a peer that dies or stalls fails the round after ``timeout_s``; the group is aborted so
every other peer fails at once and fetches what it lacks over the stream. The trainer goes on.

Tests damage buckets from outside (``dcmdp_testing.trainer_faults.corrupt_buckets``) to prove
workers detect and re-fetch them.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dcmdp.transport.buckets import bucket_crc, direct_range, fill_range
from dcmdp.transport.collective import broadcast, close_group, master_store, open_group
from dcmdp.transport.tensors import ALIGN
from dcmdp_trainer.weights import Prepared, WeightPublisher


def part_bytes(bucket_bytes: int) -> int:
    """The unit the trainer casts and sends: half a bucket (a multiple of 64 bytes), so its two
    buffers hold one bucket in all; the crc and the worker's loading stay per bucket."""
    half = bucket_bytes // 2
    return half if half % ALIGN == 0 and half > 0 else bucket_bytes


@dataclass
class Ticket:
    group: str
    rank: int
    world_size: int
    prepared: Prepared
    backend: str
    part_bytes: int


@dataclass
class Round:
    key: tuple[int, str]
    group: str
    prepared: Prepared
    joined: int = 0
    pools: list[str] = field(default_factory=list)  # the pool of each joiner, by rank - 1
    closed: bool = False
    opened: float = field(default_factory=time.monotonic)


@dataclass
class RoundResult:
    version: int
    dtype: str
    world_size: int
    bytes: int
    seconds: float
    error: str = ""
    pools: tuple[str, ...] = ()  # the pool of each receiving worker


class BroadcastHub:
    def __init__(self, publisher: WeightPublisher, host: str = "127.0.0.1", *, gather_s: float = 0.5,
                 timeout_s: float = 60.0, join_timeout_s: float = 10.0, expected: Optional[Callable[[str], int]] = None,
                 on_round: Optional[Callable[[RoundResult], None]] = None):
        self.publisher = publisher
        self.host = host
        self.gather_s, self.timeout_s, self.join_timeout_s = gather_s, timeout_s, join_timeout_s
        self.expected = expected
        self.on_round = on_round
        self.store = master_store(host, timeout_s)
        self.port = self.store.port
        self._cond = threading.Condition()
        self._rounds: dict[tuple[int, str], Round] = {}
        self.results: list[RoundResult] = []
        self._spare: list[list[torch.Tensor]] = []  # bucket buffer pairs no round is using

    def _take_pair(self, size: int, device: str) -> list[torch.Tensor]:
        with self._cond:
            for k, pair in enumerate(self._spare):
                if pair[0].numel() >= size and pair[0].device.type == device:
                    return self._spare.pop(k)
        return [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]

    def _give_pair(self, pair: list[torch.Tensor]) -> None:
        with self._cond:
            self._spare.append(pair)

    @staticmethod
    def backend_of(prep: Prepared) -> str:
        """nccl when the snapshot lives on a CUDA device, else gloo."""
        return "nccl" if any(t.is_cuda for t in prep.state.values()) else "gloo"

    def join(self, version: int, dtype: str, pool: str = "") -> Optional[Ticket]:
        """A ticket for the round of (version, dtype), after the round's gathering closes; None
        when a broadcast of it is already under way (stream it instead). Raises what
        :meth:`WeightPublisher.prepared` raises."""
        prep = self.publisher.prepared(version, dtype)
        key = (prep.version, dtype)
        with self._cond:
            r = self._rounds.get(key)
            if r is not None and r.closed:
                return None
            if r is None:
                r = self._rounds[key] = Round(key, secrets.token_hex(16), prep)
                threading.Thread(target=self._run, args=(r,), name=f"broadcast-v{key[0]}-{dtype}", daemon=True).start()
            r.joined += 1
            r.pools.append(pool)
            rank = r.joined
            self._cond.notify_all()
            while not r.closed:
                self._cond.wait()
            return Ticket(r.group, rank, r.joined + 1, prep, self.backend_of(prep), part_bytes(prep.layout.bucket_bytes))

    def _gathered(self, r: Round) -> bool:
        want = self.expected(r.key[1]) if self.expected else 0
        return want > 0 and r.joined >= want

    def _run(self, r: Round) -> None:
        with self._cond:
            deadline = r.opened + self.gather_s
            while not self._gathered(r) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            r.closed = True
            self._cond.notify_all()
            world = r.joined + 1
        t0, sent, error = time.perf_counter(), 0, ""
        try:
            sent = self._broadcast(r, world)
        except RuntimeError as exc:  # a peer died or stalled: it (and the others) fetch over the stream
            error = str(exc).splitlines()[0][:300]
        finally:
            with self._cond:
                self._rounds.pop(r.key, None)
        result = RoundResult(r.key[0], r.key[1], world, sent, time.perf_counter() - t0, error, tuple(r.pools))
        self.results.append(result)
        if self.on_round:
            self.on_round(result)

    def _broadcast(self, r: Round, world: int) -> int:
        prep, layout = r.prepared, r.prepared.layout
        backend = self.backend_of(prep)
        pg = open_group(self.store, r.group, 0, world, join_timeout_s=self.join_timeout_s, backend=backend,
                        peer_host=self.host)
        device = "cuda" if backend == "nccl" else "cpu"
        part = part_bytes(layout.bucket_bytes)
        bufs = self._take_pair(part, device)
        try:
            crcs = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(2)]
            inflight: deque = deque()  # (work, what it reads: ("buf", k) | ("crc", k) | None)
            sent = 0

            def free(what) -> None:  # wait until no op in flight reads ``what``
                while any(x[1] == what for x in inflight):
                    inflight.popleft()[0].wait()

            k = 0
            for i in range(layout.buckets):
                cached = prep.crcs[i] is not None
                running = 0
                for lo, hi in layout.parts(i, part):
                    slot = ("buf", k % 2)
                    free(slot)  # at most two parts in flight: the buffer the op two parts ago read is free
                    data = self._part(prep, i, lo, hi, bufs[k % 2])
                    if not cached:  # (computed once per (version, dtype), then kept)
                        running = bucket_crc(data if data.device.type == "cpu" else data.cpu(), running)
                    inflight.append((broadcast(pg, data, self.timeout_s), slot))
                    k += 1
                    sent += hi - lo
                crc = prep.crcs[i]
                if crc is None:
                    crc = prep.crcs[i] = running
                free(("crc", i % 2))
                crcs[i % 2].fill_(crc)
                inflight.append((broadcast(pg, crcs[i % 2], self.timeout_s), ("crc", i % 2)))
            while inflight:
                inflight.popleft()[0].wait()
            self._give_pair(bufs)  # (after a failure the pair is dropped: an aborted send may still read it)
            return sent
        finally:
            close_group(pg)

    def _part(self, prep: Prepared, i: int, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Stream bytes [lo, hi) of bucket ``i``: a view of their tensor when no cast or copy is
        needed, else cast and copied into ``out``."""
        view = direct_range(prep.state, prep.layout, lo, hi)
        return view if view is not None else fill_range(prep.state, prep.layout, lo, hi, out)

    def close(self) -> None:
        self.store = None  # type: ignore[assignment]
