"""The rollout worker loop: register, pull weights, lease prompts, sample, submit; survive restarts.

    register ─► fetch the newest weights (pool dtype) ─► build the engine
       └─► loop: AcquireLease ─► (version changed? receive + load) ─► generate ─► SubmitRollouts
                 until the lease says the run is finished

Weights come over the trainer's broadcast (``JoinBroadcast``, the collective data plane) when it
offers one, else (or for what a broadcast lost) over the gRPC stream; an engine that loads in
place (``begin_update``/``load_partial``/``finish_update``) takes each bucket as it arrives. The
worker samples only between updates, and an update that fails midway leaves ``version`` at -1, so
the next lease loads a whole version again before anything is sampled.

A trainer that goes away (restart, network) is retried with exponential backoff (0.2 s … 5 s);
the worker registers again when it comes back and carries on with the weights it has. It gives
up only after ``give_up_after`` seconds without reaching the trainer. A wrong token or an
unknown pool is not retried: the worker exits with code 2.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import grpc

from dcmdp.engine import RolloutEngine, SamplingParams, make_engine
from dcmdp.precision import wire_dtype
from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.proto import dcmdp_pb2_grpc
from dcmdp.spec import parse_run
from dcmdp.transport.channel import open_channel
from dcmdp_rollout.observability import WorkerMetrics
from dcmdp_rollout.broadcast_link import BroadcastLink
from dcmdp_rollout.weights import WeightFetchError, fetch_weights, receive_broadcast

FATAL = {grpc.StatusCode.UNAUTHENTICATED: "the trainer rejected the run token",
         grpc.StatusCode.NOT_FOUND: "the trainer does not know this pool",
         grpc.StatusCode.INVALID_ARGUMENT: "the trainer rejected the request",
         grpc.StatusCode.PERMISSION_DENIED: "permission denied"}
EXIT_OK, EXIT_ERROR, EXIT_FATAL, EXIT_UNREACHABLE = 0, 1, 2, 3
RPC_TIMEOUT = 60.0


class Worker:
    def __init__(self, target: str, pool: str, token: str, *, worker_id: str, tls_ca: Optional[str] = None,
                 server_name: Optional[str] = None, threads: int = 0, give_up_after: float = 300.0,
                 engine_options: Optional[dict[str, Any]] = None,
                 metrics: Optional[WorkerMetrics] = None, log=None, data_plane: bool = True):
        self.target, self.pool, self.worker_id = target, pool, worker_id
        self.channel = open_channel(target, token, tls_ca=tls_ca, server_name=server_name)
        self.stub = dcmdp_pb2_grpc.TrainerStub(self.channel)
        self.threads = threads
        self.give_up_after = give_up_after
        self.data_plane = data_plane
        self.link = BroadcastLink()  # the broadcast group and buffers kept between versions
        self.host = target.rsplit(":", 1)[0].strip("[]")
        self.engine_options = dict(engine_options or {})
        self.metrics = metrics or WorkerMetrics(pool, worker_id)
        self.log = log
        self.engine: Optional[RolloutEngine] = None
        self.version = -1  # the weight version in the engine
        self.run_name: Optional[str] = None
        self.pool_spec = None
        self.seed = 0
        self.model_dir: Optional[Path] = None
        self.dtype = "fp32"
        self.leases_done = 0
        self.trainer_instance = ""  # the trainer process this worker registered with
        self.failing_since: Optional[float] = None
        self.stop = False

    def _log(self, level: str, msg: str, **fields: Any) -> None:
        if self.log:
            getattr(self.log, level)(msg, extra={"fields": fields})

    def header(self, version: Optional[int] = None) -> pb.Header:
        return pb.Header(weight_version=self.version if version is None else version, pool=self.pool,
                         worker_id=self.worker_id)

    # -- life cycle ------------------------------------------------------------------------------
    def run(self) -> int:
        backoff = 0.2
        try:
            while not self.stop:
                try:
                    self._register()
                    backoff = 0.2
                    self._loop()
                    return EXIT_OK
                except (grpc.RpcError, WeightFetchError) as exc:
                    # a weight fetch that gave up (the trainer went away mid-sync) is the trainer
                    # unreachable too: retry and register again, as after a failed call
                    code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                    details = (exc.details() or "") if isinstance(exc, grpc.RpcError) else str(exc)
                    if code in FATAL:
                        self._log("error", FATAL[code], code=code.name, details=details)
                        return EXIT_FATAL
                    now = time.monotonic()
                    if code == grpc.StatusCode.UNAVAILABLE and details.startswith("trainer starting"):
                        self._log("info", "trainer starting: waiting", target=self.target)
                        self.failing_since = None  # it answers: not unreachable
                        time.sleep(1.0)
                        continue
                    self.failing_since = self.failing_since or now
                    if now - self.failing_since > self.give_up_after:
                        self._log("error", "trainer unreachable: giving up", target=self.target,
                                  seconds=round(now - self.failing_since, 1), code=code.name)
                        return EXIT_UNREACHABLE
                    self.metrics.reconnects.inc()
                    why = {"error": str(exc).splitlines()[0][:200]} if isinstance(exc, WeightFetchError) else {}
                    self._log("warning", "trainer unreachable: retrying", target=self.target, code=code.name,
                              backoff_s=backoff, **why)
                    time.sleep(backoff)
                    backoff = min(5.0, backoff * 2)
            return EXIT_OK
        finally:
            self.close()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.model_dir is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)
            self.model_dir = None
        self.link.close()
        self.channel.close()

    def _register(self) -> None:
        engine = self.pool_spec.engine if self.pool_spec else ""
        precision = self.pool_spec.precision if self.pool_spec else ""
        reply = self.stub.Register(pb.RegisterRequest(header=self.header(), engine=engine, precision=precision),
                                   timeout=RPC_TIMEOUT)
        self.failing_since = None
        if self.run_name is not None and reply.run_name != self.run_name:
            raise RuntimeError(f"the trainer now serves run {reply.run_name!r}, not {self.run_name!r}")
        first = self.run_name is None
        self.run_name = reply.run_name
        self.trainer_instance = reply.header.trainer_instance
        run = parse_run(json.loads(reply.manifest_json), "the trainer's manifest")
        self.pool_spec = next(p for p in run.spec.rollout.pools if p.name == self.pool)
        self.seed = run.spec.algorithm.seed
        self.dtype = wire_dtype(self.pool_spec.precision)
        if self.model_dir is None:
            self.model_dir = Path(tempfile.mkdtemp(prefix=f"dcmdp-{self.pool}-"))
            for f in reply.model_files:
                if "/" in f.name or f.name.startswith("."):
                    raise ValueError(f"refusing model file name {f.name!r}")
                (self.model_dir / f.name).write_bytes(f.content)
        self._log("info", "registered" if first else "registered again", run=reply.run_name, pool=self.pool,
                  engine=self.pool_spec.engine, precision=self.pool_spec.precision, wire_dtype=self.dtype,
                  trainer_version=reply.weight_version)
        if self.engine is None:
            self._sync(reply.weight_version)

    # -- weights ---------------------------------------------------------------------------------
    def _sync(self, version: int) -> None:
        t0 = time.perf_counter()

        def on_event(what: str, fields: dict) -> None:
            self._log("warning", what, **fields)

        in_place = self.engine is not None and hasattr(self.engine, "load_partial")
        sink, slices = None, False
        if in_place:
            self.version = -1  # fenced: a failure from here on leaves no usable version
            self.engine.begin_update()
            slices = hasattr(self.engine, "load_slices")  # bucket pieces written in place, never assembled
            sink = self.engine.load_slices if slices else self.engine.load_partial
        ticket = self._join(version)
        if ticket is not None and ticket.group:
            tensors, stats = receive_broadcast(self.stub, self.header(), ticket, self.host, sink=sink, slices=slices,
                                               timeout=600.0, on_event=on_event, link=self.link)
        else:
            tensors, stats = fetch_weights(self.stub, self.header(), version, self.dtype, sink=sink, slices=slices,
                                           timeout=600.0, on_event=on_event)
        self.metrics.sync_bytes.inc(stats.bytes)
        self.metrics.crc_errors.inc(stats.crc_errors)
        self.metrics.resumes.inc(stats.resumes)
        fetch_s = time.perf_counter() - t0
        if self.engine is None:
            self.engine = self._build_engine(tensors)
        elif in_place:
            self.engine.finish_update(stats.version)
        else:
            self.engine.load_weights(tensors, stats.version)
        self.version = stats.version
        seconds = time.perf_counter() - t0
        self.metrics.sync_s.observe(seconds)
        self.metrics.version.set(self.version)
        self._log("info", "weights loaded", version=self.version, dtype=self.dtype, bytes=stats.bytes,
                  fetch_s=round(fetch_s, 4), total_s=round(seconds, 4), crc_errors=stats.crc_errors,
                  resumes=stats.resumes, broadcast_bytes=stats.broadcast_bytes, refetched=stats.refetched,
                  ring=stats.ring)

    def _join(self, version: int) -> Optional[pb.BroadcastTicket]:
        """A ticket to the trainer's broadcast of ``version``, or None (stream it)."""
        if not self.data_plane:
            return None
        try:
            return self.stub.JoinBroadcast(pb.WeightRequest(header=self.header(), version=version, dtype=self.dtype,
                                                            held_group=self.link.held), timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self.data_plane = False  # an older trainer: the stream only
            return None

    def _build_engine(self, tensors) -> RolloutEngine:
        from safetensors.torch import save_file

        assert self.model_dir is not None and self.pool_spec is not None
        save_file({k: v.clone() for k, v in tensors.items()}, str(self.model_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        options = dict(self.engine_options)
        if self.pool_spec.engine == "hf":
            options.setdefault("device", self.pool_spec.device)
            options.setdefault("quant_group_size", self.pool_spec.quant_group_size)
        if self.pool_spec.engine == "vllm":
            options.setdefault("tensor_parallel_size", self.pool_spec.tensor_parallel_size)
        if self.pool_spec.engine == "hf" and self.threads:
            options.setdefault("threads", self.threads)
        engine = make_engine(self.pool_spec.engine, str(self.model_dir), self.pool_spec.precision,
                             noise=self.pool_spec.noise, seed=self.seed, options=options)
        self._log("info", "engine ready", engine=self.pool_spec.engine, precision=self.pool_spec.precision)
        return engine

    # -- work ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stop:
            lease = self.stub.AcquireLease(pb.LeaseRequest(header=self.header()), timeout=RPC_TIMEOUT)
            self.failing_since = None
            restarted = lease.header.trainer_instance
            if restarted and self.trainer_instance and restarted != self.trainer_instance:
                # a new trainer process (restarted from its checkpoint) that this worker never saw
                # fail: its weight fetches may have resumed across the restart. Register again, as
                # after an error (same run, else stop); the lease is not taken: ask again.
                self._log("warning", "trainer restarted: registering again", target=self.target)
                self._register()
                continue
            if lease.finished:
                self._log("info", "run finished: exiting", leases=self.leases_done)
                return
            if not lease.lease_id:
                time.sleep(max(0, lease.retry_after_ms) / 1000)
                continue
            version = lease.header.weight_version
            if version != self.version:
                try:
                    self._sync(version)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    self._log("warning", "lease names weights the trainer no longer has: dropping it",
                              lease=lease.lease_id, version=version)
                    continue
            self._sample_and_submit(lease)

    def _sample_and_submit(self, lease: pb.Lease) -> None:
        assert self.engine is not None
        prompts = [list(p.token_ids) for p in lease.prompts]
        indices = [p.index for p in lease.prompts]
        params = SamplingParams(n=lease.group_size, max_new_tokens=lease.max_new_tokens,
                                temperature=lease.temperature, seed=lease.seed)
        t0 = time.perf_counter()
        samples = self.engine.generate(prompts, indices, params)
        seconds = time.perf_counter() - t0
        tokens = sum(len(s.response_ids) for s in samples)
        batch = pb.RolloutBatch(
            header=self.header(self.version), lease_id=lease.lease_id, sampling_seconds=seconds,
            generated_tokens=tokens,
            samples=[pb.Sample(prompt_index=s.prompt_index, response_ids=s.response_ids, logprobs=s.logprobs,
                               finish_reason=s.finish_reason) for s in samples])
        reply = self.stub.SubmitRollouts(batch, timeout=RPC_TIMEOUT)
        self.leases_done += 1
        self.metrics.leases.inc()
        self.metrics.tokens.inc(tokens)
        self.metrics.sampling_s.observe(seconds)
        self.metrics.tokens_per_s.set(tokens / max(seconds, 1e-9))
        if not reply.accepted:
            self.metrics.rejected(reply.reason.split(":")[0])
            self._log("warning", "submission rejected", lease=lease.lease_id, reason=reply.reason,
                      step=lease.step)
        else:
            self._log("debug", "lease done", lease=lease.lease_id, step=lease.step, eval=lease.eval,
                      version=self.version, tokens=tokens, sampling_s=round(seconds, 4))
