"""The trainer's side of the collective data plane: one broadcast per (version, wire dtype) round.

A worker that needs version v in dtype d calls ``JoinBroadcast``. The first caller opens a round
for (v, d); the round gathers joiners for up to ``gather_s`` seconds (or until every worker that
``expected(d)`` counts has joined, less those in another round of (v, d) under way), then closes:
every joiner gets the same secret group name, its rank and the world size, and the trainer (rank
0) broadcasts the buckets over a torch.distributed group (``dcmdp.transport.collective``). A worker
that asks while a round of (v, d) is broadcasting (a late joiner: workers finish their leases at
different times) opens the next round, which gathers the other late joiners and broadcasts beside
the first: the gRPC stream moves a snapshot ~8x slower (0.4 GiB/s against 3.4 on loopback), so a
late joiner waits for no one and never streams a whole version. At most
``MAX_ROUNDS_PER_VERSION`` rounds of one (v, d) run at once; a joiner beyond them is told to use
the stream.

Groups are kept between rounds, as vLLM keeps its weight-update group: a group is opened for a set
of workers (by pool and worker id) the first time they broadcast together, and the next round of
exactly those workers reuses it when every one of them says it still holds it (``held_group`` in
its request) — no rendezvous, connection set-up or teardown per version. Any other round gets a
new group (new secret name): a worker that joined, left, restarted or lost its end; a joiner
without a worker id never has its group kept. A kept group that shares a worker with a newer one,
failed a round, was not used for ``keep_idle_s`` or is beyond the ``MAX_KEPT_GROUPS`` most recently
used is closed (off the caller's thread: tearing a gloo group down takes tens of milliseconds).
Every round starts with one operation carrying its version, within ``join_timeout_s``: on a kept
group, which has no rendezvous, a ticket holder that never receives fails the round then, and a
worker whose group is out of step sees a wrong version and streams.

Each bucket goes out in two halves (parts), then its crc32 (computed once per (version, dtype),
shared with the stream), by one of two paths the round's first operation names:

* **ring**, when every joiner may be on the trainer's machine (its gRPC address is a loopback or
  local one) and every one shows, in the proof gather, that it mapped the round's shared-memory
  ring (``dcmdp.transport.shared_ring``; gloo has no shared-memory transport, and a same-machine
  broadcast through sockets costs every byte two kernel copies per worker): each part is cast (or
  copied) straight from the snapshot into a slot of the ring, its index goes over the group, the
  workers copy it out and answer in a gather, and the slot is written again only after every
  answer. ``dcmdp run`` (the workers are local processes) takes this path;
* **gloo** otherwise (workers on other machines: every pod of a cluster): a part that lies inside
  one tensor already in the wire dtype goes on the wire as a view of it (no copy); every other
  part is cast and copied straight from the snapshot into one of a pair of half-bucket buffers
  (two slots of a spare ring when the hub has one), part i+1 filled while part i is on the wire.

Either way a round adds one bucket to the trainer's memory (a ring, or a pair), allocated by the
first round and reused by later ones; a round running beside it (a late joiners' round) adds one
more.

Every rank must connect within ``join_timeout_s`` (default 10 s): a ticket holder that never
connects fails the rendezvous then, and the joiners that did connect fetch over the stream. Once
connected, every worker bumps a counter in the store while it receives
(:class:`~dcmdp.transport.collective.Heartbeat`); one that stops for ``DEAD_AFTER_S`` (5 s: a
killed worker, which gloo itself notices only at the data timeout) fails the round, as does an
operation that takes over ``timeout_s``; the group is aborted so every other peer fails at once
and fetches what it lacks over the stream. The trainer goes on.

Tests damage buckets from outside (``dcmdp_testing.trainer_faults.corrupt_buckets``) to prove
workers detect and re-fetch them.
"""

from __future__ import annotations

import atexit
import re
import secrets
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dcmdp.transport.buckets import bucket_crc, direct_range, fill_range
from dcmdp.transport.collective import (DEAD_AFTER_S, FLAG_RING, PROOF_BYTES, PROOF_WORDS, WILDCARD_HOSTS, LifeWatch,
                                        broadcast, client_store, delete_group_keys, failed_key, gather,
                                        loopback_for, master_store, may_be_local, open_group, release_group,
                                        wait, wait_released)
from dcmdp.transport.shared_ring import RingError, SharedRing, rings_enabled
from dcmdp.transport.tensors import ALIGN
from dcmdp_trainer.weights import Prepared, WeightPublisher


# Parts on the wire at once: a cast part holds one of the two buffers; a part that is a view of
# the snapshot holds none, so up to this many go out back to back (4 gloo work threads serve them).
PARTS_IN_FLIGHT = 4
MAX_KEPT_GROUPS = 64  # beyond this many kept groups the least recently used is closed
# Rounds of one (version, dtype) at once: the one under way and one for the joiners late to it
# (each cast wire's round holds a pair of half-bucket buffers: two rounds, two buckets).
MAX_ROUNDS_PER_VERSION = 2
SPARE_PAIRS = 2  # bucket buffer pairs kept between rounds (one bucket each)
# How long a closed group's ``failed`` key outlives it: its workers poll it every HEARTBEAT_S.
FAILED_KEY_KEPT_S = 60.0
GROUP_KEY = re.compile(r"([0-9a-f]{32})/")  # a store key of a group (names: secrets.token_hex(16))
KEY_SWEEP_S = 10.0  # at most one sweep of closed groups' keys this often (it lists every key of the store)
CLOSED_NAMES_KEPT = 4096  # closed groups whose late keys a sweep deletes (each name kept 10 min at most)
CLOSED_NAMES_KEPT_S = 600.0
JOIN_WAIT_SLACK_S = 30.0  # a joiner waits at most the gathering time and this for its round to close
RING_SLOTS = 2  # slots of a shared-memory ring (one part each: a ring holds one bucket, as a buffer pair does)
RING_RETRY_S = 60.0  # after a ring could not be made (no /dev/shm, or full), the next try this much later
# The round's first operation carries (version, path): how the parts travel.
PATH_GLOO, PATH_RING = 0, 1
# Each operation's data timeout: the backstop for a peer that stalls while alive (a dead one is
# found within seconds by the heartbeats; gloo itself notices only at this timeout). A half-bucket
# (32 MiB by default) that takes 15 s is moving at 2 MB/s: no live peer is that slow.
DATA_TIMEOUT_S = 15.0


def ring_slot_bytes(layout) -> int:
    """The slot size of a ring for ``layout``'s rounds: a part, or the whole snapshot (64-byte
    aligned) when that is smaller (a small model's ring reserves no more shared memory than it is)."""
    whole = -(-layout.total_bytes // ALIGN) * ALIGN
    return max(ALIGN, min(part_bytes(layout.bucket_bytes), whole))


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
    proof: bytes = b""  # what this rank shows the trainer before any weight is sent (PROOF_BYTES random bytes)
    ring: Optional[SharedRing] = None  # the round's shared-memory ring, offered to workers on this machine


@dataclass(eq=False)
class Group:
    """A broadcast group of the trainer (rank 0) and ``members`` (ranks 1..n, by (pool, worker id)),
    kept open between rounds of the same workers."""
    name: str
    members: tuple[tuple[str, str], ...]
    backend: str
    pg: object = None  # the process group, once a round has rendezvoused
    busy: bool = False  # a round is broadcasting over it
    retired: bool = False  # superseded while busy: closed when its round ends
    released: bool = False  # handed to the teardown (its process group and its store keys)
    used: float = field(default_factory=time.monotonic)


@dataclass(eq=False)  # (compared by identity: two rounds of one (v, d) may run at once)
class Round:
    key: tuple[int, str]
    prepared: Prepared
    members: list[tuple[str, str]] = field(default_factory=list)  # (pool, worker id) of each joiner, in join order
    held: list[str] = field(default_factory=list)  # the group each joiner says it holds
    pools: list[str] = field(default_factory=list)  # the pool of each joiner
    addresses: list[str] = field(default_factory=list)  # each joiner's IP address as the trainer sees it ("" unknown)
    closed: bool = False
    opened: float = field(default_factory=time.monotonic)
    group: Optional[Group] = None  # set when the round closes
    done: bool = False  # its last operation completed, or it failed
    ranks: list[int] = field(default_factory=list)  # the rank of each joiner in ``group``
    proofs: list[bytes] = field(default_factory=list)  # each joiner's proof of its ticket (fresh every round)
    stopped: threading.Event = field(default_factory=threading.Event)  # given up: stop waiting for its operations
    ring: Optional[SharedRing] = None  # offered to its workers when each one may be on this machine


@dataclass
class RoundResult:
    version: int
    dtype: str
    world_size: int
    bytes: int
    seconds: float
    error: str = ""
    pools: tuple[str, ...] = ()  # the pool of each receiving worker
    path: str = ""  # how the parts went: "ring" (shared memory, every worker on this machine) | "gloo" | "" (none sent)


# Round outcomes kept for inspection (tests, the bench): a run lasts thousands of rounds.
RESULTS_KEPT = 256


class BroadcastHub:
    def __init__(self, publisher: WeightPublisher, host: str = "127.0.0.1", *, gather_s: float = 0.5,
                 timeout_s: float = DATA_TIMEOUT_S, join_timeout_s: float = 10.0, expected: Optional[Callable[[str], int]] = None,
                 on_round: Optional[Callable[[RoundResult], None]] = None, keep_idle_s: float = 600.0,
                 shared_memory: Optional[bool] = None):
        self.publisher = publisher
        # offer a shared-memory ring to rounds whose workers may all be on this machine (None: unless
        # the environment says DCMDP_SHARED_MEMORY=0)
        self.shared_memory = rings_enabled() if shared_memory is None else shared_memory
        self._spare_rings: list[SharedRing] = []
        self._ring_retry_at = 0.0
        self.ring_error = ""  # why the last ring could not be made ("" none failed)
        self.host = host
        self.gather_s, self.timeout_s, self.join_timeout_s = gather_s, timeout_s, join_timeout_s
        self.keep_idle_s = keep_idle_s
        self.expected = expected
        self.on_round = on_round
        self.store = master_store(host, timeout_s)
        self.port = self.store.port
        self._cond = threading.Condition()
        self._rounds: dict[tuple[int, str], Round] = {}  # the latest round of each (version, dtype) under way
        self._active: dict[tuple[int, str], list[Round]] = {}  # every round of each (version, dtype) under way
        self._groups: dict[frozenset[tuple[str, str]], Group] = {}  # kept groups, by their members
        self.results: deque[RoundResult] = deque(maxlen=RESULTS_KEPT)  # the latest rounds' outcomes
        self.rounds = 0  # rounds ended since the hub opened (``results`` keeps the last RESULTS_KEPT)
        self._spare: list[list[torch.Tensor]] = []  # bucket buffer pairs no round is using
        self._closed: deque[tuple[float, str]] = deque(maxlen=CLOSED_NAMES_KEPT)  # (when, name) of closed groups
        self._next_key_sweep = 0.0
        self._threads: list[threading.Thread] = []  # round threads (joined by close)
        self._closing = False  # close() has begun: no new round, and a gathering one ends without a group
        _LIVE.add(self)  # closed at exit if nobody did: a gloo group torn down in finalisation aborts

    def _take_pair(self, size: int, device: str) -> list[torch.Tensor]:
        with self._cond:
            for k, pair in enumerate(self._spare):
                if pair[0].numel() >= size and pair[0].device.type == device:
                    return self._spare.pop(k)
        return [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]

    def _take_ring(self, part: int) -> Optional[SharedRing]:
        """A shared-memory ring of ``RING_SLOTS`` slots of ``part`` bytes (:func:`ring_slot_bytes`): a spare one, or a new one
        (outside the lock: sizing it writes its pages); None when none can be made (retried
        ``RING_RETRY_S`` later; the reason in ``ring_error``)."""
        ring = self._pop_spare_ring(lambda x: x.slot_bytes == part)
        if ring is not None:
            return ring
        with self._cond:
            if time.monotonic() < self._ring_retry_at:
                return None
        try:
            return SharedRing.create(RING_SLOTS, part)
        except Exception as exc:  # noqa: BLE001 - a RingError, or anything else /dev/shm throws: no ring, gloo
            with self._cond:
                self.ring_error = str(exc) if isinstance(exc, RingError) else f"{type(exc).__name__}: {exc}"
                self._ring_retry_at = time.monotonic() + RING_RETRY_S
            return None

    def _take_spare_ring(self, part: int) -> Optional[SharedRing]:
        """A spare ring of ``RING_SLOTS`` >= 2 slots of at least ``part`` bytes, or None: a gloo
        round on a machine that has one casts into two of its slots instead of a pair of its own."""
        return self._pop_spare_ring(lambda x: x.slot_bytes >= part and x.slots >= 2)

    def _pop_spare_ring(self, fits: Callable[[SharedRing], bool]) -> Optional[SharedRing]:
        with self._cond:
            for k, ring in enumerate(self._spare_rings):
                if fits(ring):
                    return self._spare_rings.pop(k)
        return None

    def _give_ring(self, ring: Optional[SharedRing]) -> None:
        """Keep ``ring`` for a later round (up to ``SPARE_PAIRS``; no gloo operation reads it, so a
        failed round's ring is as good as any), else close it: also when its name no longer leads
        to it (deleted from ``/dev/shm`` by hand or by a cleaner: no worker could map it)."""
        if ring is None:
            return
        with self._cond:
            if not self._closing and len(self._spare_rings) < SPARE_PAIRS and ring.intact():
                self._spare_rings.append(ring)
                return
        ring.close()

    def _give_pair(self, pair: list[torch.Tensor]) -> None:
        """Keep ``pair`` for a later round, unless ``SPARE_PAIRS`` are kept already (rounds that ran at
        the same time, a late joiner's beside the first, leave no more than that behind)."""
        with self._cond:
            if len(self._spare) < SPARE_PAIRS:
                self._spare.append(pair)

    @staticmethod
    def backend_of(prep: Prepared) -> str:
        """nccl when the snapshot lives on a CUDA device, else gloo."""
        return "nccl" if any(t.is_cuda for t in prep.state.values()) else "gloo"

    def join(self, version: int, dtype: str, pool: str = "", worker: str = "", held: str = "",
             address: str = "") -> Optional[Ticket]:
        """A ticket for the round of (version, dtype) now gathering, after its gathering closes; None
        when ``MAX_ROUNDS_PER_VERSION`` rounds of it are under way (stream it instead). ``worker``: the joiner's
        id within ``pool`` (without one, its group is never kept); ``held``: the group the joiner
        still holds open from an earlier round; ``address``: the joiner's IP address as the trainer
        sees it (its gRPC peer), which tells a trainer listening on every interface which of its
        addresses the joiners reach. Raises what :meth:`WeightPublisher.prepared` raises."""
        prep = self.publisher.prepared(version, dtype)
        key = (prep.version, dtype)
        member = (pool, worker) if worker else ("", "")  # anonymous: its rounds' groups are never kept
        with self._cond:
            if self._closing:
                return None
            r = self._rounds.get(key)
            if r is None or r.closed:  # none under way, or it is broadcasting: the next round of (v, d)
                if len(self._active.get(key, ())) >= MAX_ROUNDS_PER_VERSION:
                    return None
                r = self._rounds[key] = Round(key, prep)
                self._active.setdefault(key, []).append(r)
                threading.Thread(target=self._run, args=(r, address), name=f"broadcast-v{key[0]}-{dtype}",
                                 daemon=True).start()
            k = len(r.members)
            r.members.append(member)
            r.held.append(held)
            r.pools.append(pool)
            r.addresses.append(address)
            self._cond.notify_all()
            # (a round closes within its gathering time and the 1 s it may wait for the same workers'
            # previous round; the bound is a backstop: a joiner never waits for ever)
            deadline = time.monotonic() + self.gather_s + JOIN_WAIT_SLACK_S
            while not r.closed and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if not r.closed or r.group is None:  # the round could not get a group: stream
                return None
            return Ticket(r.group.name, r.ranks[k], len(r.members) + 1, prep, r.group.backend,
                          part_bytes(prep.layout.bucket_bytes), r.proofs[k], r.ring)

    def _gathered(self, r: Round) -> bool:
        """Every expected worker of the dtype has joined ``r`` or another round of its (v, d) under
        way (under the lock). Nothing expected (no count): only the gathering time closes it."""
        want = self.expected(r.key[1]) if self.expected else 0
        if want <= 0:
            return False
        elsewhere = sum(len(x.members) for x in self._active.get(r.key, ()) if x is not r)
        return len(r.members) >= max(1, want - elsewhere)

    def _group_for(self, r: Round) -> tuple[Group, list[int]]:
        """(the group of a closing round, each joiner's rank in it): the kept group of exactly these
        workers when every one of them holds it and no round is using it, else a new one (under
        the lock)."""
        backend = self.backend_of(r.prepared)
        members = frozenset(r.members)
        now = time.monotonic()
        g = self._groups.get(members)
        if (g is not None and not g.busy and g.pg is not None and g.backend == backend
                and len(members) == len(r.members) and all(h == g.name for h in r.held)):
            g.busy, g.used = True, now
            self._sweep(now)
            return g, [g.members.index(m) + 1 for m in r.members]
        new = Group(secrets.token_hex(16), tuple(r.members), backend, busy=True)
        for k, old in list(self._groups.items()):  # its workers now hold the new group
            if k & members:
                del self._groups[k]
                self._retire(old)
        if len(members) == len(r.members) and ("", "") not in members:  # (a worker id twice, or none: not kept)
            self._groups[members] = new
        else:
            new.retired = True  # closed when its round ends
        self._sweep(now)
        return new, list(range(1, len(r.members) + 1))

    def _sweep(self, now: float) -> None:
        """Close kept groups idle for ``keep_idle_s`` and, beyond ``MAX_KEPT_GROUPS``, the least
        recently used (under the lock): the groups of workers that left."""
        idle = sorted(((g.used, k) for k, g in self._groups.items() if not g.busy), key=lambda x: x[0])
        excess = len(self._groups) - MAX_KEPT_GROUPS
        for n, (used, k) in enumerate(idle):
            if now - used > self.keep_idle_s or n < excess:
                self._retire(self._groups.pop(k))

    def _sweep_closed_keys(self, now: Optional[float] = None) -> None:
        """Delete every store key of the groups closed between ``FAILED_KEY_KEPT_S`` and
        ``CLOSED_NAMES_KEPT_S`` ago (their ``failed`` key, which their workers no longer need, and
        what a ticket holder that rendezvoused after its round was given up wrote under the closed
        name, which nothing else would ever delete). At most once per ``KEY_SWEEP_S``, outside the
        lock (it lists every key of the store), and only keys of groups this hub closed."""
        now = time.monotonic() if now is None else now
        with self._cond:
            if now < self._next_key_sweep or self.store is None:
                return
            self._next_key_sweep = now + KEY_SWEEP_S
            while self._closed and now - self._closed[0][0] > CLOSED_NAMES_KEPT_S:
                self._closed.popleft()
            names = {name for t, name in self._closed if now - t > FAILED_KEY_KEPT_S}
            store = self.store
        if not names:
            return
        try:
            for key in store.list_keys():
                m = GROUP_KEY.match(key)
                if m and m.group(1) in names:
                    store.delete_key(key)
        except Exception:  # noqa: BLE001 - best effort: the store may be closing
            pass

    def _retire(self, g: Group) -> None:
        """Close ``g`` now, or when the round using it ends (under the lock)."""
        if g.busy or g.released:
            g.retired = True
            return
        g.retired, g.released = True, True
        held = [g.pg]  # (no local name for it: the teardown thread must drop the last reference)
        g.pg = None
        # and the store keeps no key of it, a failed rendezvous's too; but its ``failed`` key, which
        # workers of a round given up may not have read yet, until a sweep FAILED_KEY_KEPT_S later
        store, name = self.store, g.name
        release_group(held, then=lambda: delete_group_keys(store, name, keep=(failed_key(name),)))
        self._closed.append((time.monotonic(), name))

    def _offers_ring(self, r: Round, address: str) -> bool:
        """Whether a round whose first joiner came from ``address`` gets a shared-memory ring: gloo
        (NCCL has shared-memory transports of its own), rings on, and that joiner possibly on this
        machine."""
        return self.shared_memory and self.backend_of(r.prepared) == "gloo" and may_be_local(address)

    def _run(self, r: Round, address: str = "") -> None:
        # the ring before gathering, outside the lock (a new one writes its pages: ~10 ms for 64 MiB)
        ring = None
        try:
            if self._offers_ring(r, address):
                ring = self._take_ring(ring_slot_bytes(r.prepared.layout))
            world = self._close_gathering(r, ring)
        except BaseException:
            with self._cond:  # whatever failed, the round ends: its joiners stream, the next joiner opens a new one
                if not r.closed:
                    self._forget(r)
                    r.closed = True
                    self._cond.notify_all()
            raise
        finally:
            if r.ring is None:
                self._give_ring(ring)  # not offered (a joiner from another machine, or no broadcast)
        if world is None:
            return
        t0, sent, error, path = time.perf_counter(), 0, "", [""]
        try:
            sent = self._broadcast(r, world, path)
        except RuntimeError as exc:  # a peer died or stalled: it (and the others) fetch over the stream
            error = str(exc).splitlines()[0].replace(r.group.name, "<group>")[:300]  # (no store key in logs)
        finally:
            self._release_ring(r)  # (after a success: already given back)
            self._end(r, ok=False)  # (after a success: already ended, nothing to do)
        result = RoundResult(r.key[0], r.key[1], world, sent, time.perf_counter() - t0, error, tuple(r.pools), path[0])
        self._sweep_closed_keys()
        with self._cond:
            self.results.append(result)
            self.rounds += 1
        if self.on_round:
            self.on_round(result)

    def _release_ring(self, r: Round) -> None:
        ring, r.ring = r.ring, None
        self._give_ring(ring)

    def _close_gathering(self, r: Round, ring: Optional[SharedRing]) -> Optional[int]:
        """Gather ``r``'s joiners, then close it: its group, ranks, proofs and (when every joiner
        may be on this machine) ``ring``; returns the world size, or None when the hub is closing
        (the joiners get no group, and stream)."""
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()] + [threading.current_thread()]
            deadline = r.opened + self.gather_s
            while not self._closing and not self._gathered(r) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            kept = self._groups.get(frozenset(r.members))
            until = time.monotonic() + 1.0  # the same workers' previous round may be finishing
            while not self._closing and kept is not None and kept.busy and (left := until - time.monotonic()) > 0:
                self._cond.wait(left)
                kept = self._groups.get(frozenset(r.members))
            if self._closing:  # no broadcast: its joiners get no group, and stream
                self._forget(r)
                r.closed = True
                self._cond.notify_all()
                return None
            try:
                r.group, r.ranks = self._group_for(r)
                r.proofs = [secrets.token_bytes(PROOF_BYTES) for _ in r.members]
                if ring is not None and all(may_be_local(a) for a in r.addresses):
                    r.ring = ring
            except Exception:  # noqa: BLE001 - never leave the joiners waiting: they stream instead
                self._forget(r)
                raise
            finally:
                r.closed = True
                self._cond.notify_all()
            return len(r.members) + 1

    def _end(self, r: Round, ok: bool) -> None:
        """The round is over: a new one of its (version, dtype) may open, its group may be reused
        (``ok``) or is closed. Idempotent."""
        with self._cond:
            if r.done:
                return
            r.done = True
            self._forget(r)
            g = r.group
            assert g is not None
            g.busy, g.used = False, time.monotonic()
            if not ok:  # out of step with its peers, or broken: never used again
                if self._groups.get(frozenset(g.members)) is g:
                    del self._groups[frozenset(g.members)]
                g.retired = True
            if g.retired:
                self._retire(g)
            self._cond.notify_all()

    def gloo_peer(self, r: Round) -> str:
        """The host whose route picks the trainer's gloo address for ``r``'s new group: the hub's own
        host, or, when that is a wildcard (``--host 0.0.0.0``, the trainer's default: the route
        to it is loopback, and workers on other machines then could not connect), the first
        joiner's address (the trainer's address on the way to its workers)."""
        if self.host not in WILDCARD_HOSTS:
            return self.host
        return next((a for a in r.addresses if a), loopback_for(self.host))

    def _forget(self, r: Round) -> None:
        """``r`` is no longer under way (under the lock)."""
        if self._rounds.get(r.key) is r:
            del self._rounds[r.key]
        active = self._active.get(r.key, [])
        if r in active:
            active.remove(r)
        if not active:
            self._active.pop(r.key, None)

    def kept_groups(self) -> int:
        """Groups kept open for their workers' next round."""
        with self._cond:
            return sum(g.pg is not None for g in self._groups.values())

    def _broadcast(self, r: Round, world: int, path: list[str]) -> int:
        """Run round ``r`` over its group (opened now unless kept): the proofs, the version and the
        path (ring when it was offered and every worker mapped it, else gloo), the buckets; then
        wait for every worker's "done". Sets ``path[0]``; returns the bytes sent."""
        prep, g = r.prepared, r.group
        backend = g.backend
        if g.pg is None:
            try:
                # on a store connection of its own: a client serves one operation at a time, and a
                # rendezvous blocks in it until every rank has connected (up to the join timeout),
                # which on the hub's connection held up every other round's rendezvous, life watch
                # and key cleanup
                g.pg = open_group(client_store(loopback_for(self.host), self.port, self.join_timeout_s), g.name, 0,
                                  world, join_timeout_s=self.join_timeout_s, backend=backend,
                                  peer_host=self.gloo_peer(r))
            except RuntimeError:
                g.retired = True  # a rendezvous that failed: never kept
                raise
        pg = g.pg
        device = "cuda" if backend == "nccl" else "cpu"
        dead: list[int] = []
        stopped = r.stopped

        def gone(rank: int) -> None:  # a worker stopped beating: fail the round now, not at the data timeout
            with self._cond:
                if r.done:  # (its last operation completed meanwhile)
                    return
                dead.append(rank)
            watch.give_up()  # the other workers stop waiting too
            stopped.set()  # (the group is aborted when the round ends, off this thread: gloo's abort blocks)

        watch = LifeWatch(self.store, g.name, world, gone)
        try:
            # Every rank shows the proof its ticket carries (a gather to the trainer) before any weight
            # is sent: the store lists its keys to anyone, group names included, so a peer without the
            # token can take a rank; it cannot show a proof, and the round fails with nothing sent.
            # Its flags say whether it mapped the round's ring.
            expected = {rank: proof for rank, proof in zip(r.ranks, r.proofs)}
            shown = [torch.zeros(PROOF_WORDS, dtype=torch.int64, device=device) for _ in range(world)]
            wait(gather(pg, [shown], torch.zeros(PROOF_WORDS, dtype=torch.int64, device=device),
                        self.join_timeout_s), stopped)
            shown = [t.cpu() for t in shown]
            impostors = [rank for rank in range(1, world)
                         if shown[rank][:PROOF_BYTES // 8].numpy().tobytes() != expected.get(rank, b"")]
            if impostors:
                raise RuntimeError(f"rank(s) {impostors} of the group did not show their ticket's proof (a peer "
                                   "without the run token took their place): nothing was sent")
            ring = r.ring if r.ring is not None and all(int(shown[k][-1]) & FLAG_RING for k in range(1, world)) else None
            path[0] = "ring" if ring is not None else "gloo"
            # The round's first operation: its version and path, within the join timeout. Every rank
            # must post it (a kept group has no rendezvous to fail instead), and a worker checks the
            # version: a group out of step with the trainer fails here, before any bucket.
            start = torch.tensor([prep.version, PATH_RING if ring is not None else PATH_GLOO], dtype=torch.int64,
                                 device=device)
            wait(broadcast(pg, start, self.join_timeout_s), stopped)
            if ring is not None:
                sent = self._send_ring(r, pg, world, ring)
                self._release_ring(r)
            else:
                sent = self._send_gloo(r, pg, device)
            watch.wait_done(stopped, self.timeout_s)  # every worker received it all (one may relay to another)
            self._end(r, ok=not dead)  # at once: a worker done receiving may already ask for the next version
            return sent
        except RuntimeError as exc:
            watch.give_up()  # every peer stops waiting now, not at its timeout (the abort follows in _end)
            if dead:
                pool, worker = g.members[dead[0] - 1]
                raise RuntimeError(f"worker {worker or '?'} of pool {pool or '?'} (rank {dead[0]}) stopped: no sign of "
                                   f"life for {DEAD_AFTER_S:.0f} s ({str(exc).splitlines()[0][:200]})") from exc
            raise
        finally:
            watch.close()

    def _send_gloo(self, r: Round, pg, device: str) -> int:
        """Every bucket over the group: its parts (views of the snapshot, or cast into the round's
        pair of buffers while the other is on the wire), then its crc32. Returns the bytes sent."""
        prep, layout, stopped = r.prepared, r.prepared.layout, r.stopped
        part = part_bytes(layout.bucket_bytes)
        bufs: list[torch.Tensor] = []  # the round's pair of buffers, taken at its first cast part (none
        # for a round of views only: on a GPU trainer they would be device memory)
        borrowed: list[SharedRing] = []  # a spare ring whose two slots are the pair (no second bucket of memory)
        crcs = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(2)]
        inflight: deque = deque()  # (work, what it reads: ("buf", k) | ("crc", k) | None)
        sent = 0

        def free(what) -> None:  # wait until no op in flight reads ``what``
            while any(x[1] == what for x in inflight):
                wait(inflight.popleft()[0], stopped)

        k = 0

        def buffer() -> torch.Tensor:  # the next cast part's buffer, once the op two cast parts ago is done with it
            if not bufs:
                # (a crc is computed only from memory no other process can write: a spare ring's
                # slots serve as the pair only once the version's crcs are known)
                cached = all(c is not None for c in prep.crcs)
                ring = self._take_spare_ring(ring_slot_bytes(layout)) if device == "cpu" and cached else None
                if ring is not None:
                    borrowed.append(ring)
                    bufs.extend(ring.slot(j, ring_slot_bytes(layout)) for j in range(2))
                else:
                    bufs.extend(self._take_pair(part, device))
            free(("buf", k % 2))
            return bufs[k % 2]

        try:
            for i in range(layout.buckets):
                cached = prep.crcs[i] is not None
                running = 0
                for lo, hi in layout.parts(i, part):
                    while len(inflight) >= PARTS_IN_FLIGHT:
                        wait(inflight.popleft()[0], stopped)
                    data = self._part(prep, i, lo, hi, buffer)
                    slot = None  # a view of the snapshot: no buffer to hold
                    if bufs and data.untyped_storage().data_ptr() == bufs[k % 2].untyped_storage().data_ptr():
                        slot, k = ("buf", k % 2), k + 1  # cast into the buffer: the next cast part takes the other one
                    if not cached:  # (computed once per (version, dtype), then kept)
                        running = bucket_crc(data if data.device.type == "cpu" else data.cpu(), running)
                    inflight.append((broadcast(pg, data, self.timeout_s), slot))
                    sent += hi - lo
                crc = prep.crcs[i]
                if crc is None:
                    crc = prep.crcs[i] = running
                free(("crc", i % 2))
                crcs[i % 2].fill_(crc)
                inflight.append((broadcast(pg, crcs[i % 2], self.timeout_s), ("crc", i % 2)))
            while inflight:
                wait(inflight.popleft()[0], stopped)
        except BaseException:
            for ring in borrowed:  # (its name goes now; its mapping while an aborted send holds a slot)
                ring.close()
            raise
        if borrowed:
            bufs.clear()
            self._give_ring(borrowed[0])
        elif bufs:
            self._give_pair(bufs)
        # (after a failure the pair is dropped, and a borrowed ring closed: an aborted send may still
        # read them; a closed ring stays mapped while a tensor of it lives)
        return sent

    def _send_ring(self, r: Round, pg, world: int, ring: SharedRing) -> int:
        """Every bucket through ``ring``: part p is cast (or copied) into slot p mod ``ring.slots``
        once every worker has said, in the gather of part p - slots, that it copied that part out;
        then the part's index goes over the group (the workers copy it out and answer in a gather),
        and after its parts the bucket's crc32. A crc not yet known (a version's first round) is
        computed from private memory — the snapshot's view, or the part cast into a private
        half-bucket buffer, then copied into the slot — never from the ring, which other processes
        of the user could write. Returns the bytes sent."""
        prep, layout, stopped = r.prepared, r.prepared.layout, r.stopped
        part = part_bytes(layout.bucket_bytes)
        private: list[torch.Tensor] = []  # the first round's private half-bucket buffer, made when needed
        copied: deque = deque()  # each part's gather of the workers' "copied out", oldest first
        signals: deque = deque()  # the parts' indices and the buckets' crcs on their way
        sent = p = 0

        def private_buffer() -> torch.Tensor:
            if not private:
                private.append(torch.empty(part, dtype=torch.uint8))
            return private[0]

        def signal(value: int) -> None:
            signals.append(broadcast(pg, torch.full((1,), value, dtype=torch.int64), self.timeout_s))
            while len(signals) > 2 * ring.slots:
                wait(signals.popleft(), stopped)

        for i in range(layout.buckets):
            cached = prep.crcs[i] is not None
            running = 0
            for lo, hi in layout.parts(i, part):
                if len(copied) >= ring.slots:
                    wait(copied.popleft(), stopped)  # slot p mod slots: every worker is done with it
                slot = ring.slot(p % ring.slots, hi - lo)
                if cached:  # cast straight into the slot
                    data = self._part(prep, i, lo, hi, lambda: slot)
                else:  # (computed once per (version, dtype), then kept)
                    data = self._part(prep, i, lo, hi, private_buffer)
                    running = bucket_crc(data, running)
                if data.data_ptr() != slot.data_ptr():  # a view of the snapshot, or the private buffer
                    slot.copy_(data)
                signal(p)
                copied.append(gather(pg, [[torch.zeros(1, dtype=torch.int64) for _ in range(world)]],
                                     torch.zeros(1, dtype=torch.int64), self.timeout_s))
                sent += hi - lo
                p += 1
            crc = prep.crcs[i]
            if crc is None:
                crc = prep.crcs[i] = running
            signal(crc)
        for work in (*signals, *copied):
            wait(work, stopped)
        return sent

    def _part(self, prep: Prepared, i: int, lo: int, hi: int, buffer: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Stream bytes [lo, hi) of bucket ``i``: a view of their tensor when no cast or copy is
        needed, else cast and copied into ``buffer()`` (uint8, at least ``hi - lo`` long; asked
        for only then)."""
        view = direct_range(prep.state, prep.layout, lo, hi)
        return view if view is not None else fill_range(prep.state, prep.layout, lo, hi, buffer())

    def close(self, timeout_s: float = 10.0) -> None:
        """Close every kept group; abort the rounds under way and end those gathering (their peers
        stream; no round opens after this) and wait up to ``timeout_s`` in all for their threads;
        returns once the groups are torn down (which, for a group whose peer stopped receiving
        while alive, gloo makes last up to the data timeout: ``close`` can take that much longer)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()  # a round still gathering ends now, with no group
            for r in [x for rounds in self._active.values() for x in rounds]:  # each stops waiting, and so do its workers
                if r.group is not None:
                    r.stopped.set()
                    try:
                        self.store.set(failed_key(r.group.name), "1")
                    except Exception:  # noqa: BLE001 - best effort: its workers then wait for their timeout
                        pass
            threads = [t for t in self._threads if t is not threading.current_thread()]
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            for k, g in list(self._groups.items()):
                del self._groups[k]
                self._retire(g)
            rings, self._spare_rings = self._spare_rings, []
        for ring in rings:  # (a round still running closes its own when it gives it back)
            ring.close()
        wait_released()
        self.store = None  # type: ignore[assignment]


_LIVE: "weakref.WeakSet[BroadcastHub]" = weakref.WeakSet()


@atexit.register
def _close_live_hubs() -> None:
    for hub in list(_LIVE):
        hub.close()
