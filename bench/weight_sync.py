"""Weight sync trainer → workers over loopback: the collective data plane vs raw TCP, same bytes.

For each snapshot size (``--mib``, default 256 and 1024 MiB of fp32, in 16 tensors), wire dtype
(``--dtypes``: fp32, a half-bucket sent as a view of the weights where it lies inside one tensor and
copied where it spans two — with 64 MiB buckets, every half of the 1024 MiB snapshot is a view and
every half of the 256 MiB one a copy — and bf16, cast from them) and worker count (1, 2),
with long-lived worker processes (a pool's workers live for the run and receive every version):

* **data plane** (the headline): the real trainer service with its broadcast hub
  (``dcmdp_trainer.broadcast``): each worker calls ``JoinBroadcast`` (saying which group it holds)
  and runs the real receive (``dcmdp_rollout.weights.receive_broadcast`` through its
  ``BroadcastLink``: the bucket's parts copied into four bucket buffers, crc32 of every bucket
  checked, the buckets' slices handed to a sink that drops them). The workers run on the
  trainer's machine, so the hub offers them its shared-memory ring (``dcmdp.transport.shared_ring``):
  the trainer casts (or copies) each half-bucket into a slot, the workers copy it out, and the
  group carries the signals and crcs (the round must go through the ring, or the bench stops).
  A cell's first round opens the workers' group (reported apart as
  ``cold_round_s``/``cold_over_tcp``); the timed rounds reuse it, as every version after a
  worker's first does. The trainer's crc32 of each bucket is computed before the timed rounds (it
  is cached per (version, dtype) after a version's first broadcast);
* **data plane over gloo** (``gloo_path_over_tcp``, beside the headline): the same rounds with
  the ring not offered, as to workers on other machines: every half-bucket broadcast over the
  group, a view of the snapshot or cast into the hub's pair of half-bucket buffers while the other
  half is on the wire;
* **raw TCP**: the same worker processes each reading the same number of bytes from a plain
  socket (``sendall`` of ready-made bytes from one thread per worker / ``recv_into`` a 4 MiB buffer,
  no checks).
* **raw gloo** (1-worker cells, ``gloo_raw_over_tcp`` beside the headline): the same bytes in the
  same half-bucket broadcasts over a plain group of the data plane's connections, nothing else:
  the transport's own ceiling;
* **raw TCP with the cast** (bf16 cells only, reported as ``transfer_over_tcp_cast`` beside the
  headline): the sender casts each half-bucket from the same fp32 snapshot into a buffer, then sends
  it to every worker: the cost of a bf16 wire from fp32 weights without the data plane.

Time = first byte asked for → last worker done (wall clock of the processes on one machine).
Each cell runs ``--repeats`` interleaved data-plane/TCP pairs, the order alternating, and reports
the median of the pairs' ratios (robust to the load drift of a shared machine). Also measured:
the CPU seconds (user + sys) of the trainer and every worker in a data-plane round over those of a
TCP round (``cpu_over_tcp``: when the processes outnumber the cores, the ratio of times follows
it), the trainer's CPU seconds per GiB delivered, and its extra resident memory (peak RSS, sampled
every 5 ms, over the RSS before the first round of the snapshot: it includes the process's one-time
growth in that round, gloo's and gRPC's threads, reported alone as ``first_round_mib``) in buckets. The bytes ratios are the wire bytes of an int8
and a bf16 pool (wire dtype bf16) over those of an fp32 pool, from the manifests the trainer serves.

    .venv/bin/python bench/weight_sync.py [--mib 256 1024] [--workers 1 2] [--dtypes fp32 bf16] [--repeats 3]
                                          [--bucket-mib 16]

Last line: one JSON object (``transfer_over_tcp`` is the worst over sizes, dtypes and worker
counts; ``transfer_over_tcp_by_cell`` lists every cell).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dcmdp.transport.buckets import DEFAULT_BUCKET_BYTES  # noqa: E402

WORKER = textwrap.dedent('''
    import json, resource, socket, sys, time
    import torch
    from dcmdp.proto import dcmdp_pb2 as pb, dcmdp_pb2_grpc
    from dcmdp.transport.channel import open_channel
    from dcmdp_rollout.broadcast_link import BroadcastLink
    from dcmdp_rollout.weights import receive_broadcast
    if sys.argv[1] == "gloo":  # one raw gloo round in a process of its own
        from dcmdp.transport.collective import broadcast, client_store, open_group
        port, n, part = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        pg = open_group(client_store("127.0.0.1", port, 60), "raw", 1, 2, join_timeout_s=60)
        bufs = [torch.empty(part, dtype=torch.uint8) for _ in range(4)]
        parts = [(lo, min(lo + part, n)) for lo in range(0, n, part)]
        t0 = time.time()
        posted = {}
        for k, (lo, hi) in enumerate(parts):
            if k >= 4:
                posted.pop(k - 4).wait()
            posted[k] = broadcast(pg, bufs[k % 4][:hi - lo], 60)
        for w in posted.values():
            w.wait()
        print(json.dumps({"start": t0, "end": time.time(), "bytes": n}), flush=True)
        raise SystemExit(0)
    # a long-lived worker: one round per command on stdin, as a pool worker receives every version
    port, token, name = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    stub = dcmdp_pb2_grpc.TrainerStub(open_channel(f"127.0.0.1:{port}", token))
    h = pb.Header(pool="bench", worker_id=name)
    link = BroadcastLink()  # the worker's group and buffers, kept between rounds
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    for line in sys.stdin:
        cmd = line.split()
        c0 = cpu()
        if cmd[0] == "tcp":
            n = int(cmd[2])
            s = socket.create_connection(("127.0.0.1", int(cmd[1])))
            t0, got = time.time(), 0
            while got < n:
                k = s.recv_into(view[:min(len(buf), n - got)])
                if not k:
                    raise SystemExit("short read")
                got += k
            s.close()
            print(json.dumps({"start": t0, "end": time.time(), "bytes": got, "cpu_s": cpu() - c0}), flush=True)
        elif cmd[0] == "dp":
            t0 = time.time()
            ticket = stub.JoinBroadcast(pb.WeightRequest(header=h, version=1, dtype=cmd[1], held_group=link.held),
                                        timeout=120)
            t1 = time.time()
            _, st = receive_broadcast(stub, h, ticket, "127.0.0.1", sink=lambda slices: None, slices=True, link=link)
            assert st.crc_errors == 0 and st.refetched == 0 and st.broadcast_bytes == st.total_bytes, st
            print(json.dumps({"start": t1, "joined_s": t1 - t0, "end": time.time(), "bytes": st.bytes,
                              "load_s": st.load_seconds, "connect_s": st.connect_seconds,
                              "reused": st.reused_group, "cpu_s": cpu() - c0}), flush=True)
        else:
            break
    link.close()
''')


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    def __init__(self):
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak - self.base


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Workers:
    """``n`` long-lived worker processes, each running one round per command (a pool's workers:
    they live for the run and receive every version)."""

    def __init__(self, script: Path, n: int, port: int, token: str, env):
        self.procs = [subprocess.Popen([sys.executable, str(script), "worker", str(port), token, f"w{i}"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for i in range(n)]

    def send(self, cmd: str) -> None:
        for p in self.procs:
            p.stdin.write((cmd + "\n").encode())
            p.stdin.flush()

    def results(self) -> list[dict]:
        out = []
        for p in self.procs:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"bench worker failed (exit {p.wait(30)})")
            out.append(json.loads(line))
        return out

    def close(self) -> None:
        self.send("quit")
        for p in self.procs:
            p.stdin.close()
            if p.wait(60):
                raise SystemExit(f"bench worker failed (exit {p.returncode})")


def span(res: list[dict]) -> float:
    return max(r["end"] for r in res) - min(r["start"] for r in res)


def run_tcp(pool: Workers, data: memoryview) -> tuple[float, float]:
    """Raw TCP: each worker reads ``data`` from a socket of its own (one sender thread per worker).
    (seconds, the workers' CPU seconds)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.listen(len(pool.procs))
    pool.send(f"tcp {srv.getsockname()[1]} {len(data)}")

    def send(conn):
        with conn:
            conn.sendall(data)

    threads = []
    for _ in pool.procs:
        conn, _ = srv.accept()
        threads.append(threading.Thread(target=send, args=(conn,)))
        threads[-1].start()
    res = pool.results()
    for t in threads:
        t.join()
    srv.close()
    return span(res), sum(r["cpu_s"] for r in res)


def run_tcp_cast(pool: Workers, state: dict, chunk_bytes: int) -> float:
    """Raw TCP whose sender casts: each ``chunk_bytes`` of bf16 is cast (one ``copy_``) from the fp32
    snapshot into a buffer, then ``sendall`` to every worker in turn; no checks. What a hand-rolled
    socket pays for a bf16 wire from fp32 weights."""
    import torch

    wire = sum(t.numel() for t in state.values()) * 2
    srv = socket.create_server(("127.0.0.1", 0))
    srv.listen(len(pool.procs))
    pool.send(f"tcp {srv.getsockname()[1]} {wire}")
    conns = [srv.accept()[0] for _ in pool.procs]
    buf = torch.empty(chunk_bytes // 2, dtype=torch.bfloat16)
    step = buf.numel()
    for t in state.values():
        flat = t.reshape(-1)
        for lo in range(0, flat.numel(), step):
            part = buf[:min(step, flat.numel() - lo)]
            part.copy_(flat[lo:lo + part.numel()])
            data = memoryview(part.view(torch.uint8).numpy())
            for c in conns:
                c.sendall(data)
    res = pool.results()
    for c in conns:
        c.close()
    srv.close()
    return span(res)


def run_gloo_raw(script: Path, data, part: int, env) -> float:
    """The transport alone: one worker process, a plain gloo broadcast group (``open_group``, the
    data plane's connections), ``data`` sent in ``part``-byte broadcasts, two in flight, four
    receives posted ahead; no crc, no cast, no load thread, no gRPC; timed after the rendezvous,
    into buffers the process just allocated. The data plane's ceiling."""
    from dcmdp.transport.collective import broadcast, master_store, open_group

    store = master_store("127.0.0.1", 60)
    proc = subprocess.Popen([sys.executable, str(script), "gloo", str(store.port), str(data.numel()), str(part)],
                            stdout=subprocess.PIPE, env=env)
    pg = open_group(store, "raw", 0, 2, join_timeout_s=60)
    inflight = []
    for lo in range(0, data.numel(), part):
        if len(inflight) >= 2:
            inflight.pop(0).wait()
        inflight.append(broadcast(pg, data[lo:lo + part], 60))
    for w in inflight:
        w.wait()
    out, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise SystemExit(f"bench worker failed (exit {proc.returncode})")
    return span([json.loads(out.decode().splitlines()[-1])])


def run_dataplane(pool: Workers, dtype: str, hub, base_rss: int,
                  path: str = "") -> tuple[float, float, int, float, float, bool, float]:
    """One broadcast round to every worker of ``pool``: (seconds, trainer cpu seconds, trainer peak
    RSS over ``base_rss`` in bytes, worker load seconds, worker seconds joining the group, whether
    every worker reused its group, the workers' CPU seconds). ``path``: "ring" (the hub offers its
    shared-memory ring, as to workers on its machine) or "gloo" (it does not, as to workers on
    other machines); the round must have gone that way."""
    if path:
        hub.shared_memory = path == "ring"
    before = hub.rounds
    peak = PeakRss()
    c0 = cpu_s()
    pool.send(f"dp {dtype}")
    res = pool.results()
    while hub.rounds == before:
        time.sleep(0.001)
    cpu = cpu_s() - c0
    peak.stop()
    r = hub.results[-1]
    if r.error or r.world_size != len(pool.procs) + 1:
        raise SystemExit(f"broadcast round failed: {r}")
    if path and r.path != path:
        raise SystemExit(f"the round went over {r.path!r}, not {path!r}: {r}")
    return (span(res), cpu, peak.peak - base_rss, max(x["load_s"] for x in res), max(x["connect_s"] for x in res),
            all(x["reused"] for x in res), sum(x["cpu_s"] for x in res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[256, 1024], help="fp32 snapshot sizes")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="wire dtypes: fp32 (buckets sent as views of the weights), bf16 (cast into bucket buffers)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved data-plane/TCP pairs per cell (median)")
    ap.add_argument("--bucket-mib", type=int, default=DEFAULT_BUCKET_BYTES >> 20)
    args = ap.parse_args()
    if not 1 <= args.bucket_mib <= 128:
        ap.error("--bucket-mib must be 1-128 (as spec.trainer.weightBucketMiB)")

    import torch

    from dcmdp_trainer.broadcast import BroadcastHub
    from dcmdp_trainer.coordinator import Coordinator
    from dcmdp_trainer.server import start_server
    from dcmdp_trainer.session import Session
    from dcmdp_trainer.weights import WeightPublisher
    from runtime_helpers import tiny_run

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="dcmdp-bench-"))
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    session = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp / "run", threads=1)
    token = "bench-token"
    bucket = args.bucket_mib << 20
    payload = memoryview(bytearray(max(args.mib) << 20))  # raw TCP sends ready-made bytes: allocated once, up front
    rows, first_round = [], []
    ratio_bf16 = ratio_int8 = None
    for mib in args.mib:
        n = (mib << 20) // 4 // 16
        g = torch.Generator().manual_seed(0)
        big = {f"layer{i}.weight": torch.randn(n, generator=g) for i in range(16)}  # 16 fp32 tensors
        publisher = WeightPublisher(keep=2, bucket_bytes=bucket)
        publisher.publish(0, session.weights(0))
        publisher.publish(1, big)
        coord = Coordinator(session, publisher)
        expect = {"n": 1}
        hub = BroadcastHub(publisher, "127.0.0.1", gather_s=30.0, expected=lambda dtype: expect["n"])
        server, port = start_server(coord, publisher, token, hub=hub)
        if ratio_bf16 is None:
            from dcmdp.proto import dcmdp_pb2 as pb
            from dcmdp.precision import wire_dtype

            svc = server.dcmdp_service
            fp32 = svc._manifest(pb.Header(), publisher.prepared(1, "fp32")).total_bytes
            ratio_bf16 = svc._manifest(pb.Header(), publisher.prepared(1, wire_dtype("bf16"))).total_bytes / fp32
            ratio_int8 = svc._manifest(pb.Header(), publisher.prepared(1, wire_dtype("int8"))).total_bytes / fp32
        for dtype in args.dtypes:
            prep = publisher.prepared(1, dtype)
            for i in range(prep.layout.buckets):  # the crcs, as the first broadcast of a version computes them
                publisher.bucket(prep, i, torch.empty(bucket, dtype=torch.uint8))
        # One warm-up round pays the process's one-time costs (gloo and gRPC threads, lazy imports): its
        # growth is reported apart, and counted in the extra memory (it may be the bucket buffers: a
        # half-bucket that spans two tensors is copied even for an fp32 wire).
        before = rss()
        warm = Workers(script, 1, port, token, env)
        run_dataplane(warm, "fp32", hub, before)
        warm.close()
        first_round.append(rss() - before)
        base_rss = before  # (conservative: the one-time growth above counts as extra memory)
        for dtype in args.dtypes:
            prep = publisher.prepared(1, dtype)
            wire = prep.layout.total_bytes
            gib = wire / (1 << 30)
            for w in args.workers:
                expect["n"] = w
                pool = Workers(script, w, port, token, env)
                cold = run_dataplane(pool, dtype, hub, base_rss)  # the workers' first round: opens their group
                pairs, cpus, extras, loads, connects, cast_pairs, gloo_pairs = [], [], [], [], [], [], []
                network_pairs = []  # (the data plane as to workers on other machines: over gloo, seconds; TCP)
                cpu_ratios = []
                for k in range(args.repeats):  # interleaved, the order alternating: load drift hits both sides
                    tcp_first = k % 2 == 1
                    if tcp_first:
                        c0 = cpu_s()
                        tcp, tcp_workers_cpu = run_tcp(pool, payload[:wire])
                        tcp_cpu = cpu_s() - c0 + tcp_workers_cpu
                    if tcp_first:
                        network_pairs.append((run_dataplane(pool, dtype, hub, base_rss, "gloo")[0], tcp))
                    s, c, x, load, connect, reused, workers_cpu = run_dataplane(pool, dtype, hub, base_rss, "ring")
                    if not reused:
                        raise SystemExit("a worker did not reuse its group in a steady-state round")
                    if not tcp_first:
                        c0 = cpu_s()
                        tcp, tcp_workers_cpu = run_tcp(pool, payload[:wire])
                        tcp_cpu = cpu_s() - c0 + tcp_workers_cpu
                    if not tcp_first:
                        network_pairs.append((run_dataplane(pool, dtype, hub, base_rss, "gloo")[0], tcp))
                    pairs.append((s, tcp))
                    cpu_ratios.append((c + workers_cpu) / tcp_cpu)
                    if w == 1:  # the transport alone, same bytes and parts (reported beside the headline)
                        wire_view = torch.frombuffer(payload[:wire], dtype=torch.uint8)
                        gloo_pairs.append((s, run_gloo_raw(script, wire_view, bucket // 2, env)))
                    if dtype == "bf16":  # the same cast on the TCP side (reported beside the headline)
                        cast_pairs.append((s, run_tcp_cast(pool, big, bucket // 2)))
                    cpus.append(c / (gib * w))
                    extras.append(x / bucket)
                    loads.append(load / s)
                    connects.append(connect)
                ratio = statistics.median(t / d for d, t in pairs)
                dp_s, tcp_s = statistics.median(d for d, _ in pairs), statistics.median(t for _, t in pairs)
                row = {"mib": mib, "dtype": dtype, "workers": w, "wire_mib": round(wire / (1 << 20)),
                       "dataplane_gib_s": round(gib * w / dp_s, 3), "tcp_gib_s": round(gib * w / tcp_s, 3),
                       "transfer_over_tcp": round(ratio, 3), "pair_ratios": [round(t / d, 3) for d, t in pairs],
                       "trainer_cpu_s_per_gib": round(statistics.median(cpus), 3),
                       "extra_mem_buckets": round(max(0.0, *extras), 2),  # (below the base: no growth)
                       "worker_load_share": round(statistics.median(loads), 2),
                       "connect_s": round(statistics.median(connects), 3),
                       "cold_round_s": round(cold[0], 4), "cold_connect_s": round(cold[4], 4),
                       "cold_over_tcp": round(tcp_s / cold[0], 3),
                       "cpu_over_tcp": round(statistics.median(cpu_ratios), 3),
                       "gloo_path_over_tcp": round(statistics.median(t / d for d, t in network_pairs), 3)}
                if gloo_pairs:
                    row["gloo_raw_gib_s"] = round(gib / statistics.median(t for _, t in gloo_pairs), 3)
                    row["gloo_raw_over_tcp"] = round(statistics.median(t / g for (_, t), (_, g) in zip(pairs, gloo_pairs)), 3)
                if cast_pairs:
                    row["transfer_over_tcp_cast"] = round(statistics.median(t / d for d, t in cast_pairs), 3)
                    row["tcp_cast_gib_s"] = round(gib * w / statistics.median(t for _, t in cast_pairs), 3)
                pool.close()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        server.stop(grace=None)
        del big, publisher, hub
    session.metrics.close()
    result = {
        "bucket_mib": args.bucket_mib,
        "repeats": args.repeats,
        "rows": rows,
        "transfer_over_tcp": min(r["transfer_over_tcp"] for r in rows),
        "transfer_over_tcp_by_cell": {f'{r["mib"]}MiB/{r["dtype"]}/{r["workers"]}w': r["transfer_over_tcp"]
                                      for r in rows},
        # the same rounds to workers on other machines (no ring: every part over gloo), worst cell
        "gloo_path_over_tcp": min(r["gloo_path_over_tcp"] for r in rows),
        "gloo_path_over_tcp_by_cell": {f'{r["mib"]}MiB/{r["dtype"]}/{r["workers"]}w': r["gloo_path_over_tcp"]
                                       for r in rows},
        "cpu_over_tcp": max(r["cpu_over_tcp"] for r in rows),
        "cpu_s_per_gib": max(r["trainer_cpu_s_per_gib"] for r in rows),
        "extra_mem_buckets": max(r["extra_mem_buckets"] for r in rows),
        "transfer_over_tcp_cast": min((r["transfer_over_tcp_cast"] for r in rows if "transfer_over_tcp_cast" in r),
                                      default=None),
        "first_round_mib": round(max(first_round) / (1 << 20), 2),
        "bytes_ratio_int8": round(ratio_int8, 4),
        "bytes_ratio_bf16": round(ratio_bf16, 4),
    }
    result["goals_met"] = {"transfer_over_tcp>=0.8": result["transfer_over_tcp"] >= 0.8,
                           "extra_mem_buckets<=2": result["extra_mem_buckets"] <= 2,
                           "bytes_ratios<=0.5": max(ratio_int8, ratio_bf16) <= 0.5}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
