"""The collective data plane against a real trainer server and real gloo groups: workers that join
a broadcast, a late joiner in a round of its own (and one beyond the limit on the stream), a damaged bucket re-fetched, a worker killed mid-broadcast,
a peer without the token, and a cast that overflows."""

from __future__ import annotations

import dataclasses
import mmap
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.proto import dcmdp_pb2_grpc
from dcmdp.transport.buckets import Layout, WeightCastError, fill, loopback
from dcmdp.transport.channel import open_channel
from dcmdp.transport.collective import (PROOF_WORDS, broadcast, client_store, gather, open_group, release_group,
                                        wait, wait_released)
from dcmdp.transport.shared_ring import SHM_DIR
from dcmdp_rollout.broadcast_link import BroadcastLink
from dcmdp_rollout.weights import LoadError, fetch_weights, receive_broadcast
from dcmdp_testing.trainer_faults import corrupt_buckets
from dcmdp_trainer.broadcast import BroadcastHub, Group, ring_slot_bytes
from dcmdp_trainer.coordinator import Coordinator
from dcmdp_trainer.server import start_server
from dcmdp_trainer.session import Session
from dcmdp_trainer.weights import WeightPublisher
from runtime_helpers import tiny_run
from slow_group import SlowToDestroy

TOKEN = "s3cret-run-token"
BUCKET = 16 << 10


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp_path_factory.mktemp("run"), threads=1)
    yield s
    s.metrics.close()


class Served:
    def __init__(self, session: Session, expected: int = 0, gather_s: float = 5.0, timeout_s: float = 10.0,
                 bucket: int = BUCKET, extra_mib: int = 0, join_timeout_s: float = 10.0, shared_memory: bool = True):
        self.publisher = WeightPublisher(keep=2, skip=("lm_head.weight",), bucket_bytes=bucket)
        weights = dict(session.weights(0))
        self.session_weights = dict(weights)
        if extra_mib:  # more bytes than socket buffers hold: a broadcast that cannot finish before a peer dies
            weights["extra.weight"] = torch.randn(extra_mib << 18, generator=torch.Generator().manual_seed(1))
        self.publisher.publish(0, weights)
        self.hub = BroadcastHub(self.publisher, "127.0.0.1", gather_s=gather_s, timeout_s=timeout_s,
                                join_timeout_s=join_timeout_s, expected=lambda dtype: expected,
                                shared_memory=shared_memory)
        self.server, self.port = start_server(Coordinator(session, self.publisher), self.publisher, TOKEN, hub=self.hub)
        self.want = loopback(weights, "bf16", skip=("lm_head.weight",))  # what the in-process runner loads

    def stub(self, token: str = TOKEN):
        return dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{self.port}", token))

    def join(self, worker: str, stub=None, held: str = "") -> pb.BroadcastTicket:
        return (stub or self.stub()).JoinBroadcast(
            pb.WeightRequest(header=pb.Header(pool="bf16", worker_id=worker), version=0, dtype="bf16", held_group=held),
            timeout=30)

    def receive(self, worker: str, ticket: pb.BroadcastTicket, link: BroadcastLink | None = None):
        return receive_broadcast(self.stub(), pb.Header(pool="bf16", worker_id=worker), ticket, "127.0.0.1",
                                 link=link)

    def check(self, tensors) -> None:
        assert set(tensors) == set(self.want)
        for k, t in self.want.items():
            assert torch.equal(tensors[k], t), k

    def wait_round(self, n: int = 1):
        deadline = time.monotonic() + 30
        while self.hub.rounds < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.hub.results[n - 1]

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def served(session, request):
    s = Served(session, **getattr(request, "param", {}))
    yield s
    s.stop()


def in_thread(fn, *args):
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def keys_of(hub: BroadcastHub, group: str) -> list[str]:
    """The keys of ``group`` in the trainer's store."""
    return [k for k in hub.store.list_keys() if k.startswith(group)]


def joined_and_received(served: Served, worker: str):
    return served.receive(worker, served.join(worker))


def all_received(served: Served, runs, timeout_s: float) -> list:
    """Join the receiving threads ``runs`` (from :func:`in_thread`), check every worker got the
    snapshot; each one's FetchStats."""
    out = []
    for t, result in runs:
        t.join(timeout_s)
        assert "error" not in result, result.get("error")
        tensors, stats = result["value"]
        served.check(tensors)
        out.append(stats)
    return out


RING_AND_GLOO = [pytest.param(True, id="ring"), pytest.param(False, id="gloo")]  # a hub's shared_memory


@pytest.mark.parametrize("served", [{"expected": 2, "shared_memory": True}, {"expected": 2, "shared_memory": False}],
                         indirect=True, ids=["ring", "gloo"])
def test_two_workers_receive_one_broadcast(served):
    runs = [in_thread(joined_and_received, served, f"w{i}") for i in range(2)]
    ring = served.hub.shared_memory  # (workers on the trainer's machine: through the ring when it offers one)
    for stats in all_received(served, runs, 60):
        assert stats.broadcast_bytes == stats.bytes == stats.total_bytes and stats.refetched == 0
        assert stats.ring == ring
    r = served.wait_round()
    assert r.world_size == 3 and r.error == "" and r.bytes == stats.total_bytes
    assert r.path == ("ring" if ring else "gloo")
    assert stats.total_bytes > 4 * BUCKET  # several buckets, tensors spanning their edges


@pytest.mark.parametrize("served", [{"expected": 1}], indirect=True)
def test_a_late_joiner_gets_a_round_of_its_own_and_one_beyond_the_limit_streams(served):
    first = served.join("early")  # the round is closed and waits for "early" to rendezvous
    late = served.join("late")  # the next round of the version, beside the first (it waits for no one:
    assert first.group and first.world_size == 2  # the one expected worker is in the first round)
    assert late.group and late.group != first.group and late.world_size == 2
    beyond = served.join("beyond")  # two rounds of the version under way: the stream
    assert beyond.group == "" and beyond.manifest.version == first.manifest.version
    tensors, stats = fetch_weights(served.stub(), pb.Header(pool="bf16", worker_id="beyond"), beyond.manifest.version,
                                   "bf16")
    served.check(tensors)
    runs = [in_thread(served.receive, "early", first), in_thread(served.receive, "late", late)]
    for stats in all_received(served, runs, 60):
        assert stats.broadcast_bytes == stats.total_bytes and stats.refetched == 0
    served.wait_round(2)
    assert [r.error for r in served.hub.results] == ["", ""] and [r.world_size for r in served.hub.results] == [2, 2]
    again = served.join("later")  # both rounds are over: a new one opens
    assert again.group and again.group not in (first.group, late.group)
    served.check(served.receive("later", again)[0])


def test_the_hub_keeps_at_most_two_buffer_pairs_after_rounds_that_ran_at_once(served):
    pairs = [served.hub._take_pair(1 << 10, "cpu") for _ in range(3)]  # three rounds at once, each its pair
    for pair in pairs:
        served.hub._give_pair(pair)
    assert len(served.hub._spare) == 2  # (the third is freed: no more than two buckets stay allocated)
    got = served.hub._take_pair(1 << 10, "cpu")
    assert any(got is p for p in pairs[:2])


@pytest.mark.parametrize("served", [{"expected": 1}], indirect=True)
def test_a_round_waiting_for_a_ghost_holds_up_no_other_round(served):
    ghost = served.join("ghost")  # takes its ticket and never connects: its round waits the join timeout (10 s)
    assert ghost.group
    t0 = time.monotonic()
    ticket = served.join("a")  # late to it: a round of its own, beside
    stats = served.receive("a", ticket)[1]
    assert stats.broadcast_bytes == stats.total_bytes  # over its round, not the stream
    # not behind the ghost's rendezvous (10 s) on the trainer's store connection (a store connect here
    # stalls 5 s in 1-4 % of tries: the bound leaves room for one)
    assert time.monotonic() - t0 < 9
    assert served.wait_round().error == ""  # (a's round ends first)


@pytest.mark.parametrize("served", [{"expected": 2, "gather_s": 30.0}], indirect=True)
def test_closing_the_hub_ends_a_gathering_round_and_opens_none(served):
    t, out = in_thread(served.join, "a")  # gathering: waits for a second worker for up to 30 s
    deadline = time.monotonic() + 10
    while not served.hub._active and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    served.hub.close()
    t.join(10)
    assert out["value"].group == "" and time.monotonic() - t0 < 3  # stream it; close did not wait it out
    assert served.hub.join(0, "bf16", "bf16", "b") is None  # no round opens on a closed hub


@pytest.mark.parametrize("served", [{"expected": 3, "gather_s": 0.3}], indirect=True)
def test_a_late_round_waits_only_for_the_workers_not_in_the_first(served):
    # three workers expected: two join the first round, which closes after its gathering time
    # without the third; the third, late, gets a round of its own at once (the two others are
    # accounted for), not after another gathering time
    runs = [in_thread(served.join, w) for w in ("a", "b")]
    tickets = []
    for t, out in runs:
        t.join(30)
        tickets.append(out["value"])
    assert tickets[0].group == tickets[1].group and tickets[0].world_size == 3
    t0 = time.monotonic()
    late = served.join("c")
    assert late.group and late.group != tickets[0].group and late.world_size == 2
    assert time.monotonic() - t0 < 0.25  # (a gathering time is 0.3 s)
    runs = [in_thread(served.receive, w, tk) for w, tk in (("a", tickets[0]), ("b", tickets[1]), ("c", late))]
    for stats in all_received(served, runs, 60):
        assert stats.broadcast_bytes == stats.total_bytes
    served.wait_round(2)
    assert sorted(r.world_size for r in served.hub.results) == [2, 3] and all(not r.error for r in served.hub.results)


def linked_round(served: Served, worker: str, link: BroadcastLink, held: str | None = None):
    """One round for ``worker`` through ``link`` (telling the trainer ``held``, by default the
    group the link holds): (ticket, stats)."""
    n = served.hub.rounds
    ticket = served.join(worker, held=link.held if held is None else held)
    assert ticket.group, "no broadcast under way: the ticket must name a group"
    tensors, stats = served.receive(worker, ticket, link)
    served.check(tensors)
    assert stats.broadcast_bytes == stats.total_bytes and stats.refetched == 0
    deadline = time.monotonic() + 30
    while served.hub.rounds <= n and time.monotonic() < deadline:  # the trainer's side ended too
        time.sleep(0.01)
    return ticket, stats


@pytest.mark.parametrize("served", [{"expected": 1}], indirect=True)
def test_a_worker_keeps_its_group_from_one_version_to_the_next(served):
    link = BroadcastLink()
    try:
        tickets = []
        for k in range(3):
            ticket, stats = linked_round(served, "w", link)
            assert stats.reused_group == (k > 0)  # opened once, then reused: no rendezvous
            assert served.wait_round(k + 1).error == ""
            tickets.append(ticket)
        assert len({t.group for t in tickets}) == 1 and {t.rank for t in tickets} == {1}
        assert link.held == tickets[0].group and served.hub.kept_groups() == 1
        restarted = BroadcastLink()  # the same worker id, restarted: it holds nothing, so it gets a new group
        try:
            ticket, stats = linked_round(served, "w", restarted)
            assert ticket.group != tickets[0].group and not stats.reused_group
            assert served.wait_round(4).error == "" and served.hub.kept_groups() == 1  # the old one was closed
        finally:
            restarted.close()
        ticket, stats = linked_round(served, "w", link)  # the first link's group is gone: it gets another
        assert ticket.group not in (tickets[0].group, restarted.held) and not stats.reused_group
    finally:
        link.close()


@pytest.mark.parametrize("served", [{"expected": 1}], indirect=True)
def test_a_group_is_kept_only_for_its_exact_workers_holding_its_name(served):
    a, b = BroadcastLink(), BroadcastLink()
    try:
        served.hub.expected = lambda dtype: 2
        pair = [in_thread(linked_round, served, f"w{i}", link) for i, link in enumerate((a, b))]
        for t, out in pair:
            t.join(60)
            assert "error" not in out, out.get("error")
        group = a.held
        assert group and b.held == group
        served.hub.expected = lambda dtype: 1
        ticket, stats = linked_round(served, "w0", a)  # w1 left: not the same workers, a new group
        assert ticket.group != group and not stats.reused_group and ticket.world_size == 2
        ticket2, stats = linked_round(served, "w0", a, held="not-" + a.held)  # a name it does not hold
        assert ticket2.group != ticket.group and not stats.reused_group
        ticket3, stats = linked_round(served, "w0", a)
        assert ticket3.group == ticket2.group and stats.reused_group
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("served", [{"expected": 1}], indirect=True)
def test_a_joiner_without_a_worker_id_gets_no_kept_group(served):
    link = BroadcastLink()
    try:
        ticket, _ = linked_round(served, "", link)
        assert served.hub.kept_groups() == 0
        wait_released()  # the group's teardown, then its keys: the store keeps none of a closed group
        assert not keys_of(served.hub, ticket.group)
    finally:
        link.close()


@pytest.mark.parametrize("served", [{"expected": 2, "join_timeout_s": 1.0}], indirect=True)
def test_a_failed_rendezvous_leaves_no_key_in_the_store(served):
    from dcmdp_trainer.broadcast import FAILED_KEY_KEPT_S

    runs = [in_thread(served.join, w) for w in ("a", "ghost")]  # "ghost" takes its ticket, never connects
    tickets = [out["value"] for t, out in runs if t.join(30) is None]
    stats = served.receive("a", tickets[0])[1]
    assert stats.broadcast_bytes == 0 and stats.bytes == stats.total_bytes  # (the stream)
    assert served.wait_round().error  # (the rendezvous failed)
    wait_released()
    assert not keys_of(served.hub, tickets[0].group)
    # the ghost shows up after all, after its round was given up: its rendezvous writes its address
    # under the closed group's name (and fails); a sweep after rounds end deletes it
    late = served.receive("ghost", tickets[1])[1]
    assert late.broadcast_bytes == 0 and late.bytes == late.total_bytes
    assert keys_of(served.hub, tickets[0].group)
    served.hub._next_key_sweep = 0.0  # (the sweep runs at most every KEY_SWEEP_S)
    served.hub._sweep_closed_keys(time.monotonic() + FAILED_KEY_KEPT_S + 1)  # what a round ending then does
    assert not keys_of(served.hub, tickets[0].group)


def test_a_closed_groups_failed_key_outlives_it_for_its_workers_then_goes(served):
    from dcmdp_trainer.broadcast import FAILED_KEY_KEPT_S

    hub, g = served.hub, Group("ab" * 16, (("bf16", "w"),), "gloo")
    for key in (f"{g.name}/failed", f"{g.name}//0/0", f"{g.name}/alive/1"):
        hub.store.set(key, "1")
    hub.store.set("cd" * 16 + "//0/0", "1")  # a key of a group this hub did not close: never its to delete
    with hub._cond:
        hub._retire(g)  # a round of it was given up: its workers may not have read "failed" yet
    wait_released()
    assert keys_of(hub, g.name) == [f"{g.name}/failed"]
    hub._sweep_closed_keys(time.monotonic() + 1)  # (a round ending soon after sweeps: too early for it)
    assert keys_of(hub, g.name) == [f"{g.name}/failed"]
    hub.store.set(f"{g.name}//0/1", "1")  # a ticket holder's late rendezvous, after the group closed
    hub._sweep_closed_keys(time.monotonic() + FAILED_KEY_KEPT_S + 20)  # (rounds ending later sweep)
    assert not keys_of(hub, g.name)
    assert "cd" * 16 + "//0/0" in hub.store.list_keys()


@pytest.mark.parametrize("served", [{"expected": 2, "timeout_s": 30.0, "join_timeout_s": 1.0}], indirect=True)
def test_a_ticket_holder_that_never_receives_on_a_kept_group_holds_the_round_only_for_the_join_timeout(served):
    a, b = BroadcastLink(), BroadcastLink()
    try:
        pair = [in_thread(linked_round, served, f"w{i}", link) for i, link in enumerate((a, b))]
        for t, out in pair:
            t.join(60)
            assert "error" not in out, out.get("error")
        ghost, out = in_thread(served.join, "w1", None, b.held)  # takes its ticket on the kept group, never receives
        t0 = time.monotonic()
        ticket = served.join("w0", held=a.held)
        tensors, stats = served.receive("w0", ticket, a)
        served.check(tensors)  # over the stream
        assert stats.reused_group and stats.broadcast_bytes == 0
        assert time.monotonic() - t0 < 10  # the 1 s join timeout, not the 30 s data timeout
        ghost.join(5)
        assert out["value"].group == ticket.group
    finally:
        a.close()
        b.close()


def test_an_engine_error_while_loading_is_raised_not_taken_for_a_lost_bucket(session):
    s = Served(session, expected=1)
    try:
        def sink(pieces):
            raise RuntimeError("CUDA out of memory (simulated)")

        ticket = s.join("w")
        with pytest.raises(LoadError, match="CUDA out of memory"):
            receive_broadcast(s.stub(), pb.Header(pool="bf16", worker_id="w"), ticket, "127.0.0.1", sink=sink)
    finally:
        s.stop()


@pytest.mark.parametrize("shared_memory", RING_AND_GLOO)
def test_a_corrupted_bucket_is_detected_and_fetched_again(session, shared_memory):
    s = Served(session, expected=1, shared_memory=shared_memory)
    try:
        events = []
        with corrupt_buckets(2) as fault:  # the real hub's buckets, damaged from outside after their crc
            ticket = s.join("w")
            tensors, stats = receive_broadcast(s.stub(), pb.Header(pool="bf16", worker_id="w"), ticket,
                                               "127.0.0.1", on_event=lambda what, f: events.append(what))
        s.check(tensors)
        assert stats.ring == shared_memory
        assert fault.struck == 2 and stats.crc_errors == 2 and stats.refetched == 2
        assert "bucket crc mismatch: fetching it again" in events
        assert stats.bytes == stats.total_bytes + 2 * BUCKET  # the two damaged buckets came twice
    finally:
        s.stop()


KILLED_WORKER = """
import os, signal, sys
from dcmdp.proto import dcmdp_pb2 as pb, dcmdp_pb2_grpc
from dcmdp.transport.channel import open_channel
from dcmdp_rollout.weights import receive_broadcast
stub = dcmdp_pb2_grpc.TrainerStub(open_channel("127.0.0.1:" + sys.argv[1], sys.argv[2]))
h = pb.Header(pool="bf16", worker_id="doomed")
print("ready", flush=True)
ticket = stub.JoinBroadcast(pb.WeightRequest(header=h, version=0, dtype="bf16"), timeout=30)
print("joined", flush=True)
import dcmdp_rollout.broadcast_link as w
opened = w.open_group
def open_and_die(*args, **kwargs):  # killed once in the group, as the broadcast starts
    opened(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
w.open_group = open_and_die
receive_broadcast(stub, h, ticket, "127.0.0.1")
"""


@pytest.mark.parametrize("served", [{"expected": 2, "gather_s": 60.0, "timeout_s": 20.0, "bucket": 1 << 20,
                                    "extra_mib": 48, "shared_memory": ring} for ring in (True, False)],
                         indirect=True, ids=["ring", "gloo"])
def test_a_worker_killed_mid_broadcast_fails_the_round_not_the_others(served):
    doomed = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(served.port), TOKEN], stdout=subprocess.PIPE)
    try:
        assert doomed.stdout.readline().strip() == b"ready"
        t0 = time.monotonic()
        tensors, stats = joined_and_received(served, "survivor")
        assert doomed.wait(30) == -signal.SIGKILL
        served.check(tensors)  # intact: what the broadcast did not deliver (if anything) came over the stream
        assert (stats.refetched > 0) == ("broadcast failed: fetching the rest over the stream" in stats.events)
        r = served.wait_round()
        assert r.error and time.monotonic() - t0 < 20  # the round failed at once, not at the timeout
        served.hub.expected = lambda dtype: 1
        tensors, stats = joined_and_received(served, "next")  # the hub goes on
        served.check(tensors)
        assert stats.broadcast_bytes == stats.total_bytes
    finally:
        doomed.kill()


@pytest.mark.parametrize("served", [{"expected": 2, "timeout_s": 40.0, "join_timeout_s": 1.0}], indirect=True)
def test_a_ticket_holder_that_never_connects_holds_the_round_only_for_the_join_timeout(served):
    ghost, out = in_thread(served.join, "ghost")  # takes a ticket of the round, never connects to the group
    t0 = time.monotonic()
    tensors, stats = joined_and_received(served, "w")
    waited = time.monotonic() - t0
    served.check(tensors)  # fetched over the stream instead
    assert stats.broadcast_bytes == 0 and stats.bytes == stats.total_bytes
    assert "broadcast failed: fetching the rest over the stream" in stats.events
    assert waited < 15, waited  # the join timeout (1 s) and the stream, not the 40 s data timeout
    r = served.wait_round()
    assert r.error and r.world_size == 3
    assert served.hub.kept_groups() == 0  # a group whose round failed is never used again
    ghost.join(5)
    assert out["value"].group  # (the ghost did hold a ticket of that round)


def test_a_peer_without_the_token_neither_joins_nor_rendezvouses(served):
    with pytest.raises(grpc.RpcError) as e:
        served.join("intruder", served.stub("wrong-token"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:  # no token at all
        with pytest.raises(grpc.RpcError) as e:
            dcmdp_pb2_grpc.TrainerStub(ch).StreamWeights(pb.WeightRequest(version=0, dtype="bf16"), timeout=5).next()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # the store answers anyone, but the group name is a secret of JoinBroadcast: a guess rendezvouses with no one
    ticket_thread, out = in_thread(served.join, "w")
    with pytest.raises(RuntimeError):
        open_group(client_store("127.0.0.1", served.hub.port, 2.0), "guessed-name", 1, 2, join_timeout_s=2.0)
    ticket_thread.join(30)
    served.check(served.receive("w", out["value"])[0])


def test_a_peer_without_the_token_that_takes_a_rank_receives_nothing(served):
    """The store lists its keys to anyone (``TCPStore.list_keys``), the group's name with them, so a
    peer without the token can take a worker's rank in the rendezvous (an attacker did, and read
    every weight). Every rank must first show its ticket's proof: the impostor cannot, the trainer
    sends nothing, and the worker it displaced fetches over the authenticated stream."""
    ticket_thread, out = in_thread(served.join, "w")
    ticket_thread.join(30)
    ticket = out["value"]
    spy = client_store("127.0.0.1", served.hub.port, 5.0)
    deadline = time.monotonic() + 10
    names: set[str] = set()
    while not names and time.monotonic() < deadline:  # the trainer's rendezvous keys appear
        names = {k.split("/")[0] for k in spy.list_keys() if "/" in k}
        time.sleep(0.01)
    assert names == {ticket.group}  # (the leak the proof makes harmless)
    impostor = open_group(spy, names.pop(), ticket.rank, ticket.world_size, join_timeout_s=10.0)
    shown = gather(impostor, [], torch.zeros(PROOF_WORDS, dtype=torch.int64), 10.0)  # a guess: no ticket, no proof
    start = torch.full((2,), -1, dtype=torch.int64)
    started = broadcast(impostor, start, 10.0)
    got = torch.zeros(BUCKET, dtype=torch.uint8)
    first = broadcast(impostor, got[:1024], 10.0)
    result = served.wait_round()
    assert "did not show their ticket's proof" in result.error and "nothing was sent" in result.error
    assert ticket.group not in result.error and result.bytes == 0
    given_up = threading.Event()
    given_up.set()
    for work in (shown, started, first):
        try:
            wait(work, given_up)
        except RuntimeError:
            pass
    assert start.tolist() == [-1, -1] and not got.any()  # not the version, not a byte of weights
    tensors, stats = served.receive("w", ticket)  # the displaced worker: its rank was taken, it streams
    served.check(tensors)
    assert stats.broadcast_bytes == 0
    release_group([impostor])


def test_an_overflowing_cast_is_refused_before_anything_is_sent(session):
    state = dict(session.weights(0))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[name] = state[name].clone()
    state[name][0, 0] = 1e6  # finite in fp32 and bf16, inf in fp16
    publisher = WeightPublisher(keep=1, bucket_bytes=BUCKET)
    publisher.publish(0, state)
    with pytest.raises(WeightCastError, match=rf"tensor {name}: largest magnitude 1e\+06 .* float16"):
        publisher.prepared(0, "fp16")
    server, port = start_server(Coordinator(session, publisher), publisher, TOKEN,
                                hub=BroadcastHub(publisher, "127.0.0.1"))
    try:
        stub = dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{port}", TOKEN))
        for call in (stub.GetWeightManifest, stub.JoinBroadcast):
            with pytest.raises(grpc.RpcError) as e:
                call(pb.WeightRequest(header=pb.Header(pool="bf16", worker_id="w"), version=0, dtype="fp16"), timeout=10)
            assert e.value.code() == grpc.StatusCode.INTERNAL and name in e.value.details()
    finally:
        server.stop(grace=None)
    strict = WeightPublisher(keep=1, dtypes=("bf16", "fp16"))  # a trainer serving an fp16 pool never publishes it
    with pytest.raises(WeightCastError, match=name):
        strict.publish(1, state)
    assert strict.versions() == []


def listening_addresses(port: int) -> set[str]:
    """The local addresses this process listens on at TCP ``port`` ("0.0.0.0"/"::" = every interface)."""
    import psutil

    return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_the_store_listens_only_on_the_trainers_host(session):
    """Local mode (`dcmdp run`): the trainer's --host is 127.0.0.1; the store must not listen on `*`
    (torch's TCPStore(host, 0, is_master=True) alone binds every interface)."""
    publisher = WeightPublisher(keep=1, bucket_bytes=BUCKET)
    server, _ = start_server(None, None, TOKEN, host="127.0.0.1")
    try:
        server.dcmdp_service.attach(Coordinator(session, publisher), publisher, broadcast_host="127.0.0.1")
        hub = server.dcmdp_service.hub
        assert listening_addresses(hub.port) == {"127.0.0.1"}
        peer = client_store("127.0.0.1", hub.port, 5.0)  # and it answers there
        peer.set("k", b"v")
        assert hub.store.get("k") == b"v"
    finally:
        server.stop(grace=None)


DIES_AFTER_TWO_BUCKETS = """
import os, signal, sys
from dcmdp.proto import dcmdp_pb2 as pb, dcmdp_pb2_grpc
from dcmdp.transport.channel import open_channel
from dcmdp_rollout.weights import receive_broadcast
stub = dcmdp_pb2_grpc.TrainerStub(open_channel("127.0.0.1:" + sys.argv[1], sys.argv[2]))
h = pb.Header(pool="bf16", worker_id="doomed")
ticket = stub.JoinBroadcast(pb.WeightRequest(header=h, version=0, dtype="bf16"), timeout=60)
import dcmdp_rollout.weights as w
submit, received = w.BucketReceiver.submit, [0]
def submit_and_die(self, *args):  # SIGKILLed mid-broadcast, its connections open, after receiving two buckets
    received[0] += 1
    if received[0] > 2:
        os.kill(os.getpid(), signal.SIGKILL)
    submit(self, *args)
w.BucketReceiver.submit = submit_and_die
receive_broadcast(stub, h, ticket, "127.0.0.1", sink=lambda pieces: None)
"""


@pytest.mark.slow
@pytest.mark.parametrize("served", [{"expected": 3, "gather_s": 60.0, "timeout_s": 60.0, "bucket": 32 << 20,
                                    "extra_mib": 256, "shared_memory": ring} for ring in (True, False)],
                         indirect=True, ids=["ring", "gloo"])
def test_a_worker_killed_mid_transfer_stalls_the_others_seconds_not_the_data_timeout(served):
    """gloo does not fail an operation whose peer was killed before its timeout (60 s here), and in
    its tree broadcast a worker may relay to another after the trainer's last send: the trainer
    waits for every worker to say it received everything, the heartbeats show the dead one within
    seconds, the round is reported failed and the survivors (stopped at once) fetch the rest over
    the stream. (Against the code before heartbeats the survivors waited 61 s here.)"""
    doomed = subprocess.Popen([sys.executable, "-c", DIES_AFTER_TWO_BUCKETS, str(served.port), TOKEN])
    try:
        t0 = time.monotonic()
        survivors = [in_thread(joined_and_received, served, f"survivor-{k}") for k in range(2)]
        all_received(served, survivors, 120)
        assert time.monotonic() - t0 < 20, "the survivors waited for the data timeout"
        assert doomed.wait(30) == -signal.SIGKILL
        assert served.wait_round().error
    finally:
        doomed.kill()


def test_the_hub_never_runs_a_retired_groups_destructor_on_its_own_thread():
    """A group is retired under the hub's lock (every JoinBroadcast waits on it): its teardown,
    which after a lost peer blocks until the operations' timeout, must run elsewhere."""
    hub = BroadcastHub(WeightPublisher(keep=1, bucket_bytes=BUCKET), "127.0.0.1")
    try:
        SlowToDestroy.destroyed_in.clear()
        g = Group("g", (("bf16", "w"),), "gloo", pg=SlowToDestroy())
        t0 = time.perf_counter()
        with hub._cond:
            hub._retire(g)
        assert time.perf_counter() - t0 < 0.5 and g.pg is None
        wait_released()
        assert SlowToDestroy.destroyed_in == ["dcmdp-group-release"]
    finally:
        hub.close()


@pytest.mark.slow
@pytest.mark.parametrize("served", [{"bucket": 1 << 20, "extra_mib": 512}], indirect=True)
def test_a_worker_whose_trainer_dies_mid_sync_retries_and_does_not_crash(served, tmp_path):
    """The trainer gone while a worker loads weights (its stream gives up after its attempts): the
    worker retries and registers again until --give-up-after, then exits 3 (unreachable) like after
    any failed call; it had exited 1 with a traceback."""
    (tmp_path / "token").write_text(TOKEN)
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "dcmdp_rollout", "--trainer", f"127.0.0.1:{served.port}",
                                   "--pool", "bf16", "--worker-id", "w", "--token-file", str(tmp_path / "token"),
                                   "--data-plane", "stream", "--give-up-after", "2"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while '"registered"' not in log.read_text() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.02)
        time.sleep(0.3)  # (inside its first sync: 512 MiB over the stream)
        served.stop()
        assert worker.wait(120) == 3, log.read_text()[-3000:]
        text = log.read_text()
        assert "trainer unreachable: retrying" in text and "giving up" in text and "Traceback" not in text
    finally:
        worker.kill()


def rings_in_shm() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("dcmdp-ring-")}


@pytest.mark.parametrize("served", [{"expected": 2}], indirect=True)
def test_a_round_goes_over_the_group_when_one_worker_cannot_map_the_ring(served):
    """Workers on the trainer's machine copy the parts out of its shared-memory ring; a worker that
    cannot map it (another machine or container, another user; here one with rings turned off)
    says so in the proof gather, and the whole round goes over gloo, every worker intact."""
    blind = BroadcastLink()
    blind.shared_memory = False

    def receive(worker: str, link: BroadcastLink | None):
        return served.receive(worker, served.join(worker), link=link)

    runs = [in_thread(receive, "sees", None), in_thread(receive, "blind", blind)]
    stats = all_received(served, runs, 60)
    assert [s.ring for s in stats] == [False, False]
    assert all(s.broadcast_bytes == s.total_bytes and s.refetched == 0 for s in stats)
    r = served.wait_round()
    assert r.path == "gloo" and r.error == ""
    blind.close()


@pytest.mark.parametrize("served", [{"join_timeout_s": 1.0}], indirect=True)
def test_a_joiner_from_another_machine_is_offered_no_ring(served):
    """A ring is offered only when every joiner may be on this machine (its gRPC address is a
    loopback one or one of this machine's): a pod on another node cannot map it."""
    served.hub.expected = lambda dtype: 1
    t, out = in_thread(served.hub.join, 0, "bf16", "bf16", "far", "", "10.255.255.254")
    t.join(30)
    ticket = out["value"]
    assert ticket is not None and ticket.ring is None
    t, out = in_thread(served.hub.join, 0, "bf16", "bf16", "near", "", "127.0.0.1")
    t.join(30)  # (the first round fails at the join timeout: "far" never connects)
    assert out["value"].ring is not None


def test_the_hub_deletes_its_rings_when_it_closes(session):
    before = rings_in_shm()
    s = Served(session, expected=1)
    try:
        tensors, stats = joined_and_received(s, "w")
        s.check(tensors)
        assert stats.ring and len(rings_in_shm() - before) == 1  # kept for the next round
        (name,) = rings_in_shm() - before
        total = -(-stats.total_bytes // 64) * 64  # (a snapshot smaller than a half-bucket: slots of its size)
        assert os.stat(os.path.join(SHM_DIR, name)).st_size == 64 + 2 * min(BUCKET // 2, total)
    finally:
        s.stop()
        s.hub.close()
    assert rings_in_shm() - before == set()


def test_a_rings_slots_are_a_half_bucket_or_the_whole_snapshot_if_smaller():
    assert ring_slot_bytes(Layout("bf16", (), 1000, 64 << 20)) == 1024
    assert ring_slot_bytes(Layout("bf16", (), 1 << 30, 64 << 20)) == 32 << 20
    assert ring_slot_bytes(Layout("bf16", (), 0, 64 << 20)) == 64


def scribble(path: str, slots: int, slot_bytes: int, stop: threading.Event) -> None:
    """Another process of the trainer's user writing bf16 NaNs over the head of every slot, over
    and over (in a thread here: the same memory)."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 64 + slots * slot_bytes) as mm:
            while not stop.is_set():
                for k in range(slots):
                    mm[64 + k * slot_bytes:64 + k * slot_bytes + 64] = b"\xff" * 64
    finally:
        os.close(fd)


def replace_crcs(prep):
    """``prep`` with no crc known yet (so :meth:`WeightPublisher.crc` computes the true one)."""
    return dataclasses.replace(prep, crcs=[None] * len(prep.crcs))


@pytest.mark.parametrize("served", [{"expected": 1}], indirect=True)
def test_damage_written_into_the_ring_never_reaches_the_weights_nor_the_crcs(served):
    """The trainer took a version's crcs from the ring after writing each part into it, so damage
    written there first got a matching crc: workers loaded NaNs, and the damaged crcs, kept for the
    stream, made the version unfetchable. The crcs now come from private memory."""
    version, ring = 0, None
    for version in range(3):
        if version:
            served.publisher.publish(version, {k: v + version for k, v in served.session_weights.items()})
        ticket = served.stub().JoinBroadcast(pb.WeightRequest(header=pb.Header(pool="bf16", worker_id="w"),
                                                              version=version, dtype="bf16"), timeout=30)
        assert ticket.ring
        stop = threading.Event()
        vandal = threading.Thread(target=scribble, args=(os.path.join(SHM_DIR, ticket.ring), ticket.ring_slots,
                                                         ticket.ring_slot_bytes, stop))
        vandal.start()
        try:
            tensors, stats = served.receive("w", ticket)
        finally:
            stop.set()
            vandal.join()
        want = loopback({k: v + version for k, v in served.session_weights.items()}, "bf16", skip=("lm_head.weight",))
        assert set(tensors) == set(want) and all(torch.equal(tensors[k], want[k]) for k in want), version
        prep = served.publisher.prepared(version, "bf16")
        true = [served.publisher.crc(replace_crcs(prep), i, fill(prep.state, prep.layout, i, torch.empty(
            prep.layout.bucket_bytes, dtype=torch.uint8))) for i in range(prep.layout.buckets)]
        assert prep.crcs == true, version  # (so the stream serves the version, damaged or not)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (the round thread's 1/0)
@pytest.mark.parametrize("served", [{"expected": 1}], indirect=True)
def test_a_round_whose_thread_fails_lets_its_joiners_stream_and_the_next_joiner_open_a_new_one(served, monkeypatch):
    real = BroadcastHub._close_gathering
    monkeypatch.setattr(BroadcastHub, "_close_gathering", lambda self, r, ring: 1 / 0)
    t0 = time.monotonic()
    assert served.hub.join(0, "bf16", "bf16", "w") is None  # at once: stream it
    assert time.monotonic() - t0 < 5 and not served.hub._rounds
    monkeypatch.setattr(BroadcastHub, "_close_gathering", real)
    tensors, stats = joined_and_received(served, "w")
    served.check(tensors)
    assert stats.broadcast_bytes == stats.total_bytes


@pytest.mark.parametrize("served", [{"expected": 1}], indirect=True)
def test_a_worker_unmaps_rings_its_trainer_deleted_and_refuses_a_ticket_whose_slots_are_too_small(served):
    link = BroadcastLink()
    try:
        ticket = served.join("w")
        served.receive("w", ticket, link=link)
        assert list(link._rings) == [ticket.ring]
        served.wait_round()  # (its ring is back among the spares)
        for ring in served.hub._spare_rings:  # the trainer lets its rings go (a restart does the same)
            ring.close()
        served.hub._spare_rings.clear()
        bad = pb.BroadcastTicket()
        bad.CopyFrom(ticket)
        bad.ring_slot_bytes, bad.ring_slots = ticket.ring_slot_bytes // 2, ticket.ring_slots * 2  # same file size
        assert link.ring(bad) is None and "cannot hold" in link.ring_error
        assert link._rings == {}  # (the deleted ring was unmapped)
        served.receive("w", served.join("w", held=link.held), link=link)  # through a new ring, mapped
        assert len(link._rings) == 1
        served.wait_round(2)
        for ring in served.hub._spare_rings:  # its trainer lets it go
            ring.close()
        served.hub._spare_rings.clear()
        served.hub.shared_memory = False  # tickets offer no ring any more (a remote worker joined, say)
        tensors, stats = served.receive("w", served.join("w", held=link.held), link=link)
        served.check(tensors)
        assert not stats.ring and link._rings == {}  # the deleted ring is not kept mapped for ever
    finally:
        link.close()
