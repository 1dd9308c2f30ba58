"""The trainer's side of the collective data plane: one broadcast per (version, wire dtype) round.

A worker that needs version v in dtype d calls ``JoinBroadcast``. The first caller opens a round
for (v, d); the round gathers joiners for up to ``gather_s`` seconds (or until every worker that
``expected(d)`` counts has joined), then closes: every joiner gets the same secret group name,
its rank and the world size, and the trainer (rank 0) broadcasts the buckets over a fresh
torch.distributed group (``dcmdp.transport.collective``). A worker that asks while a round of
(v, d) is broadcasting is told to use the gRPC stream (the late joiner's fallback); one that asks
after it ended opens a new round.

Buckets are filled straight from the snapshot into two alternating buffers (the only memory a
broadcast adds to the trainer): bucket i+1 is cast while bucket i is on the wire. Each bucket is
followed by its crc32 (computed once per (version, dtype), shared with the stream). A peer that
dies or stalls fails the round after ``timeout_s``; the group is aborted so every other peer
fails at once and fetches what it lacks over the stream. The trainer goes on.

Tests damage buckets from outside (``dcmdp_testing.trainer_faults.corrupt_buckets``) to prove
workers detect and re-fetch them.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dcmdp.transport.buckets import fill
from dcmdp.transport.collective import close_group, master_store, open_group
from dcmdp_trainer.weights import Prepared, WeightPublisher


@dataclass
class Ticket:
    group: str
    rank: int
    world_size: int
    prepared: Prepared
    backend: str


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
                 timeout_s: float = 60.0, expected: Optional[Callable[[str], int]] = None,
                 on_round: Optional[Callable[[RoundResult], None]] = None):
        self.publisher = publisher
        self.host = host
        self.gather_s, self.timeout_s = gather_s, timeout_s
        self.expected = expected
        self.on_round = on_round
        self.store = master_store(host, timeout_s)
        self.port = self.store.port
        self._cond = threading.Condition()
        self._rounds: dict[tuple[int, str], Round] = {}
        self.results: list[RoundResult] = []

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
            return Ticket(r.group, rank, r.joined + 1, prep, self.backend_of(prep))

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
        pg = open_group(self.store, r.group, 0, world, timeout_s=self.timeout_s, backend=backend,
                        peer_host=self.host)
        try:
            device = "cuda" if backend == "nccl" else "cpu"
            size = min(layout.bucket_bytes, layout.total_bytes)
            bufs = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
            crcs = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(2)]
            pending: list = []
            sent = 0
            data = self._fill(prep, 0, bufs[0]) if layout.buckets else None
            for i in range(layout.buckets):
                work = [pg.broadcast(data, 0)]  # the crc (first time only) is computed while it is on the wire
                crc = self.publisher.crc(prep, i, data)
                crcs[i % 2].fill_(crc)
                work.append(pg.broadcast(crcs[i % 2], 0))
                for w in pending:  # bucket i-1 off the wire: its buffer is free for bucket i+1
                    w.wait()
                pending = work
                sent += data.numel()
                if i + 1 < layout.buckets:
                    data = self._fill(prep, i + 1, bufs[(i + 1) % 2])
            for w in pending:
                w.wait()
            return sent
        finally:
            close_group(pg)

    def _fill(self, prep: Prepared, i: int, out: torch.Tensor) -> torch.Tensor:
        return fill(prep.state, prep.layout, i, out)

    def close(self) -> None:
        self.store = None  # type: ignore[assignment]
