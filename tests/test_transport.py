"""Wire helpers against a real trainer gRPC server (in this process): token checks, TLS, weight
snapshots cast per pool dtype, damaged chunks re-fetched, broken streams resumed (the gRPC stream,
the data plane's fallback; the broadcast itself: tests/test_broadcast.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.proto import dcmdp_pb2_grpc
from dcmdp.transport.auth import TokenError, load_token
from dcmdp.transport.channel import open_channel
from dcmdp_rollout.weights import fetch_weights
from dcmdp_testing.trainer_faults import break_stream, corrupt_chunks
from dcmdp_trainer.coordinator import Coordinator
from dcmdp_trainer.server import start_server
from dcmdp_trainer.session import Session
from dcmdp_trainer.weights import WeightPublisher, WeightsUnavailable
from certs import self_signed
from runtime_helpers import tiny_run

TOKEN = "s3cret-run-token"


# -- wire dtypes (the byte layout: tests/test_buckets.py) ---------------------------------------
def test_token_sources(tmp_path: Path):
    f = tmp_path / "tok"
    f.write_text("  from-file\n")
    assert load_token(str(f), env={}) == "from-file"
    assert load_token(None, env={"DCMDP_TOKEN_FILE": str(f), "DCMDP_TOKEN": "x"}) == "from-file"
    assert load_token(None, env={"DCMDP_TOKEN": "from-env"}) == "from-env"
    with pytest.raises(TokenError, match="--token-file"):
        load_token(None, env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenError, match="empty"):
        load_token(str(tmp_path / "empty"), env={})
    with pytest.raises(TokenError, match="cannot read"):
        load_token(str(tmp_path / "missing"), env={})


# -- a real trainer server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def session(tmp_path_factory):
    run = tiny_run(model={"warmStart": {"steps": 0}})
    s = Session(run, tmp_path_factory.mktemp("run"), threads=1)
    yield s
    s.metrics.close()


def serve(session: Session, bucket_bytes: int = 4 << 20, **kw):
    publisher = WeightPublisher(keep=2, skip=("lm_head.weight",), bucket_bytes=bucket_bytes)
    publisher.publish(session.version, session.weights(session.version))
    coord = Coordinator(session, publisher)
    server, port = start_server(coord, publisher, TOKEN, **kw)
    return server, port, publisher


@pytest.fixture
def served(session):
    server, port, publisher = serve(session)
    yield port, publisher
    server.stop(grace=None)


def stub(port: int, token: str = TOKEN):
    return dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{port}", token))


def test_calls_without_or_with_a_wrong_token_are_rejected(served):
    port, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        raw = dcmdp_pb2_grpc.TrainerStub(ch)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as e:
                raw.GetStatus(pb.StatusRequest(), metadata=metadata, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:  # a streaming call is checked as well
            list(raw.StreamWeights(pb.WeightRequest(version=-1, dtype="fp32"), timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub(port, "wrong-token").Register(pb.RegisterRequest(header=pb.Header(pool="bf16", worker_id="w")), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = stub(port).GetStatus(pb.StatusRequest(), timeout=5)
    assert status.run_name == "tiny" and status.total_steps == 6 and [p.name for p in status.pools] == ["bf16", "int8"]


def test_weights_are_cast_per_pool_dtype_and_checked(served, session):
    port, publisher = served
    s = stub(port)
    header = pb.Header(pool="bf16", worker_id="w")
    t16, st16 = fetch_weights(s, header, -1, "bf16")
    t32, st32 = fetch_weights(s, header, 0, "fp32")
    state = session.weights(0)
    assert "lm_head.weight" not in t16  # tied to the embedding: not sent twice
    assert set(t32) == set(state) - {"lm_head.weight"}
    for k, t in t32.items():
        assert torch.equal(t, state[k])
        assert t16[k].dtype == torch.bfloat16 and torch.equal(t16[k], state[k].to(torch.bfloat16))
    assert st16.total_bytes <= 0.51 * st32.total_bytes and st16.bytes == st16.total_bytes
    assert st16.crc_errors == 0 and st16.resumes == 0
    manifest = s.GetWeightManifest(pb.WeightRequest(header=header, version=0, dtype="bf16"), timeout=5)
    assert manifest.total_bytes == st16.total_bytes and manifest.chunk_size == 4 << 20
    with pytest.raises(grpc.RpcError) as e:
        s.GetWeightManifest(pb.WeightRequest(header=header, version=7, dtype="bf16"), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not kept" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        s.GetWeightManifest(pb.WeightRequest(header=header, version=0, dtype="int4"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(WeightsUnavailable):
        publisher.prepared(99, "fp32")
    for bad in (pb.WeightRequest(header=header, version=0, dtype="bf16", chunk_size=1),  # one chunk size only
                pb.WeightRequest(header=header, version=0, dtype="bf16", offset=3)):  # not a bucket boundary
        with pytest.raises(grpc.RpcError) as e:
            list(s.StreamWeights(bad, timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_corrupted_chunk_is_detected_and_fetched_again(session):
    with corrupt_chunks(2) as fault:  # the trainer's real publisher, damaged from outside
        server, port, _ = serve(session, bucket_bytes=128 << 10)
        try:
            events = []
            tensors, stats = fetch_weights(stub(port), pb.Header(pool="bf16", worker_id="w"), 0, "fp32",
                                           on_event=lambda what, f: events.append(what))
        finally:
            server.stop(grace=None)
    assert fault.struck == 2 and stats.crc_errors == 2
    assert events.count("chunk crc mismatch: fetching it again") == 2
    assert stats.bytes == stats.total_bytes + 2 * (128 << 10)  # the two bad chunks came twice
    for k, t in tensors.items():
        assert torch.equal(t, session.weights(0)[k])


def test_a_broken_stream_is_resumed_where_it_stopped(session):
    with break_stream(after=3) as fault:  # in place before the server binds the service
        server, port, _ = serve(session, bucket_bytes=16 << 10)
        try:
            tensors, stats = fetch_weights(stub(port), pb.Header(pool="bf16", worker_id="w"), 0, "bf16")
        finally:
            server.stop(grace=None)
    assert stats.total_bytes > 4 * (16 << 10)
    assert fault.struck == 1 and stats.resumes == 1
    assert stats.bytes == stats.total_bytes  # resumed at the offset: nothing fetched twice
    for k, t in tensors.items():
        assert torch.equal(t, session.weights(0)[k].to(torch.bfloat16))


def test_tls_with_given_cert_and_key(session, tmp_path):
    cert, key = self_signed(tmp_path)
    server, port, _ = serve(session, tls_cert=str(cert), tls_key=str(key))
    try:
        secure = dcmdp_pb2_grpc.TrainerStub(open_channel(f"localhost:{port}", TOKEN, tls_ca=str(cert)))
        assert secure.GetStatus(pb.StatusRequest(), timeout=10).run_name == "tiny"
        tensors, stats = fetch_weights(secure, pb.Header(pool="bf16", worker_id="w"), 0, "bf16")
        assert stats.total_bytes > 0 and tensors
        wrong_token = dcmdp_pb2_grpc.TrainerStub(open_channel(f"localhost:{port}", "nope", tls_ca=str(cert)))
        with pytest.raises(grpc.RpcError) as e:
            wrong_token.GetStatus(pb.StatusRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:  # plaintext against a TLS port does not get through
            stub(port).GetStatus(pb.StatusRequest(), timeout=3)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        server.stop(grace=None)
    with pytest.raises(ValueError, match="both"):
        serve(session, tls_cert=str(cert))


def test_a_starting_trainer_reports_initializing_until_attached(session):
    server, port = start_server(None, None, TOKEN, run=session.run, total_steps=6)
    try:
        s = stub(port)
        st = s.GetStatus(pb.StatusRequest(), timeout=5)
        assert st.phase == "Initializing" and st.run_name == "tiny" and st.total_steps == 6
        with pytest.raises(grpc.RpcError) as e:
            s.Register(pb.RegisterRequest(header=pb.Header(pool="bf16", worker_id="w")), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and e.value.details().startswith("trainer starting")
        publisher = WeightPublisher(keep=1)
        publisher.publish(session.version, session.weights(session.version))
        server.dcmdp_service.attach(Coordinator(session, publisher), publisher)
        reply = s.Register(pb.RegisterRequest(header=pb.Header(pool="bf16", worker_id="w")), timeout=5)
        assert reply.run_name == "tiny" and {f.name for f in reply.model_files} >= {"config.json"}
        assert not any(f.name.endswith(".safetensors") for f in reply.model_files)
        assert s.GetStatus(pb.StatusRequest(), timeout=5).phase == "Initializing"  # until the loop runs
    finally:
        server.stop(grace=None)


def test_the_largest_bucket_the_spec_allows_streams_within_the_message_limit(session):
    """``spec.trainer.weightBucketMiB`` ≤ 128: a 128 MiB chunk and its framing fit gRPC's 256 MiB
    message limit on both ends (a 160 MiB tensor: one full chunk and a partial one)."""
    from dcmdp.spec import TrainerSpec

    bucket = next(m.le for m in TrainerSpec.model_fields["weight_bucket_mib"].metadata if hasattr(m, "le")) << 20
    big = {"w": torch.randn(40 << 20, generator=torch.Generator().manual_seed(0))}  # 160 MiB of fp32
    publisher = WeightPublisher(keep=2, bucket_bytes=bucket)
    publisher.publish(0, session.weights(0))
    publisher.publish(1, big)
    server, port = start_server(Coordinator(session, publisher), publisher, TOKEN)
    try:
        tensors, stats = fetch_weights(stub(port), pb.Header(pool="bf16", worker_id="w"), 1, "fp32")
    finally:
        server.stop(grace=None)
    assert stats.total_bytes == 160 << 20 and stats.bytes == stats.total_bytes and stats.crc_errors == 0
    assert torch.equal(tensors["w"], big["w"])


def test_a_bucket_travels_in_pieces_and_a_damaged_piece_refetches_its_bucket(session, monkeypatch):
    """A 9 MiB bucket goes as pieces of 4, 4 and 1 MiB (STREAM_PIECE_BYTES); the worker assembles
    them and checks the bucket's crc32: a byte flipped in a middle piece costs that bucket again."""
    from dcmdp_trainer import weights as W

    assert W.STREAM_PIECE_BYTES == 4 << 20
    big = {"w": torch.randn(5 << 20, generator=torch.Generator().manual_seed(1))}  # 20 MiB: buckets of 9, 9, 2
    publisher = WeightPublisher(keep=2, bucket_bytes=9 << 20)
    publisher.publish(0, session.weights(0))
    publisher.publish(1, big)
    pieces, real = [], W.WeightPublisher.chunks

    def chunks(self, *args, **kwargs):
        for n, c in enumerate(real(self, *args, **kwargs)):
            pieces.append((c.offset, len(c.data)))
            if n == 1 and len(pieces) == 2:  # the first stream's second piece: the middle of bucket 0
                c = W.Chunk(c.version, c.offset, c.data[:100] + bytes([c.data[100] ^ 1]) + c.data[101:], c.crc32)
            yield c

    monkeypatch.setattr(W.WeightPublisher, "chunks", chunks)
    server, port = start_server(Coordinator(session, publisher), publisher, TOKEN)
    try:
        tensors, stats = fetch_weights(stub(port), pb.Header(pool="bf16", worker_id="w"), 1, "fp32")
    finally:
        server.stop(grace=None)
    assert pieces[:3] == [(0, 4 << 20), (4 << 20, 4 << 20), (8 << 20, 1 << 20)]
    assert stats.crc_errors == 1 and stats.bytes == stats.total_bytes + (9 << 20)  # bucket 0 came twice
    assert torch.equal(tensors["w"], big["w"])


@pytest.mark.slow
def test_a_worker_waits_for_a_busy_stream_slot_instead_of_giving_up(session):
    """Every stream slot taken (here the only one, by a reader that stalls for 11 s: longer than the
    eight retries of a failure take): the fetch waits for the slot, then completes."""
    import threading

    big = {"w": torch.randn(8 << 20, generator=torch.Generator().manual_seed(2))}  # 32 MiB: never fits gRPC's window
    publisher = WeightPublisher(keep=2, bucket_bytes=1 << 20)
    publisher.publish(0, session.weights(0))
    publisher.publish(1, big)
    server, port = start_server(Coordinator(session, publisher), publisher, TOKEN, max_streams=1)
    try:
        hog = stub(port).StreamWeights(pb.WeightRequest(header=pb.Header(pool="bf16", worker_id="hog"), version=1,
                                                        dtype="fp32"), timeout=60)
        next(hog)  # holds the slot, then reads no more
        threading.Timer(11.0, hog.cancel).start()
        events = []
        tensors, stats = fetch_weights(stub(port), pb.Header(pool="bf16", worker_id="w"), 1, "fp32",
                                       on_event=lambda what, f: events.append(what))
    finally:
        server.stop(grace=None)
    assert "stream slots busy: waiting" in events and stats.seconds >= 10
    assert torch.equal(tensors["w"], big["w"])
