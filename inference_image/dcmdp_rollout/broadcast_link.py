"""The worker's end of the collective data plane, kept from one weight broadcast to the next.

A rollout worker receives every new weight version. Opening a torch.distributed group for each
one (rendezvous on the trainer's store, ``GLOO_CONNECTIONS`` TCP connections per peer) and
tearing it down after (gloo joins its I/O threads: 20-40 ms measured on loopback) costs more than
moving a 256 MiB snapshot; and bucket buffers allocated per version are page-faulted again every
time. So, as vLLM keeps its weight-update group for the life of the engine, the worker keeps its
group and its receive buffers: it tells the trainer which group it holds (``held_group`` in
``JoinBroadcast``), and the trainer reuses that group when the round has exactly the same workers
(``dcmdp_trainer.broadcast``); otherwise the ticket names a new group, and the old one is closed.

A group that failed (a peer died, a timeout, an error while receiving) is closed at once and never
used again: gloo matches operations by their order, so a group is only reusable when both ends
completed every operation of the last round.

A worker on the trainer's machine also maps the shared-memory rings its tickets offer
(``dcmdp.transport.shared_ring``), and keeps the last ``RINGS_KEPT`` mapped: the trainer reuses
its rings from round to round, and a mapping already in place costs no page faults.
"""

from __future__ import annotations

import atexit
import weakref
from collections import OrderedDict
from typing import Optional

import torch

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.transport.collective import client_store, open_group, release_group, wait_released
from dcmdp.transport.shared_ring import RingError, SharedRing, rings_enabled

__all__ = ["BroadcastLink", "RINGS_KEPT"]

RINGS_KEPT = 4  # rings kept mapped (the trainer keeps two spare, and one per round under way)


class BroadcastLink:
    """The group this worker holds open and its receive buffers (one link per worker process).

    Not thread-safe: one receive at a time (a worker loads one version at a time)."""

    def __init__(self) -> None:
        self._pg = None
        self._store = None
        self._key: Optional[tuple] = None
        self._bufs: list[torch.Tensor] = []
        self._crcs: list[torch.Tensor] = []
        self._rings: "OrderedDict[str, SharedRing]" = OrderedDict()  # mapped rings by name, most recent last
        # map the rings tickets offer (DCMDP_SHARED_MEMORY=0: never, every round then goes over gloo)
        self.shared_memory = rings_enabled()
        self.ring_error = ""  # why the ring the last ticket offered could not be mapped, the first time only
        self._unmappable: "OrderedDict[str, str]" = OrderedDict()  # rings that could not be mapped: not tried again
        _LIVE.add(self)  # closed at exit if nobody did: a gloo group torn down in finalisation aborts

    @property
    def store(self):
        """The client of the trainer's store the held group was opened with (None when none is held):
        kept with the group, so the worker's heartbeats need no connection of their own."""
        return self._store

    @property
    def held(self) -> str:
        """The name of the group held open ("" when none): what ``JoinBroadcast`` is told."""
        return self._key[0] if self._pg is not None and self._key is not None else ""

    def group(self, ticket: pb.BroadcastTicket, host: str, timeout_s: float, join_timeout_s: float):
        """(the process group ``ticket`` names, whether it was already open). Opens it (and closes
        the one held) unless it is the group held, with the same rank and size. Raises what
        :func:`~dcmdp.transport.collective.open_group` raises (a RuntimeError: the rendezvous failed)."""
        store_host = ticket.store_host or host
        key = (ticket.group, ticket.rank, ticket.world_size, ticket.backend or "gloo", store_host, ticket.store_port)
        if self._pg is not None and key == self._key:
            return self._pg, True
        self.drop()
        store = client_store(store_host, ticket.store_port, timeout_s)
        self._pg = open_group(store, ticket.group, ticket.rank, ticket.world_size, join_timeout_s=join_timeout_s,
                              backend=ticket.backend or "gloo", peer_host=store_host)
        self._store, self._key = store, key
        return self._pg, False

    def ring(self, ticket: pb.BroadcastTicket) -> Optional[SharedRing]:
        """The shared-memory ring ``ticket`` offers, mapped (or None: none offered, rings off, or it
        cannot be mapped here — another machine or container, another user; why in ``ring_error``
        the first time a ring fails, "" after: a ring that failed is not tried again)."""
        self.ring_error = ""
        for name in [n for n, r in self._rings.items() if not r.intact()]:  # deleted by their trainer: unmap
            self._rings.pop(name).close()  # (at every ticket: a ring kept mapped holds its pages in /dev/shm)
        if not ticket.ring or not self.shared_memory or (ticket.backend or "gloo") != "gloo":
            return None
        if ticket.ring in self._unmappable:
            return None
        whole = -(-ticket.manifest.total_bytes // 64) * 64
        ring = self._rings.get(ticket.ring)
        try:
            if ticket.ring_slot_bytes < min(ticket.part_bytes or whole, whole):
                raise RingError(f"ring {ticket.ring}: slots of {ticket.ring_slot_bytes} bytes cannot hold the "
                                f"ticket's parts of {ticket.part_bytes}")
            if ring is None or ring.nonce != ticket.ring_nonce or ring.slots != ticket.ring_slots \
                    or ring.slot_bytes != ticket.ring_slot_bytes:
                ring = SharedRing.attach(ticket.ring, ticket.ring_nonce, ticket.ring_slots, ticket.ring_slot_bytes)
        except RingError as exc:  # (said once: a ring that failed is not tried again)
            self.ring_error = self._unmappable[ticket.ring] = str(exc)
            while len(self._unmappable) > 16:
                self._unmappable.popitem(last=False)
            return None
        if self._rings.get(ticket.ring) is ring:
            self._rings.move_to_end(ticket.ring)
            return ring
        old = self._rings.pop(ticket.ring, None)
        if old is not None:
            old.close()
        self._rings[ticket.ring] = ring
        while len(self._rings) > RINGS_KEPT:
            self._rings.popitem(last=False)[1].close()
        return ring

    def buffers(self, count: int, size: int, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``count`` uint8 bucket buffers of at least ``size`` bytes on ``device`` and as many int64
        crc slots, kept for the next broadcast (allocated again only when too small)."""
        if (len(self._bufs) != count or self._bufs[0].numel() < size or self._bufs[0].device.type != device):
            self._bufs = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(count)]
            self._crcs = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(count)]
        return self._bufs, self._crcs

    def drop(self, buffers: bool = False) -> None:
        """Close the group held (peers blocked in it fail now); its teardown runs in a thread of
        its own (waited for by :meth:`close`). The buffers are kept unless ``buffers``: after a
        round left midway, whose abandoned receives may still write into them."""
        held = [self._pg]  # (no local name for it: the teardown thread must drop the last reference)
        self._pg, self._store, self._key = None, None, None
        if buffers:
            self._bufs, self._crcs = [], []
        if held[0] is not None:
            release_group(held)

    def close(self) -> None:
        """Drop the group and the buffers; returns once the groups it dropped are torn down."""
        self.drop()
        wait_released()
        self._bufs, self._crcs = [], []
        self.unmap_rings()

    def unmap_rings(self) -> None:
        """Unmap every ring kept mapped."""
        while self._rings:
            self._rings.popitem()[1].close()


_LIVE: "weakref.WeakSet[BroadcastLink]" = weakref.WeakSet()


@atexit.register
def _close_live_links() -> None:
    for link in list(_LIVE):
        link.close()
