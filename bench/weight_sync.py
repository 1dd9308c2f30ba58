"""Weight streaming trainer → worker over loopback: gRPC (the real path) vs a raw TCP socket.

The trainer side is the real gRPC trainer service (``dcmdp_trainer.server``) with a synthetic fp32
snapshot of ``--mib`` MiB published in its weight publisher; the worker side is a separate process
running the real fetch (``dcmdp_rollout.weights.fetch_weights``: manifest, 4 MiB chunks, crc32 of
every chunk, sha256 of the whole, tensors unpacked). The baseline is the same process pair sending
the same packed bytes over a plain TCP socket (``sendall`` / ``recv_into``, no checks). Both are run
``--repeats`` times, alternating, and the best of each is compared: goal gRPC / TCP ≥ 0.8.

Second figure: bytes on the wire for a bf16 pool of an fp32 trainer, with the trainer's cast
(the pool asks for bf16) vs without (the pool takes fp32 and would cast itself): goal ≤ 0.5.

    .venv/bin/python bench/weight_sync.py [--mib 256] [--repeats 3] [--chunk-mib 4]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CLIENT = textwrap.dedent('''
    import json, socket, sys, time
    import grpc
    import torch  # loaded in a worker anyway: not part of the transfer time
    from dcmdp.proto import dcmdp_pb2 as pb, dcmdp_pb2_grpc
    from dcmdp.transport.channel import open_channel
    from dcmdp_rollout.weights import fetch_weights
    mode, port, token, version, dtype, chunk = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
    if mode == "grpc":
        stub = dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{port}", token))
        stub.GetStatus(pb.StatusRequest(), timeout=30)  # connect first: time the transfer only
        t0 = time.perf_counter()
        tensors, st = fetch_weights(stub, pb.Header(pool="bench", worker_id="bench"), version, dtype, chunk_size=chunk)
        dt = time.perf_counter() - t0
        print(json.dumps({"seconds": dt, "bytes": st.bytes, "total": st.total_bytes, "tensors": len(tensors)}))
    else:
        total = int(sys.argv[7])
        s = socket.create_connection(("127.0.0.1", port))
        buf = bytearray(total); view = memoryview(buf); got = 0
        s.sendall(b"go")
        t0 = time.perf_counter()
        while got < total:
            n = s.recv_into(view[got:], min(chunk, total - got))
            if not n:
                raise SystemExit("short read")
            got += n
        dt = time.perf_counter() - t0
        print(json.dumps({"seconds": dt, "bytes": got, "total": total}))
''')


def tcp_server(data: bytes, chunk: int) -> tuple[socket.socket, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(2)
                view = memoryview(data)
                for start in range(0, len(data), chunk):
                    conn.sendall(view[start:start + chunk])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def client(script: Path, *args) -> dict:
    out = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(f"client failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="size of the fp32 snapshot")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-mib", type=int, default=4)
    args = ap.parse_args()

    import torch

    from dcmdp_trainer.coordinator import Coordinator
    from dcmdp_trainer.server import start_server
    from dcmdp_trainer.session import Session
    from dcmdp_trainer.weights import WeightPublisher
    from runtime_helpers import tiny_run

    chunk = args.chunk_mib << 20
    tmp = Path(tempfile.mkdtemp(prefix="dcmdp-bench-"))
    session = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp / "run", threads=1)
    # a synthetic snapshot: 16 tensors of fp32, --mib MiB in all
    n = (args.mib << 20) // 4 // 16
    g = torch.Generator().manual_seed(0)
    big = {f"layer{i}.weight": torch.randn(n, generator=g) for i in range(16)}
    publisher = WeightPublisher(keep=2)
    publisher.publish(0, session.weights(0))
    publisher.publish(1, big)
    token = "bench-token"
    server, port = start_server(Coordinator(session, publisher), publisher, token)
    packed32 = publisher.packed(1, "fp32")
    publisher.packed(1, "bf16")  # both casts built before timing
    srv, _ = tcp_server(bytes(packed32.data), chunk)
    script = tmp / "client.py"
    script.write_text(CLIENT)

    grpc_runs, tcp_runs = [], []
    for _ in range(args.repeats):
        grpc_runs.append(client(script, "grpc", port, token, 1, "fp32", chunk))
        tcp_runs.append(client(script, "tcp", srv.getsockname()[1], token, 1, "fp32", chunk, packed32.total_bytes))
    bf16 = client(script, "grpc", port, token, 1, "bf16", chunk)
    server.stop(grace=None)
    srv.close()
    session.metrics.close()

    gib = packed32.total_bytes / (1 << 30)
    best_grpc = min(r["seconds"] for r in grpc_runs)
    best_tcp = min(r["seconds"] for r in tcp_runs)
    for name, runs in (("grpc", grpc_runs), ("tcp", tcp_runs)):
        print(f"{name:5s} " + "  ".join(f"{gib / r['seconds']:.2f} GiB/s" for r in runs), file=sys.stderr)
    result = {
        "snapshot_mib": round(packed32.total_bytes / (1 << 20), 1),
        "chunk_mib": args.chunk_mib,
        "grpc_gib_s": round(gib / best_grpc, 3),
        "tcp_gib_s": round(gib / best_tcp, 3),
        "grpc_over_tcp": round(best_tcp / best_grpc, 3),
        "bytes_fp32_uncast": grpc_runs[0]["bytes"],
        "bytes_bf16_cast": bf16["bytes"],
        "cast_bytes_ratio": round(bf16["bytes"] / grpc_runs[0]["bytes"], 4),
        "goals_met": {"throughput_ratio>=0.8": best_tcp / best_grpc >= 0.8,
                      "bytes_ratio<=0.5": bf16["bytes"] / grpc_runs[0]["bytes"] <= 0.5},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
