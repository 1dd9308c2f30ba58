"""``dcmdp-trainer``: the DC-GRPO trainer as a gRPC server (one process; the pod of a cluster run).

    dcmdp-trainer --config run.yaml --port 50051 --metrics-port 9090 --out /checkpoints [--resume]
                  [--token-file F] [--tls-cert C --tls-key K] [--host 0.0.0.0] [--steps N]
                  [--threads T] [--ready-file F] [--linger S]

The token comes from ``--token-file``, ``$DCMDP_TOKEN_FILE`` or ``$DCMDP_TOKEN``. ``--resume``
continues from the newest checkpoint in ``--out`` when there is one (and starts fresh when there
is none, so a pod restarted by its Job resumes, and its first start begins). SIGTERM/SIGINT stop
the run at the next step boundary and write a checkpoint. Exit codes: 0 finished, 1 failed,
2 bad arguments/manifest, 143 stopped before the end. With ``WORLD_SIZE`` > 1 (torchrun's env:
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; ``dcmdp.ranks``), rank 0
serves and trains, the other ranks train with it through DeepSpeed (``distributed.py``; ZeRO stage
0, plain data parallelism, unless ``spec.trainer.deepspeed`` is enabled). The other ranks ignore
SIGTERM/SIGINT: rank 0 stops them once its final checkpoint is written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Optional

from dcmdp import jsonlog
from dcmdp.cli_args import at_least, port, threads
from dcmdp.precision import wire_dtype
from dcmdp.spec import SpecError, load_run
from dcmdp.transport.auth import TokenError, load_token
from dcmdp.transport.collective import raise_open_file_limit
from dcmdp_trainer import checkpoint
from dcmdp_trainer.checkpoint import CheckpointError
from dcmdp_trainer.coordinator import Coordinator
from dcmdp_trainer.distributed import exit_process, follow, init_distributed, session_kwargs, unsupported
from dcmdp_trainer.history import pool_lags
from dcmdp_trainer.observability import TrainerMetrics
from dcmdp_trainer.rollout_source import Stopped
from dcmdp_trainer.run_loop import RunLoop
from dcmdp_trainer.server import start_server
from dcmdp_trainer.session import Session
from dcmdp_trainer.weights import WeightPublisher


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dcmdp-trainer", description="DC-GRPO trainer gRPC server")
    ap.add_argument("--config", required=True, help="DCMDPRun manifest (YAML)")
    ap.add_argument("--port", type=port(), default=50051, help="gRPC port (0 = any free port)")
    ap.add_argument("--metrics-port", type=port(allow_off=True), default=-1, help="Prometheus port (0 = any free port, -1 = off)")
    ap.add_argument("--host", default="0.0.0.0", help="address to listen on (gRPC and metrics)")
    ap.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints, summary.json (plots: dcmdp plot DIR)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out, if any")
    ap.add_argument("--token-file", default=None, help="run token file (else $DCMDP_TOKEN_FILE / $DCMDP_TOKEN)")
    ap.add_argument("--tls-cert", default=None, help="TLS certificate (PEM); with --tls-key")
    ap.add_argument("--tls-key", default=None, help="TLS private key (PEM)")
    ap.add_argument("--steps", type=at_least(1), default=None, help="override spec.algorithm.steps")
    ap.add_argument("--threads", type=threads(), default=0, help="torch threads (0 = spec.trainer.threads or default)")
    ap.add_argument("--ready-file", default=None, help="write {port, metrics_port, step, pid} here once serving")
    ap.add_argument("--data-plane", choices=("collective", "stream"), default="collective",
                    help="how weights reach workers: a torch.distributed broadcast (gloo/NCCL; not under TLS) "
                         "with the gRPC stream as fallback, or the gRPC stream only")
    ap.add_argument("--linger", type=float, default=10.0, help="seconds to wait for workers to hear the run ended")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    log = jsonlog.setup("trainer", rank=rank)
    try:
        token = load_token(args.token_file)
        run = load_run(args.config)
    except (TokenError, SpecError) as exc:
        log.error(str(exc))
        return 2

    out = Path(args.out)
    resume = bool(args.resume and checkpoint.latest(out) is not None)
    if args.resume and not resume:
        log.info("no checkpoint to resume from: starting fresh", extra={"fields": {"out": str(out)}})
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    threads = args.threads or run.spec.trainer.threads
    why = unsupported(run, world)
    if why:
        log.error(why)
        return 2
    if run.spec.trainer.deepspeed.enabled or world > 1:
        init_distributed(run, log)
    if rank > 0:
        # rank 0 ends the followers (after the checkpoint a stop asks for, which needs them): a
        # SIGTERM to the pod (torchrun passes it on to every rank) must not end them first
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return follow(run, out, resume=resume, steps=args.steps, threads=threads, log=log)
    return serve(run, out, token=token, resume=resume, args=args, threads=threads, log=log)


def serve(run, out: Path, *, token: str, resume: bool, args, threads: int, log) -> int:
    runtime = TrainerMetrics()
    metrics_port = None
    try:
        # listen first: GetStatus answers "Initializing" during the warm start / checkpoint load
        server, port = start_server(None, None, token, host=args.host, port=args.port, tls_cert=args.tls_cert,
                                    tls_key=args.tls_key, runtime=runtime, log=log, run=run,
                                    total_steps=args.steps or run.spec.algorithm.steps)
        if args.metrics_port >= 0:
            metrics_port = runtime.serve(args.host, args.metrics_port)
    except (OSError, ValueError) as exc:
        log.error(str(exc))
        return 2
    log.info("listening", extra={"fields": {"port": port, "metrics_port": metrics_port, "tls": bool(args.tls_cert)}})
    try:
        session = Session(run, out, resume=resume, steps=args.steps, prometheus=runtime.sink, threads=threads,
                          **_distributed_kwargs(run))
    except (CheckpointError, OSError) as exc:  # no intact checkpoint, an unwritable --out: say which
        log.error(f"cannot start the run: {exc}")
        server.stop(grace=None)
        runtime.close()
        return 1
    except BaseException:
        server.stop(grace=None)
        runtime.close()
        raise
    try:
        tied = bool(getattr(session.model.config, "tie_word_embeddings", False))
        dtype_of = {p.name: wire_dtype(p.precision) for p in run.spec.rollout.pools}
        publisher = WeightPublisher(keep=session.max_lag + 1, skip=("lm_head.weight",) if tied else (),
                                    dtypes=sorted(set(dtype_of.values())), lags=pool_lags(run.spec.rollout.pools),
                                    held_elsewhere=lambda v: v in session.history,
                                    bucket_bytes=run.spec.trainer.weight_bucket_mib << 20)
        publisher.publish(session.version, session.weights(session.version))
        coord = Coordinator(session, publisher, log=log, runtime=runtime)
        publisher.pinned = lambda: lease_pins(coord, dtype_of)
        loop = RunLoop(session, coord, state=coord.state, runtime=runtime, log=log)
        # gloo has no TLS: under TLS the weights stay on the gRPC stream
        collective = args.data_plane == "collective" and not args.tls_cert
        if collective:
            raise_open_file_limit()  # (the broadcast groups' sockets)
        server.dcmdp_service.attach(coord, publisher, broadcast_host=args.host if collective else None)
        log.info("serving", extra={"fields": {"port": port, "metrics_port": metrics_port, "step": session.step,
                                              "version": session.version, "resumed": resume,
                                              "tls": bool(args.tls_cert), "out": str(out),
                                              "data_plane": "collective" if collective else "stream",
                                              "weight_bucket_mib": run.spec.trainer.weight_bucket_mib}})
        if args.ready_file:
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_text(json.dumps({"port": port, "metrics_port": metrics_port, "step": session.step,
                                       "pid": os.getpid()}))
            os.replace(tmp, args.ready_file)
    except Exception as exc:
        log.exception(f"cannot start serving: {type(exc).__name__}: {exc}")
        server.stop(grace=None)
        runtime.close()
        return 1

    def on_signal(signum, frame):
        log.info("stop requested", extra={"fields": {"signal": signal.Signals(signum).name}})
        coord.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        loop.run()
    except Stopped:
        code = 143
    except Exception:  # a failure of the run itself (the loop's state says Failed): checkpoint what we have
        log.exception("run failed")
        code = 1
    finally:
        # every exit path stops the server (its threads would keep the process alive) and a
        # failure of the final writes (read-only or full disk) is an exit code 1 with its cause
        summary: dict = {}
        try:
            if coord.finished:
                coord.wait_workers_told(args.linger)
            summary = session.close()
            loop.state.update(checkpoint_step=session.step)
        except Exception as exc:
            log.exception(f"the final checkpoint/summary could not be written: {type(exc).__name__}: {exc}")
            code = 1
        try:
            _distributed_done(session)
        except Exception as exc:
            log.exception(f"stopping the other ranks failed: {type(exc).__name__}: {exc}")
            code = 1
        server.stop(grace=1.0).wait()
        runtime.close()
        log.info("trainer exits", extra={"fields": {"code": code, "steps": summary.get("steps"),
                                                    "lambdas": summary.get("lambdas")}})
    return code


def lease_pins(coord, dtype_of: dict[str, str]) -> set[tuple[int, str]]:
    """(version, wire dtype) a worker may still be sent to fetch: what leases and queued evaluation
    items name, and the coordinator's current version (a lease may still name it while a newer one
    is being published)."""
    with coord.cond:
        named = coord.book.named_versions()
        current = coord.version
    return {(v, dtype_of[pool]) for pool, v in named if pool in dtype_of} | {(current, d) for d in dtype_of.values()}


def _distributed_kwargs(run) -> dict:
    if run.spec.trainer.deepspeed.enabled or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return session_kwargs(run)
    return {}


def _distributed_done(session) -> None:
    learner = getattr(session, "learner", None)
    if learner is not None and hasattr(learner, "shutdown"):
        learner.shutdown()


if __name__ == "__main__":
    exit_process(main())  # a rank of a process group skips the interpreter's teardown (see there)
