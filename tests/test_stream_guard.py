"""A weight server that cannot be exhausted: stalled streams and idle long polls never starve
GetStatus, stalled streams are cancelled, and the publisher keeps no per-request copies."""

from __future__ import annotations

import statistics
import time

import grpc
import pytest

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.proto import dcmdp_pb2_grpc
from dcmdp.transport.channel import open_channel
from dcmdp_trainer.coordinator import Coordinator
from dcmdp_trainer.server import MAX_STREAMS, start_server
from dcmdp_trainer.session import Session
from dcmdp_trainer.stream_guard import Slots
from dcmdp_trainer.weights import WeightPublisher
from runtime_helpers import tiny_run

TOKEN = "s3cret-run-token"


def test_slots_are_taken_without_waiting():
    s = Slots(2)
    assert s.take() and s.take() and not s.take()
    s.give()
    assert s.take() and s.used == 2


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp_path_factory.mktemp("run"), threads=1)
    yield s
    s.metrics.close()


def test_stalled_streams_and_idle_long_polls_do_not_starve_status(session):
    """40 never-read weight streams and 100 idle long-polling workers; GetStatus stays < 100 ms."""
    publisher = WeightPublisher(keep=1, bucket_bytes=4 << 20)
    big = {f"w{i}": t.repeat(40, *[1] * (t.dim() - 1)) if t.dim() else t
           for i, t in enumerate(session.weights(0).values())}  # ~12 MiB: more than flow control buffers
    publisher.publish(0, big)
    coord = Coordinator(session, publisher)  # phase Initializing: no work, so every long poll waits it out
    server, port = start_server(coord, publisher, TOKEN, stall_s=8.0)
    stalled_ch = open_channel(f"127.0.0.1:{port}", TOKEN)
    poll_ch = open_channel(f"127.0.0.1:{port}", TOKEN)
    status = dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{port}", TOKEN))
    polling = {"stop": False, "calls": 0}
    try:
        stalled = [dcmdp_pb2_grpc.TrainerStub(stalled_ch).StreamWeights(
            pb.WeightRequest(header=pb.Header(pool="bf16", worker_id=f"s{i}"), version=0, dtype="fp32"), timeout=60)
            for i in range(40)]  # started, never read
        poll = dcmdp_pb2_grpc.TrainerStub(poll_ch).AcquireLease

        def again(i):
            def done(fut):
                polling["calls"] += 1
                if not polling["stop"]:
                    time.sleep(0)  # (callback thread) ask again at once, as an idle worker would
                    poll.future(pb.LeaseRequest(header=pb.Header(pool="bf16", worker_id=f"p{i}")),
                                timeout=30).add_done_callback(again(i))
            return done

        for i in range(100):
            poll.future(pb.LeaseRequest(header=pb.Header(pool="bf16", worker_id=f"p{i}")),
                        timeout=30).add_done_callback(again(i))
        time.sleep(1.0)
        svc = server.dcmdp_service
        assert svc.streams.used == MAX_STREAMS  # 8 streams hold their threads; the other 32 were refused at once
        lat = []
        for _ in range(20):
            t0 = time.perf_counter()
            st = status.GetStatus(pb.StatusRequest(), timeout=5)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.05)
        assert st.run_name == "tiny"
        refused = [s for s in stalled if s.done() and s.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) == 40 - MAX_STREAMS
        print(f"GetStatus under load: median {statistics.median(lat) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms, "
              f"{polling['calls']} lease calls answered")
        assert statistics.median(lat) < 0.1 and sorted(lat)[-2] < 0.1, lat
        deadline = time.monotonic() + 30  # the stalled streams are cancelled after stall_s
        while svc.streams.used and time.monotonic() < deadline:
            time.sleep(0.2)
        assert svc.streams.used == 0 and svc.watchdog.cancelled == MAX_STREAMS
    finally:
        polling["stop"] = True
        server.stop(grace=None)
        for ch in (stalled_ch, poll_ch):
            ch.close()
