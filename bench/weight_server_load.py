"""GetStatus latency while 40 weight streams stall and 100 idle workers long-poll (issue 14, item 3).

The real trainer service (one process) serves a 12 MiB fp32 snapshot; a second process opens one
connection per client: 40 ``StreamWeights`` calls that are never read, and 100 ``AcquireLease``
pollers that ask again after the ``retry_after_ms`` they are told (the run is not started, so
there is never work: every poll is idle). Meanwhile this process times ``GetStatus`` calls. Side
by side: GetStatus latency with no load, same process, same server.

    .venv/bin/python bench/weight_server_load.py [--calls 40]

Last line: one JSON object (goal: ``status_p95_ms`` < 100).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LOAD = textwrap.dedent('''
    import sys, threading, time
    from dcmdp.proto import dcmdp_pb2 as pb, dcmdp_pb2_grpc
    from dcmdp.transport.channel import open_channel
    port, token = int(sys.argv[1]), sys.argv[2]
    target = f"127.0.0.1:{port}"
    stalled = [dcmdp_pb2_grpc.TrainerStub(open_channel(target, token)).StreamWeights(
        pb.WeightRequest(header=pb.Header(pool="bf16", worker_id=f"s{i}"), version=0, dtype="fp32"), timeout=600)
        for i in range(40)]
    polls = [dcmdp_pb2_grpc.TrainerStub(open_channel(target, token)).AcquireLease for _ in range(100)]
    def ask(i):
        polls[i].future(pb.LeaseRequest(header=pb.Header(pool="bf16", worker_id=f"p{i}")),
                        timeout=60).add_done_callback(lambda f, i=i: done(i, f))
    def done(i, f):
        wait = f.result().retry_after_ms / 1000 if f.exception() is None else 0.5
        threading.Timer(wait, ask, (i,)).start()
    for i in range(100):
        ask(i)
    print("loaded", flush=True)
    time.sleep(600)
''')


def timed_status(stub, pb, calls: int) -> list[float]:
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter()
        stub.GetStatus(pb.StatusRequest(), timeout=30)
        lat.append(time.perf_counter() - t0)
        time.sleep(0.05)
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()

    from dcmdp.proto import dcmdp_pb2 as pb
    from dcmdp.proto import dcmdp_pb2_grpc
    from dcmdp.transport.channel import open_channel
    from dcmdp_trainer.coordinator import Coordinator
    from dcmdp_trainer.server import start_server
    from dcmdp_trainer.session import Session
    from dcmdp_trainer.weights import WeightPublisher
    from runtime_helpers import tiny_run

    tmp = Path(tempfile.mkdtemp(prefix="dcmdp-bench-"))
    session = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp / "run", threads=1)
    publisher = WeightPublisher(keep=1)
    big = {f"w{i}": t.repeat(40, *[1] * (t.dim() - 1)) if t.dim() else t
           for i, t in enumerate(session.weights(0).values())}  # ~12 MiB: more than flow control buffers
    publisher.publish(0, big)
    run = tiny_run(rollout={"pools": [{"name": "bf16", "precision": "bf16", "replicas": 100}]})
    server, port = start_server(Coordinator(session, publisher), publisher, "bench-token", run=run)
    stub = dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{port}", "bench-token"))
    idle = timed_status(stub, pb, args.calls)
    script = tmp / "load.py"
    script.write_text(LOAD)
    load = subprocess.Popen([sys.executable, str(script), str(port), "bench-token"], stdout=subprocess.PIPE)
    try:
        assert load.stdout.readline().strip() == b"loaded"
        svc = server.dcmdp_service
        deadline = time.monotonic() + 30
        while svc.streams.used < svc.streams.limit and time.monotonic() < deadline:
            time.sleep(0.1)
        held = svc.streams.used
        busy = timed_status(stub, pb, args.calls)
    finally:
        load.kill()
        server.stop(grace=None)
        session.metrics.close()
    p95 = sorted(busy)[int(0.95 * (len(busy) - 1))]
    result = {"streams_held": held, "status_idle_median_ms": round(statistics.median(idle) * 1e3, 1),
              "status_median_ms": round(statistics.median(busy) * 1e3, 1), "status_p95_ms": round(p95 * 1e3, 1),
              "status_max_ms": round(max(busy) * 1e3, 1),
              "slowdown": round(statistics.median(busy) / statistics.median(idle), 2)}
    result["goal_met"] = {"status_p95_ms<100": result["status_p95_ms"] < 100}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
