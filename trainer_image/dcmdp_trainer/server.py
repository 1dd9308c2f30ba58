"""The trainer's gRPC service: the wire face of the :class:`Coordinator` (the remote rollout source) and
the weight publisher.

Each RPC translates messages to the coordinator's plain calls and back; nothing here decides
anything. A bad message is rejected with a reason (SubmitReply.reason) or a status code, counted,
and the server goes on. The run token is checked before any handler runs (``dcmdp.transport``).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Optional

import grpc

from dcmdp.engine import Sample
from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.proto import dcmdp_pb2_grpc
from dcmdp.spec import dump_run
from dcmdp.transport.buckets import WIRE_DTYPES, WeightCastError
from dcmdp.transport.channel import MAX_MESSAGE_BYTES, SERVER_RECEIVE_BYTES, bind, make_server
from dcmdp.transport.collective import peer_address
from dcmdp_trainer.broadcast import BroadcastHub
from dcmdp_trainer.coordinator import Coordinator, Rejected
from dcmdp_trainer.status_snapshot import to_proto
from dcmdp_trainer.stream_guard import Slots, StallWatchdog
from dcmdp_trainer.weights import WeightPublisher, WeightsUnavailable
from dcmdp_trainer.worker_registry import TooManyWorkers

# header.worker_id's longest accepted length (a Kubernetes object name's, DNS-1123 subdomain)
MAX_WORKER_ID = 253

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LONG_POLL_S = 2.0
MAX_WORKERS = 32  # server threads
MAX_STREAMS = 8  # concurrent weight streams (each holds a thread and one bucket buffer)
STALL_S = 30.0  # a weight stream that hands gRPC no chunk for this long is cancelled
MAX_TOKENS_PER_SAMPLE = 4096  # the spec's bound on task.maxNewTokens
BYTES_PER_TOKEN = 16  # a token id (varint, ≤ 5 bytes) and its log p (4 bytes), with room to spare


def submission_bytes(run) -> int:
    """The largest SubmitRollouts a worker of ``run`` can legitimately send (bytes): the largest
    work item (a training lease of ``batchPrompts`` × ``groupSize`` samples, or an evaluation lease
    of ``heldOut`` samples) × the longest response, plus per-sample framing. The trainer's receive
    limit is the larger of this and :data:`SERVER_RECEIVE_BYTES`."""
    spec = run.spec
    per_lease = max((spec.rollout.batch_prompts or spec.algorithm.mini_batch_size) * spec.algorithm.group_size,
                    spec.task.held_out)
    tokens = spec.task.max_new_tokens or MAX_TOKENS_PER_SAMPLE
    return per_lease * (tokens * BYTES_PER_TOKEN + 64) + (64 << 10)


def model_files(folder: Path) -> list[pb.ModelFile]:
    """The model folder's small files (config, tokenizer): everything but the weights."""
    out = []
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            out.append(pb.ModelFile(name=f.name, content=f.read_bytes()))
    return out


MAX_DETAILS = 1000  # characters of a status message


def abort(context, code: grpc.StatusCode, details: str) -> None:
    """``context.abort`` with ``details`` cut to :data:`MAX_DETAILS` characters: a status message
    travels in a header (gRPC refuses headers over 16 KiB, turning the answer into an unrelated
    RESOURCE_EXHAUSTED), and some messages quote what the caller sent."""
    if len(details) > MAX_DETAILS:
        details = details[:MAX_DETAILS - 3] + "..."
    context.abort(code, details)


class TrainerService(dcmdp_pb2_grpc.TrainerServicer):
    """Serves from the moment the port is bound: until :meth:`attach` (the warm start and the
    checkpoint load happen in between) ``GetStatus`` answers phase ``Initializing`` and every
    other call ``UNAVAILABLE`` with details starting "trainer starting" (workers wait, and do not
    count it as the trainer being unreachable)."""

    def __init__(self, coord: Optional[Coordinator] = None, publisher: Optional[WeightPublisher] = None, *,
                 run=None, total_steps: int = 0, runtime=None, log=None, long_poll_s: float = LONG_POLL_S,
                 long_poll_slots: int = 16, max_streams: int = MAX_STREAMS, stall_s: float = STALL_S,
                 hub: Optional[BroadcastHub] = None):
        self.runtime = runtime
        self.hub = hub
        self.streams = Slots(max_streams)
        self.watchdog = StallWatchdog(stall_s, tick_s=min(0.5, stall_s / 4), on_stall=self._stalled)
        self.log = log
        self.long_poll_s = long_poll_s
        # Long polls hold a server thread for up to long_poll_s: beyond this many at once, a lease
        # request is answered at once (retry_after_ms), so GetStatus and submissions always find a thread.
        self.long_polls = threading.BoundedSemaphore(long_poll_slots)
        self.run, self.total_steps = run, total_steps
        self.started = time.time()
        self.instance = secrets.token_hex(8)  # in every reply header: workers notice a restarted trainer
        self.coord: Optional[Coordinator] = None
        if coord is not None:
            self.attach(coord, publisher)

    def attach(self, coord: Coordinator, publisher: WeightPublisher, hub: Optional[BroadcastHub] = None,
               broadcast_host: Optional[str] = None) -> None:
        """Start serving ``coord``; weights over ``hub`` (or a hub on ``broadcast_host``) when given,
        else over the gRPC stream only."""
        if hub is None and broadcast_host is not None:
            hub = BroadcastHub(publisher, broadcast_host, expected=coord.workers_receiving, on_round=self._round)
        session = coord.session
        manifest = dump_run(session.run)
        manifest["spec"]["algorithm"]["steps"] = session.total_steps
        self.manifest_json = json.dumps(manifest)
        self.files = model_files(session.model_dir)
        self.publisher = publisher
        self.hub = hub or self.hub
        self.coord = coord

    def _pool_label(self, pool: str) -> str:
        """A worker-supplied pool name as a metric label: one of the run's pools, else "unknown"
        (every distinct label value is a series the trainer keeps: a caller's strings must not
        make them grow without bound)."""
        return pool if self.coord is not None and pool in self.coord.pools else "unknown"

    def _round(self, r) -> None:
        if self.runtime:
            for pool in r.pools:  # the bytes each receiving worker was sent
                self.runtime.weights_served(self._pool_label(pool), r.dtype, r.bytes, r.seconds)
        if self.log:
            self.log.info("weights broadcast", extra={"fields": {**vars(r), "pools": list(r.pools)}})

    def _stalled(self, what: str) -> None:
        if self.log:
            self.log.warning("weight stream stalled: cancelled", extra={"fields": {"stream": what}})

    def _ready(self, context) -> Coordinator:
        coord = self.coord
        if coord is None:
            abort(context, grpc.StatusCode.UNAVAILABLE, "trainer starting (warm start / checkpoint load): retry")
        return coord

    def _header(self, h: pb.Header, version: Optional[int] = None) -> pb.Header:
        return pb.Header(weight_version=self.coord.version if version is None else version,
                         pool=h.pool, worker_id=h.worker_id, trainer_instance=self.instance)

    @staticmethod
    def _check_worker(h: pb.Header, context) -> None:
        """header.worker_id must be 1..MAX_WORKER_ID printable ASCII characters without spaces (as a
        Kubernetes pod name is): else INVALID_ARGUMENT naming the field."""
        wid = h.worker_id
        if not wid or len(wid) > MAX_WORKER_ID or not all("!" <= c <= "~" for c in wid):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          f"header.worker_id must be 1 to {MAX_WORKER_ID} printable ASCII characters without "
                          f"spaces (got {len(wid)} characters: {wid[:32]!r}{'...' if len(wid) > 32 else ''})")

    def Register(self, request, context):
        self._ready(context)
        h = request.header
        if not h.worker_id or not h.pool:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "header.worker_id and header.pool are required")
        self._check_worker(h, context)
        try:
            self.coord.register(h.worker_id, h.pool, request.engine, request.precision)
        except KeyError as exc:
            abort(context, grpc.StatusCode.NOT_FOUND, exc.args[0])
        except TooManyWorkers as exc:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return pb.RegisterReply(header=self._header(h), run_name=self.coord.session.run.metadata.name,
                                manifest_json=self.manifest_json, model_files=self.files,
                                weight_version=self.coord.version)

    def AcquireLease(self, request, context):
        self._ready(context)
        h = request.header
        self._check_worker(h, context)
        try:
            polling = self.long_polls.acquire(blocking=False)
            try:
                rec, finished = self.coord.acquire(h.worker_id, h.pool, h.weight_version,
                                                   wait=self.long_poll_s if polling else 0.0)
            finally:
                if polling:
                    self.long_polls.release()
        except KeyError as exc:
            abort(context, grpc.StatusCode.NOT_FOUND, exc.args[0])
        except TooManyWorkers as exc:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if finished:
            return pb.Lease(header=self._header(h), finished=True)
        if rec is None:  # no work: ask again soon (later when the long-poll budget is spent)
            return pb.Lease(header=self._header(h), retry_after_ms=50 if polling else 500)
        item = rec.item
        ttl = max(0.0, rec.expires - self.coord.clock())
        return pb.Lease(
            header=self._header(h, rec.version), lease_id=rec.lease_id,
            prompts=[pb.Prompt(index=p.index, token_ids=p.ids) for p in item.prompts],
            group_size=item.n, max_new_tokens=item.max_new_tokens,
            temperature=self.coord.algo.temperature if item.temperature is None else item.temperature, seed=item.seed,
            expires_unix_ms=int((time.time() + ttl) * 1000), eval=item.is_eval, step=item.step)

    def SubmitRollouts(self, request, context):
        self._ready(context)
        h = request.header
        self._check_worker(h, context)
        samples = [Sample(s.prompt_index, list(s.response_ids), list(s.logprobs), s.finish_reason or "stop")
                   for s in request.samples]
        try:
            n = self.coord.submit(h.worker_id, h.pool, request.lease_id, h.weight_version, samples,
                                  request.sampling_seconds, request.generated_tokens)
        except TooManyWorkers as exc:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Rejected as exc:
            if self.log:
                self.log.warning("submission rejected", extra={"fields": {
                    "worker": h.worker_id, "pool": h.pool, "lease": request.lease_id, "reason": str(exc)}})
            return pb.SubmitReply(header=self._header(h), accepted=False, reason=str(exc))
        return pb.SubmitReply(header=self._header(h), accepted=True, accepted_samples=n)

    def _prepared(self, request, context):
        """The snapshot a WeightRequest names, after the checks every weight RPC shares
        (:meth:`WeightPublisher.check_request`): an invalid field is INVALID_ARGUMENT naming it."""
        try:
            self.publisher.check_request(request.version, request.offset, request.chunk_size, request.length)
        except ValueError as exc:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            prep = self.publisher.prepared(request.version, request.dtype or "fp32")
            self.publisher.check_offset(prep, request.offset)
            return prep
        except WeightsUnavailable as exc:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except WeightCastError as exc:  # the trainer's weights overflow the wire dtype: nothing is sent
            if self.log:
                self.log.error("weights not castable", extra={"fields": {"reason": str(exc)}})
            abort(context, grpc.StatusCode.INTERNAL, str(exc))
        except ValueError as exc:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _manifest(self, h: pb.Header, prep) -> pb.WeightManifest:
        lay = prep.layout
        return pb.WeightManifest(
            header=self._header(h, prep.version), version=prep.version, dtype=lay.dtype,
            tensors=[pb.TensorInfo(name=e.name, shape=list(e.shape), dtype=e.dtype, offset=e.offset, nbytes=e.nbytes)
                     for e in lay.entries],
            total_bytes=lay.total_bytes, chunk_size=lay.bucket_bytes)

    def GetWeightManifest(self, request, context):
        self._ready(context)
        return self._manifest(request.header, self._prepared(request, context))

    def JoinBroadcast(self, request, context):
        """A ticket to the broadcast of (version, dtype); an empty group says: stream it."""
        self._ready(context)
        prep = self._prepared(request, context)
        ticket = (self.hub.join(prep.version, prep.layout.dtype, request.header.pool or "?",
                                worker=request.header.worker_id, held=request.held_group,
                                address=peer_address(context.peer()))
                  if self.hub is not None else None)
        reply = pb.BroadcastTicket(header=self._header(request.header, prep.version),
                                   manifest=self._manifest(request.header, prep))
        if ticket is not None:
            reply.group, reply.rank, reply.world_size = ticket.group, ticket.rank, ticket.world_size
            reply.store_port, reply.backend = self.hub.port, ticket.backend
            reply.timeout_ms = int(self.hub.timeout_s * 1000)
            reply.join_timeout_ms = int(self.hub.join_timeout_s * 1000)
            reply.part_bytes = ticket.part_bytes
            reply.proof = ticket.proof
            if ticket.ring is not None:  # every joiner may be on this machine: offer the shared-memory ring
                reply.ring, reply.ring_nonce, reply.ring_slots = ticket.ring.name, ticket.ring.nonce, ticket.ring.slots
                reply.ring_slot_bytes = ticket.ring.slot_bytes
        return reply

    def StreamWeights(self, request, context):
        self._ready(context)
        prep = self._prepared(request, context)  # aborts with the right code when it cannot be served
        if not self.streams.take():
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.streams.limit} weight streams are being served: retry")
        key = self.watchdog.watch(f"{request.header.worker_id}/v{prep.version}/{request.dtype}", context.cancel)
        t0, sent = time.perf_counter(), 0
        try:
            for c in self.publisher.chunks(prep.version, request.dtype or "fp32", request.offset, request.chunk_size,
                                           request.length):
                sent += len(c.data)
                yield pb.WeightChunk(version=c.version, offset=c.offset, data=c.data, crc32=c.crc32)
                self.watchdog.progress(key)
        except WeightsUnavailable as exc:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        finally:
            self.watchdog.done(key)
            self.streams.give()
            if self.runtime:
                dtype = request.dtype or "fp32"
                self.runtime.weights_served(self._pool_label(request.header.pool),
                                            dtype if dtype in WIRE_DTYPES else "unknown", sent,
                                            time.perf_counter() - t0)

    def GetStatus(self, request, context):
        if self.coord is None:
            name = self.run.metadata.name if self.run is not None else ""
            return pb.Status(header=pb.Header(), run_name=name, phase="Initializing", total_steps=self.total_steps,
                             message="warm start / checkpoint load", updated_unix_ms=int(self.started * 1000))
        return to_proto(self.coord.snapshot())


def start_server(coord: Optional[Coordinator], publisher: Optional[WeightPublisher], token: str, *,
                 host: str = "127.0.0.1", port: int = 0, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None, runtime=None, log=None, max_workers: int = MAX_WORKERS, run=None,
                 total_steps: int = 0, **limits) -> tuple[grpc.Server, int]:
    """A started server; returns (server, bound port). With ``coord`` None it serves as starting
    until ``server.dcmdp_service.attach(coord, publisher)``. Its receive limit is
    :func:`submission_bytes` of ``run`` (at least 4 MiB); at most ``max_workers // 2`` lease
    requests long-poll at once (the rest are answered at once); ``dcmdp.transport.channel`` sets
    the other limits. ``limits``: ``max_streams``, ``stall_s``, ``long_poll_s``, ``hub`` (the
    broadcast data plane) of :class:`TrainerService`."""

    def rejected(method: str, reason: str) -> None:
        if runtime:
            runtime.auth_rejected(method, reason)
        if log:
            log.warning("call rejected", extra={"fields": {"method": method, "reason": reason}})

    receive = SERVER_RECEIVE_BYTES
    if run is not None:
        receive = min(max(receive, submission_bytes(run)), MAX_MESSAGE_BYTES)
    workers = sum(p.replicas for p in run.spec.rollout.pools) if run is not None else 0
    server = make_server(token, max_workers=max_workers, on_reject=rejected, max_receive=receive,
                         max_concurrent_rpcs=4 * (max_workers + workers))
    service = TrainerService(coord, publisher, run=run, total_steps=total_steps, runtime=runtime, log=log,
                             long_poll_slots=max(1, max_workers // 2), **limits)
    dcmdp_pb2_grpc.add_TrainerServicer_to_server(service, server)
    bound = bind(server, host, port, tls_cert=tls_cert, tls_key=tls_key)
    server.start()
    server.dcmdp_service = service  # type: ignore[attr-defined]
    return server, bound
