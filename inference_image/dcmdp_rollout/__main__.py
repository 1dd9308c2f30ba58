"""``dcmdp-rollout``: one rollout worker of one pool (a pod of a pool's Deployment in a cluster).

    dcmdp-rollout --trainer HOST:PORT --pool NAME [--replica I] [--worker-id ID]
                  [--token-file F] [--tls-ca CA] [--server-name NAME] [--metrics-port M]
                  [--threads T] [--give-up-after S] [--data-plane collective|stream] [--engine-option K=V ...]

The token comes from ``--token-file``, ``$DCMDP_TOKEN_FILE`` or ``$DCMDP_TOKEN``; the worker id from
``--worker-id``, ``$DCMDP_WORKER_ID`` (the pod name) or pool/replica/host/pid. Exit codes: 0 the run
finished, 1 error, 2 rejected (token, pool, arguments), 3 the trainer stayed unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from typing import Any, Optional

from dcmdp.cli_args import at_least, port, positive_seconds, threads


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--engine-option wants KEY=VALUE (got {text!r})")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dcmdp-rollout", description="dcmdp rollout worker")
    ap.add_argument("--trainer", required=True, help="trainer gRPC address HOST:PORT")
    ap.add_argument("--pool", default=os.environ.get("DCMDP_POOL"), help="rollout pool name (or $DCMDP_POOL)")
    ap.add_argument("--replica", type=at_least(0), default=0, help="replica index within the pool (for the worker id)")
    ap.add_argument("--worker-id", default=os.environ.get("DCMDP_WORKER_ID"), help="unique worker id")
    ap.add_argument("--token-file", default=None, help="run token file (else $DCMDP_TOKEN_FILE / $DCMDP_TOKEN)")
    ap.add_argument("--tls-ca", default=None, help="CA (or self-signed certificate) to verify the trainer's TLS")
    ap.add_argument("--server-name", default=None, help="TLS name to expect (when HOST differs from the certificate)")
    ap.add_argument("--metrics-port", type=port(allow_off=True), default=-1, help="Prometheus port (0 = any free port, -1 = off)")
    ap.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics endpoint")
    ap.add_argument("--threads", type=threads(), default=0, help="torch threads (0 = default)")
    ap.add_argument("--give-up-after", type=positive_seconds, default=300.0, help="seconds without the trainer before exiting")
    ap.add_argument("--data-plane", choices=("collective", "stream"), default="collective",
                    help="receive weights over the trainer's broadcast when it offers one (else the gRPC stream), "
                         "or always over the gRPC stream")
    ap.add_argument("--engine-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="engine option, e.g. weight_sync=restart (repeatable)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from dcmdp import jsonlog
    from dcmdp.transport.auth import TokenError, load_token

    if not args.pool:
        print("dcmdp-rollout: --pool (or $DCMDP_POOL) is required", file=sys.stderr)
        return 2
    worker_id = args.worker_id or f"{args.pool}-{args.replica}-{socket.gethostname()}-{os.getpid()}"
    log = jsonlog.setup("rollout", pool=args.pool, worker=worker_id)
    try:
        token = load_token(args.token_file)
    except TokenError as exc:
        log.error(str(exc))
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from dcmdp_rollout.observability import WorkerMetrics
    from dcmdp_rollout.worker import Worker

    metrics = WorkerMetrics(args.pool, worker_id)
    if args.metrics_port >= 0:
        port = metrics.serve(args.metrics_host, args.metrics_port)
        log.info("metrics", extra={"fields": {"port": port}})
    worker = Worker(args.trainer, args.pool, token, worker_id=worker_id, tls_ca=args.tls_ca,
                    server_name=args.server_name, threads=args.threads, give_up_after=args.give_up_after,
                    data_plane=args.data_plane == "collective", engine_options=dict(args.engine_option), metrics=metrics, log=log)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return worker.run()
    except KeyboardInterrupt:
        log.info("stopped by signal")
        return 143
    except Exception:
        log.exception("worker failed")
        return 1
    finally:
        metrics.close()


if __name__ == "__main__":
    sys.exit(main())
