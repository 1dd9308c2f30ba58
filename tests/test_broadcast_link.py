"""The worker's BroadcastLink against a real TCPStore and real gloo groups: a group reused for the
ticket naming it (no second rendezvous), replaced for any other, buffers kept, teardown joined."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.transport.collective import broadcast, close_group, master_store, open_group, wait_released
from dcmdp_rollout.broadcast_link import BroadcastLink
from slow_group import SlowToDestroy


@pytest.fixture
def store():
    return master_store("127.0.0.1", 10.0)


def trainer_side(store, name: str, world: int = 2) -> dict:
    """Open the trainer's end (rank 0) of group ``name`` in a thread; ``out["pg"]`` once joined."""
    out: dict = {}

    def run():
        out["pg"] = open_group(store, name, 0, world, join_timeout_s=10.0)

    out["thread"] = threading.Thread(target=run)
    out["thread"].start()
    return out


def ticket(store, name: str, rank: int = 1, world: int = 2) -> pb.BroadcastTicket:
    return pb.BroadcastTicket(group=name, store_host="127.0.0.1", store_port=store.port, rank=rank, world_size=world,
                              backend="gloo")


def send_and_receive(trainer_pg, worker_pg, value: int) -> torch.Tensor:
    got = torch.zeros(1024, dtype=torch.int32)
    recv = broadcast(worker_pg, got, 10.0)
    broadcast(trainer_pg, torch.full((1024,), value, dtype=torch.int32), 10.0).wait()
    recv.wait()
    return got


def test_the_held_group_is_reused_for_its_ticket_without_a_rendezvous(store):
    link = BroadcastLink()
    trainer = trainer_side(store, "g1")
    try:
        pg, reused = link.group(ticket(store, "g1"), "127.0.0.1", 10.0, 10.0)
        trainer["thread"].join(10)
        assert not reused and link.held == "g1"
        assert torch.equal(send_and_receive(trainer["pg"], pg, 7), torch.full((1024,), 7, dtype=torch.int32))
        t0 = time.monotonic()
        again, reused = link.group(ticket(store, "g1"), "127.0.0.1", 10.0, 1.0)
        assert reused and again is pg and time.monotonic() - t0 < 0.5  # no rendezvous: the trainer did none
        assert torch.equal(send_and_receive(trainer["pg"], again, 9), torch.full((1024,), 9, dtype=torch.int32))
    finally:
        link.close()
        close_group(trainer["pg"])
    assert link.held == ""


def test_another_ticket_closes_the_held_group_and_opens_its_own(store):
    link = BroadcastLink()
    first, second = trainer_side(store, "g1"), None
    try:
        link.group(ticket(store, "g1"), "127.0.0.1", 10.0, 10.0)
        first["thread"].join(10)
        second = trainer_side(store, "g2")
        pg, reused = link.group(ticket(store, "g2"), "127.0.0.1", 10.0, 10.0)
        second["thread"].join(10)
        assert not reused and link.held == "g2"
        assert torch.equal(send_and_receive(second["pg"], pg, 3), torch.full((1024,), 3, dtype=torch.int32))
        with pytest.raises(RuntimeError):  # the old group was closed at the worker's end: the trainer's op fails
            broadcast(first["pg"], torch.ones(1 << 20, dtype=torch.uint8), 5.0).wait()
    finally:
        link.close()
        for side in (first, second):
            if side is not None and "pg" in side:
                close_group(side["pg"])


def test_a_different_rank_or_size_is_a_different_group(store):
    link = BroadcastLink()
    a = trainer_side(store, "g", world=2)
    try:
        link.group(ticket(store, "g"), "127.0.0.1", 10.0, 10.0)
        a["thread"].join(10)
        with pytest.raises(RuntimeError):  # same name, other size: a new rendezvous, which nobody joins
            link.group(ticket(store, "g", rank=2, world=3), "127.0.0.1", 10.0, 1.0)
        assert link.held == ""  # the old one was dropped before the new one was tried
    finally:
        link.close()
        close_group(a["pg"])


def test_buffers_are_kept_until_too_small():
    link = BroadcastLink()
    bufs, crcs = link.buffers(4, 1 << 20, "cpu")
    assert len(bufs) == len(crcs) == 4 and all(b.numel() == 1 << 20 and b.dtype == torch.uint8 for b in bufs)
    again, _ = link.buffers(4, 1000, "cpu")
    assert all(x is y for x, y in zip(bufs, again))  # smaller asks reuse them (callers slice)
    bigger, _ = link.buffers(4, 2 << 20, "cpu")
    assert bigger[0].numel() == 2 << 20
    link.close()
    fresh, _ = link.buffers(4, 1000, "cpu")
    assert fresh[0].numel() == 1000  # close() let them go



def test_dropping_a_group_never_runs_its_destructor_on_the_callers_thread():
    """The worker's receive path drops a group after a failed round and goes on to fetch over the
    stream: it must not wait there for the teardown. (A local reference in ``drop`` had made the
    caller's thread the last holder whenever the teardown thread finished first: under load the
    survivors of a killed peer waited the 60 s data timeout.)"""
    SlowToDestroy.destroyed_in.clear()
    link = BroadcastLink()
    link._pg = SlowToDestroy()
    t0 = time.perf_counter()
    link.drop()
    assert time.perf_counter() - t0 < 0.5
    wait_released()
    assert SlowToDestroy.destroyed_in == ["dcmdp-group-release"]
