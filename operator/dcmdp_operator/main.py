"""``dcmdp-operator``: run the DCMDPRun controller.

    dcmdp-operator --all-namespaces
    dcmdp-operator --namespace team-a --namespace team-b --metrics-port 8000

Equivalent to ``kopf run --standalone -m dcmdp_operator.handlers`` plus a Prometheus endpoint.
Credentials: the pod's service account, else $KUBECONFIG / ~/.kube/config.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from . import config as _config


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dcmdp-operator", description="The DCMDPRun Kubernetes operator (kopf).")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; glob patterns as in kopf)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("DCMDP_METRICS_PORT") or 8000),
                   help="Prometheus /metrics port (0 = off; default 8000)")
    p.add_argument("--metrics-address", default="0.0.0.0")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", metavar="URL",
                   help="kopf's health endpoint, for liveness and readiness probes ('' = off)")
    p.add_argument("--poll-seconds", type=float, default=None,
                   help=f"trainer status poll period (default $DCMDP_POLL_SECONDS or {_config.CONFIG.poll_seconds})")
    p.add_argument("--trainer-address", default=None, metavar="TEMPLATE",
                   help="where to reach a run's trainer, with {run} {namespace} {port} "
                        "(default: the in-cluster DNS name; 127.0.0.1:50051 with a port-forward)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        env = [n.strip() for n in os.environ.get("DCMDP_WATCH_NAMESPACES", "").split(",") if n.strip()]
        if env:
            args.namespace = env
        else:
            p.error("pass --namespace NS (repeatable) or --all-namespaces (or set DCMDP_WATCH_NAMESPACES)")
    if args.poll_seconds is not None and not args.poll_seconds > 0:
        p.error("--poll-seconds must be > 0")
    if not 0 <= args.metrics_port <= 65535:
        p.error("--metrics-port must be 0..65535")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # the operator extra: `dcmdp-operator --help` works without it
    import kopf

    if args.poll_seconds is not None:
        _config.CONFIG.poll_seconds = args.poll_seconds
    if args.trainer_address:
        _config.CONFIG.trainer_address = args.trainer_address
        _config.CONFIG.trainer_target("run", "ns")  # fail now on a bad template
    kopf.configure(debug=args.debug, verbose=args.verbose)
    os.environ.pop("DCMDP_METRICS_PORT", None)  # read above; handlers must not open it a second time

    from . import handlers, metrics  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
