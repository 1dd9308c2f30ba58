#!/usr/bin/env python3
"""Serve a Kubernetes API emulator (KMock, with every kind the operator uses) on 127.0.0.1 and
write a kubeconfig for it, to try the operator and kubectl without a cluster:

    python scripts/emulator.py --kubeconfig /tmp/emu.yaml &        # prints the kubeconfig path
    KUBECONFIG=/tmp/emu.yaml dcmdp-operator --namespace default &
    KUBECONFIG=/tmp/emu.yaml kubectl create --validate=false -f examples/kind-cpu.yaml
    KUBECONFIG=/tmp/emu.yaml kubectl get dcmdprun kind-cpu -o yaml

No controllers run in it: pods are never started, and a Job's or Deployment's status changes only
when patched (``kubectl patch --subresource=status ...``). See ``dcmdp_testing/emulator.py``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]  # dcmdp_testing is not installed (test tooling)

from dcmdp_testing.emulator import EmulatorThread  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--kubeconfig", default="emulator.kubeconfig", help="where to write the kubeconfig")
    p.add_argument("--namespace", default="default", help="the kubeconfig's namespace")
    args = p.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with EmulatorThread(port=args.port or None) as emu:
        path = Path(args.kubeconfig).resolve()
        path.write_text(emu.kubeconfig(args.namespace))
        print(f"Kubernetes API emulator at {emu.url}", flush=True)
        print(f"kubeconfig: {path}   (export KUBECONFIG={path})", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
