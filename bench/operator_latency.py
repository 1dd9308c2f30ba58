"""Operator latency and memory against the Kubernetes API emulator.

    python bench/operator_latency.py [--runs 50] [--live 200] [--poll-seconds 10]

The real ``dcmdp-operator`` process (kopf) watches a namespace of the emulator (KMock with the
CRD's admission, ``dcmdp_testing/emulator.py``, served from this process). Measured:

* latency: ``--runs`` DCMDPRuns created one after another; for each, the time from the create
  request to all of its children (Secret, ConfigMap, Service, Job, one Deployment per pool)
  existing in the API server, read from the emulator's memory every millisecond;
* memory: the operator's resident set size (``VmRSS``) once ``--live`` runs exist, all reconciled,
  after ``--settle`` seconds of status polling at ``--poll-seconds``.

Goals (issue 5): p95 <= 1 s, RSS <= 300 MB. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NS = "bench"


def _split(res: str) -> tuple[str, str, str]:
    parts = res.split("/")
    return ("", parts[0], parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value, _unit = line.split()
            fields[key[:-1]] = int(value) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="runs timed one after another")
    p.add_argument("--live", type=int, default=200, help="runs alive for the memory measurement")
    p.add_argument("--pools", type=int, default=2, help="rollout pools per run")
    p.add_argument("--poll-seconds", type=float, default=10.0, help="the operator's status poll period")
    p.add_argument("--settle", type=float, default=15.0, help="seconds of polling before reading the RSS")
    args = p.parse_args(argv)

    sys.path[:0] = [str(REPO), str(REPO / "operator")]  # dcmdp_testing is test tooling, not installed
    from dcmdp_testing.emulator import EmulatorThread  # noqa: E402  (after the path is set)

    spec = {"rollout": {"pools": [{"name": f"p{i}", "replicas": 1} for i in range(args.pools)]}}
    expected = lambda name: [  # noqa: E731
        ("v1/secrets", f"{name}-token"), ("v1/configmaps", f"{name}-config"), ("v1/services", f"{name}-trainer"),
        ("batch/v1/jobs", f"{name}-trainer"),
    ] + [("apps/v1/deployments", f"{name}-rollout-p{i}") for i in range(args.pools)]

    with EmulatorThread() as emu, tempfile.TemporaryDirectory() as tmp:
        emu.emulator.record = False  # no request log: this runs for minutes
        kubeconfig = Path(tmp) / "kubeconfig"
        kubeconfig.write_text(emu.kubeconfig(NS))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(REPO / "operator")}
        # Trainers are never reachable here (no pods): point the status reads at a closed port.
        env["DCMDP_TRAINER_ADDRESS"] = "127.0.0.1:9"
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcmdp_operator.main", "--namespace", NS, "--metrics-port", "0", "--liveness", "",
             "--poll-seconds", str(args.poll_seconds)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("BENCH_OPERATOR_LOG", os.devnull), "w"), text=True,
        )

        def exists(pairs: list[tuple[str, str]]) -> bool:
            async def check(e):  # on the emulator's loop: no HTTP; one pass over its objects
                have = {(str(res.group), str(res.version), res.plural, name)
                        for (res, ns, name), obj in e._objects.items() if ns == NS and not obj.deleted}
                return all(tuple(_split(res)) + (name,) in have for res, name in pairs)
            return emu.call(check)

        def create(name: str) -> None:
            async def post(e):
                resp = await e.post(f"/apis/dcmdp.io/v1alpha1/namespaces/{NS}/dcmdpruns", json={
                    "apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": name}, "spec": spec})
                assert resp.status == 200, await resp.text()
            emu.call(post)

        def wait_children(name: str, timeout: float = 30.0) -> float:
            t0 = time.perf_counter()
            create(name)
            while not exists(expected(name)):
                if time.perf_counter() - t0 > timeout:
                    raise SystemExit(f"{name}: children not there after {timeout} s")
                time.sleep(0.001)
            return time.perf_counter() - t0

        try:
            wait_children("warmup", timeout=60)  # the operator is up and watching
            latencies = [wait_children(f"lat-{i}") for i in range(args.runs)]
            t_fill = time.perf_counter()
            for i in range(args.live - args.runs - 1):
                create(f"live-{i}")
            names = ["warmup"] + [f"lat-{i}" for i in range(args.runs)] + [f"live-{i}" for i in range(args.live - args.runs - 1)]
            deadline = time.time() + 300
            while not exists([p for n in names for p in expected(n)]):
                if time.time() > deadline:
                    raise SystemExit("the live runs did not all get their children")
                time.sleep(0.5)
            fill_s = time.perf_counter() - t_fill
            time.sleep(args.settle)
            rss, hwm = rss_mb(proc.pid)
            alive = proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    latencies.sort()
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    result = {
        "bench": "operator_latency",
        "runs_timed": args.runs,
        "pools_per_run": args.pools,
        "create_to_children_p50_s": round(p50, 4),
        "create_to_children_p95_s": round(p95, 4),
        "create_to_children_max_s": round(latencies[-1], 4),
        "live_runs": args.live,
        "fill_s": round(fill_s, 2),
        "poll_seconds": args.poll_seconds,
        "operator_rss_mb": round(rss, 1),
        "operator_peak_rss_mb": round(hwm, 1),
        "operator_alive": alive,
        "goal_p95_s": 1.0,
        "goal_rss_mb": 300,
        "meets_goals": bool(p95 <= 1.0 and rss <= 300 and alive),
    }
    print(f"create → children over {args.runs} runs: p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms; "
          f"RSS with {args.live} live runs: {rss:.1f} MB (peak {hwm:.1f} MB)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
