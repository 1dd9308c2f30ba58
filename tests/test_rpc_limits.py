"""A trainer no caller can exhaust: unauthenticated bodies are never read, messages above the
receive limit are refused, invalid weight requests are refused at the RPC boundary, and many
long-polling workers cannot starve GetStatus."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.proto import dcmdp_pb2_grpc
from dcmdp.transport.auth import TokenClientInterceptor
from dcmdp.transport.buckets import DEFAULT_BUCKET_BYTES
from dcmdp.transport.channel import SERVER_RECEIVE_BYTES, open_channel
from dcmdp_trainer.coordinator import Coordinator
from dcmdp_trainer.server import start_server, submission_bytes
from dcmdp_trainer.session import Session
from dcmdp_trainer.weights import WeightPublisher
from runtime_helpers import Procs, read_ready, tiny_run, trainer_args, wait_for, write_manifest

TOKEN = "limits-token"
SUBMIT = "/dcmdp.v1.Trainer/SubmitRollouts"
FLOOD_CALLS, FLOOD_BODY = 32, 3 << 20  # under the 4 MiB receive limit: only the token check stops them
RSS_BOUND = 96 << 20  # what the flood may add to the trainer (measured 6-39 MiB; bodies read and parsed: ~200 MiB)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp_path_factory.mktemp("run"), threads=1)
    yield s
    s.metrics.close()


@pytest.fixture
def served(session):
    publisher = WeightPublisher(keep=2, skip=("lm_head.weight",))
    publisher.publish(session.version, session.weights(session.version))
    server, port = start_server(Coordinator(session, publisher), publisher, TOKEN, run=session.run, max_workers=16)
    yield port
    server.stop(grace=None)


def stub(port: int, token: str = TOKEN):
    return dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{port}", token))


def _channel(port: int, token: str = TOKEN) -> grpc.Channel:
    """A channel on its own connection, as a separate process would have (the channels of one
    process share a connection, whose concurrent streams the server caps)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                                   ("grpc.max_send_message_length", -1)])
    return grpc.intercept_channel(channel, TokenClientInterceptor(token)) if token else channel


def _method(port: int, token: str = TOKEN):
    channel = _channel(port, token)
    return channel, channel.unary_unary(SUBMIT, request_serializer=None, response_deserializer=pb.SubmitReply.FromString)


def test_invalid_weight_requests_are_refused(served):
    """Every weight RPC refuses the same invalid fields with INVALID_ARGUMENT naming the field; the
    one chunk size is the bucket size (0 asks for it)."""
    s = stub(served)
    header = pb.Header(pool="bf16", worker_id="w")
    bucket = DEFAULT_BUCKET_BYTES
    bad = {"version": dict(version=-5),
           "chunk_size": dict(chunk_size=-1),
           "chunk_size ": dict(chunk_size=1 << 30),
           "chunk_size  ": dict(chunk_size=1 << 20),  # a size other than the bucket size
           "offset": dict(offset=-3),
           "offset ": dict(offset=3),  # not a bucket boundary
           "offset  ": dict(offset=1 << 40),  # past the end of the snapshot
           "length": dict(length=-1),
           "dtype": dict(dtype="x" * 100_000)}  # echoed in the message: cut short, not a 100 kB header
    calls = {"GetWeightManifest": lambda r: s.GetWeightManifest(r, timeout=10),
             "JoinBroadcast": lambda r: s.JoinBroadcast(r, timeout=10),
             "StreamWeights": lambda r: list(s.StreamWeights(r, timeout=10))}
    for field, fields in bad.items():
        request = pb.WeightRequest(header=header, **{"version": 0, "dtype": "fp32", **fields})
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call(request)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, fields, e.value.details())
            assert field.strip() in e.value.details(), (name, fields, e.value.details()[:200])
            assert len(e.value.details()) <= 1000
    for size in (0, bucket):
        ok = s.GetWeightManifest(pb.WeightRequest(header=header, version=-1, dtype="fp32", chunk_size=size), timeout=10)
        assert ok.version == 0 and ok.chunk_size == bucket
    chunks = list(s.StreamWeights(pb.WeightRequest(header=header, version=-1, dtype="fp32", chunk_size=bucket),
                                  timeout=10))
    assert sum(len(c.data) for c in chunks) == ok.total_bytes


def test_a_message_over_the_receive_limit_is_refused(served, session):
    limit = max(SERVER_RECEIVE_BYTES, submission_bytes(session.run))
    channel, submit = _method(served)
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            submit(b"\0" * (limit + 1024), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = stub(served).GetStatus(pb.StatusRequest(), timeout=5)  # and the server goes on
        assert reply.total_steps == 6


def test_long_polls_do_not_starve_get_status(served):
    """40 workers long-polling (no work is queued: the coordinator is not running) on a server of
    16 threads: GetStatus still answers promptly."""
    stop = threading.Event()
    channels = [_channel(served) for _ in range(40)]

    def poll(i: int) -> None:
        s = dcmdp_pb2_grpc.TrainerStub(channels[i])
        while not stop.is_set():
            lease = s.AcquireLease(pb.LeaseRequest(header=pb.Header(pool="bf16", worker_id=f"w{i}")), timeout=10)
            time.sleep(lease.retry_after_ms / 1000)

    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(poll, i) for i in range(40)]
        time.sleep(1.0)
        s = stub(served)
        latencies = []
        for _ in range(10):
            t0 = time.perf_counter()
            s.GetStatus(pb.StatusRequest(), timeout=10)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.1)
        stop.set()
        for f in futures:
            f.result()
    for ch in channels:
        ch.close()
    print("GetStatus latency under 40 long-polls (s):", [round(x, 3) for x in latencies])
    assert max(latencies) < 1.0, latencies  # without the long-poll budget: ~2 s (a whole long poll)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_an_unauthenticated_flood_leaves_the_trainer_rss_bounded(tmp_path):
    """FLOOD_CALLS concurrent unauthenticated 3 MiB submissions (and 4 oversized authenticated ones):
    the trainer's resident memory grows by less than RSS_BOUND."""
    procs = Procs(tmp_path)
    try:
        config = write_manifest(tiny_run(model={"warmStart": {"steps": 0}}), tmp_path / "run.yaml")
        token = tmp_path / "token"
        token.write_text(TOKEN)
        ready = tmp_path / "ready.json"
        trainer = procs.start("trainer", trainer_args(config, tmp_path / "out", token, ready))
        port = wait_for(lambda: read_ready(ready), 120, "the trainer", procs)["port"]
        time.sleep(1.0)
        before = _rss(trainer.pid)
        body = b"\x0a" * FLOOD_BODY
        big = b"\x0a" * (8 << 20)
        codes = []

        def call(token_value: str) -> None:
            channel, submit = _method(port, token_value)
            with channel:
                try:
                    submit(body if not token_value else big, timeout=60)
                except grpc.RpcError as e:
                    codes.append(e.code())

        with ThreadPoolExecutor(FLOOD_CALLS) as pool:
            list(pool.map(call, [""] * FLOOD_CALLS + [TOKEN] * 4))
        grown = _rss(trainer.pid) - before
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == FLOOD_CALLS, codes
        print(f"trainer RSS {before / 2**20:.0f} MiB, +{grown / 2**20:.0f} MiB after the flood")
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4, codes
        assert grown < RSS_BOUND, f"trainer RSS grew by {grown / 2**20:.0f} MiB"
        status = stub(port).GetStatus(pb.StatusRequest(), timeout=10)
        assert status.total_steps == 6
    finally:
        procs.close()


def test_worker_ids_are_validated_and_the_registry_is_bounded(served, session):
    """A worker id longer than a Kubernetes name, empty or with spaces/control characters is
    INVALID_ARGUMENT naming header.worker_id on every worker RPC; new ids beyond the registry's
    bound are RESOURCE_EXHAUSTED while the known ones go on, and GetStatus stays small."""
    s = stub(served)
    for wid in ("x" * 254, "a b", "w\n", "wé"):
        h = pb.Header(pool="bf16", worker_id=wid)
        for call in (lambda: s.Register(pb.RegisterRequest(header=h, engine="hf", precision="bf16"), timeout=10),
                     lambda: s.AcquireLease(pb.LeaseRequest(header=h), timeout=10),
                     lambda: s.SubmitRollouts(pb.RolloutBatch(header=h, lease_id="x"), timeout=10)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header.worker_id" in e.value.details()
    longest = "w" * 253
    s.Register(pb.RegisterRequest(header=pb.Header(pool="bf16", worker_id=longest), engine="hf"), timeout=10)
    bound = max(64, 8 * sum(p.replicas for p in session.spec.rollout.pools))  # Coordinator.registry.max_workers
    for i in range(bound - 1):
        s.Register(pb.RegisterRequest(header=pb.Header(pool="bf16", worker_id=f"bf16-{i}"), engine="hf"), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        s.Register(pb.RegisterRequest(header=pb.Header(pool="bf16", worker_id="one-too-many"), engine="hf"), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "one-too-many" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        s.AcquireLease(pb.LeaseRequest(header=pb.Header(pool="bf16", worker_id="one-too-many")), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    s.Register(pb.RegisterRequest(header=pb.Header(pool="bf16", worker_id="bf16-0"), engine="hf"), timeout=10)
    status = s.GetStatus(pb.StatusRequest(), timeout=10)
    assert len(status.workers) == bound and status.ByteSize() < 64 * 1024


def test_weight_metrics_label_only_the_runs_pools_and_dtypes(session):
    """Each distinct label value is a series the trainer keeps and renders at every scrape: a
    worker's pool or dtype strings (300 streams with 1 MiB pool names had made one /metrics render
    5.4 GB) become "unknown" unless they are the run's."""
    from dcmdp_trainer.observability import TrainerMetrics
    from prometheus_client import generate_latest

    publisher = WeightPublisher(keep=2, skip=("lm_head.weight",))
    publisher.publish(session.version, session.weights(session.version))
    metrics = TrainerMetrics()
    server, port = start_server(Coordinator(session, publisher), publisher, TOKEN, run=session.run, runtime=metrics)
    try:
        s = stub(port)
        for k in range(5):
            list(s.StreamWeights(pb.WeightRequest(header=pb.Header(pool=f"p{k}" * 1000, worker_id="w"), version=-1,
                                                  dtype="fp32"), timeout=30))
            with pytest.raises(grpc.RpcError):
                list(s.StreamWeights(pb.WeightRequest(header=pb.Header(pool="bf16", worker_id="w"), version=-1,
                                                      dtype=f"d{k}"), timeout=30))
        list(s.StreamWeights(pb.WeightRequest(header=pb.Header(pool="bf16", worker_id="w"), version=-1, dtype="bf16"),
                             timeout=30))
    finally:
        server.stop(grace=None)
    text = generate_latest(metrics.registry).decode()
    series = {line.split(" ")[0] for line in text.splitlines() if line.startswith("dcmdp_weight_sync_bytes_total")}
    assert series == {'dcmdp_weight_sync_bytes_total{dtype="fp32",pool="unknown"}',  # (refused dtypes: none)
                      'dcmdp_weight_sync_bytes_total{dtype="bf16",pool="bf16"}'}, series
