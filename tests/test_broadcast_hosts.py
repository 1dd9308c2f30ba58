"""Which of its addresses the trainer's data plane uses: a trainer listening on every interface
(``--host 0.0.0.0``, its default) must give gloo the address its workers reach, not loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dcmdp.transport.collective import local_address_towards, loopback_for, peer_address
from dcmdp_trainer.broadcast import BroadcastHub, Round
from dcmdp_trainer.coordinator import Coordinator
from dcmdp_trainer.server import start_server
from dcmdp_trainer.session import Session
from dcmdp_trainer.weights import WeightPublisher
from runtime_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hosts-token"


def test_a_grpc_peer_gives_its_ip_address():
    assert peer_address("ipv4:10.0.0.7:41234") == "10.0.0.7"
    assert peer_address("ipv6:[fd00::7]:41234") == "fd00::7"
    assert peer_address("ipv6:%5Bfd00::7%5D:41234") == "fd00::7"  # (percent-encoded by some gRPC versions)
    assert peer_address("ipv6:[::ffff:10.0.0.7]:41234") == "10.0.0.7"  # (an IPv4 client of a server on [::])
    assert peer_address("unix:/tmp/sock") == "" and peer_address("ipv4:junk") == "" and peer_address("") == ""


def test_local_addresses_of_both_families_and_wildcards():
    assert local_address_towards("127.0.0.1") == "127.0.0.1"
    assert local_address_towards("::1") == "::1"  # (IPv6: it fell back to 127.0.0.1 before)
    assert local_address_towards("0.0.0.0") == "127.0.0.1"  # what a wildcard gives: loopback, hence gloo_peer
    assert local_address_towards("no-such-host.invalid") == "127.0.0.1"
    assert loopback_for("0.0.0.0") == "127.0.0.1" and loopback_for("::") == "::1" and loopback_for("10.1.2.3") == "10.1.2.3"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp_path_factory.mktemp("run"), threads=1)
    yield s
    s.metrics.close()


def publisher(session) -> WeightPublisher:
    pub = WeightPublisher(keep=2, skip=("lm_head.weight",), bucket_bytes=16 << 10)
    pub.publish(0, dict(session.weights(0)))
    return pub


def test_a_wildcard_trainer_routes_gloo_towards_its_joiners(session):
    pub = publisher(session)
    on_all, on_one = BroadcastHub(pub, "0.0.0.0"), BroadcastHub(pub, "127.0.0.1")
    try:
        r = Round((0, "bf16"), pub.prepared(0, "bf16"), addresses=["", "10.20.30.40"])
        assert on_all.gloo_peer(r) == "10.20.30.40"  # the route to a joiner, not the wildcard's loopback
        assert on_one.gloo_peer(r) == "127.0.0.1"  # a trainer bound to one address uses it
        assert on_all.gloo_peer(Round((0, "bf16"), pub.prepared(0, "bf16"))) == "127.0.0.1"  # (none known)
    finally:
        on_all.close()
        on_one.close()


WORKER = textwrap.dedent("""
    import json, sys
    from dcmdp.proto import dcmdp_pb2 as pb, dcmdp_pb2_grpc
    from dcmdp.transport.channel import open_channel
    from dcmdp_rollout.weights import receive_broadcast
    target, port, token = sys.argv[1:4]
    stub = dcmdp_pb2_grpc.TrainerStub(open_channel(f"{target}:{port}", token))
    h = pb.Header(pool="bf16", worker_id="remote")
    ticket = stub.JoinBroadcast(pb.WeightRequest(header=h, version=0, dtype="bf16"), timeout=30)
    _, st = receive_broadcast(stub, h, ticket, target, sink=lambda pieces: None)
    print(json.dumps({"group": bool(ticket.group), "broadcast": st.broadcast_bytes, "total": st.total_bytes}))
""")


def test_a_trainer_on_every_interface_broadcasts_to_a_worker_on_another_host(session):
    """A second host: a network namespace behind a veth pair (needs root and ``ip``). The trainer
    listens on 0.0.0.0; the worker reaches it at 192.168.231.1. Before the fix the trainer's gloo
    bound to loopback and every round failed (``connectFullMesh ... Connect timeout``): the worker
    streamed the whole version."""
    ns, here, there = f"dcmdp{os.getpid() % 100000}", f"dch{os.getpid() % 100000}", f"dcw{os.getpid() % 100000}"
    setup = [f"ip netns add {ns}", f"ip link add {here} type veth peer name {there}", f"ip link set {there} netns {ns}",
             f"ip addr add 192.168.231.1/24 dev {here}", f"ip link set {here} up",
             f"ip netns exec {ns} ip addr add 192.168.231.2/24 dev {there}",
             f"ip netns exec {ns} ip link set {there} up", f"ip netns exec {ns} ip link set lo up"]
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("a second host needs root and iproute2 (ip netns)")
    made = subprocess.run(" && ".join(setup), shell=True, capture_output=True, text=True)
    try:
        if made.returncode:
            pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()[:200]}")
        pub = publisher(session)
        hub = BroadcastHub(pub, "0.0.0.0", gather_s=0.3, join_timeout_s=5.0, timeout_s=10.0, expected=lambda d: 1)
        server, port = start_server(Coordinator(session, pub), pub, TOKEN, hub=hub, host="0.0.0.0")
        try:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "trainer_image"),
                                                               str(REPO / "inference_image")]))
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", WORKER, "192.168.231.1", str(port),
                                  TOKEN], capture_output=True, text=True, timeout=120, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
            got = json.loads(out.stdout.strip().splitlines()[-1])
            assert got["group"] and got["broadcast"] == got["total"] > 0, got  # over gloo, not the stream
        finally:
            server.stop(grace=None)
            hub.close()
    finally:
        subprocess.run(f"ip netns del {ns}; ip link del {here}", shell=True, capture_output=True)
