"""Helpers of the runtime tests: tiny manifests, trainer/worker processes, status reads."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from dcmdp.spec import DCMDPRun, dump_run, parse_run
from dcmdp_trainer import launcher

REPO = Path(__file__).resolve().parent.parent
# the real entry point -> its fault wrapper (dcmdp_testing, which no image installs)
FAULT_WRAPPERS = {"dcmdp_trainer": "dcmdp_testing.trainer_faults", "dcmdp_rollout": "dcmdp_testing.worker_faults"}

TINY: dict[str, Any] = {
    "apiVersion": "dcmdp.io/v1alpha1",
    "kind": "DCMDPRun",
    "metadata": {"name": "tiny"},
    "spec": {
        "model": {"hiddenSize": 64, "intermediateSize": 128, "numLayers": 2, "numHeads": 2, "numKvHeads": 1,
                  "warmStart": {"steps": 20, "batchSize": 64}},
        "task": {"name": "addition", "digits": 2, "heldOut": 16},
        "algorithm": {"groupSize": 4, "promptsPerStep": 8, "miniBatchSize": 4, "learningRate": 1e-4, "steps": 6,
                      "constraint": {"tolerance": 0.004, "lambdaInit": 0.1, "lambdaLR": 5.0}},
        "rollout": {"leaseTimeoutSeconds": 20, "batchPrompts": 4,
                    "pools": [{"name": "bf16", "engine": "hf", "precision": "bf16", "tolerance": 0.003},
                              {"name": "int8", "engine": "hf", "precision": "int8", "tolerance": 0.006}]},
        "checkpoint": {"everySteps": 0},
    },
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def tiny_run(**spec_over: Any) -> DCMDPRun:
    return parse_run(merge(TINY, {"spec": spec_over}))


def write_manifest(run: DCMDPRun, path: Path) -> Path:
    path.write_text(yaml.safe_dump(dump_run(run), sort_keys=False))
    return path


def proc_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("DCMDP_TOKEN", None)
    env.pop("DCMDP_TOKEN_FILE", None)
    return env


def with_faults(args: list[str], *faults: str) -> list[str]:
    """``[..., "-m", "dcmdp_trainer" | "dcmdp_rollout", ARGS]`` started through its fault wrapper
    with ``faults`` (``"--sample-delay", "1.0"``): the real entry point, faults patched in from outside."""
    i = args.index("-m")
    return [*args[:i], "-m", FAULT_WRAPPERS[args[i + 1]], *faults, "--", *args[i + 2:]]


def faults_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the repository root on PYTHONPATH (the fault wrappers are not installed)."""
    return dict(env, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))


def launch_with_faults(monkeypatch, module: str, *faults: str) -> None:
    """``run_processes`` (the launcher) starts ``module``'s processes through its fault wrapper."""
    real = launcher.Children.start

    def start(self, name, cmd, log_path, env):
        if cmd[cmd.index("-m") + 1] == module:
            cmd, env = with_faults(cmd, *faults), faults_env(env)
        return real(self, name, cmd, log_path, env)

    monkeypatch.setattr(launcher.Children, "start", start)


class Procs:
    """Child processes of a test, each in its own process group, all killed at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.items: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("ab")
        p = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env or proc_env(), start_new_session=True)
        self.items[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def log_records(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log(name).splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.items[name]
        if p.poll() is None:
            os.killpg(p.pid, sig)
        p.wait(timeout=30)

    def wait(self, name: str, timeout: float) -> int:
        return self.items[name].wait(timeout=timeout)

    def close(self) -> None:
        for p in self.items.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)


def trainer_args(config: Path, out: Path, token_file: Path, ready: Path, port: int = 0, *extra: str) -> list[str]:
    return ["-m", "dcmdp_trainer", "--config", str(config), "--port", str(port), "--host", "127.0.0.1",
            "--out", str(out), "--token-file", str(token_file), "--ready-file", str(ready), "--threads", "1",
            "--linger", "5", *extra]


def worker_args(port: int, pool: str, replica: int, token_file: Path, *extra: str) -> list[str]:
    return ["-m", "dcmdp_rollout", "--trainer", f"127.0.0.1:{port}", "--pool", pool, "--replica", str(replica),
            "--worker-id", f"{pool}-{replica}", "--token-file", str(token_file), "--threads", "1",
            "--give-up-after", "90", *extra]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, procs: Optional[Procs] = None,
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if procs is not None:
            for name, p in procs.items.items():
                if p.poll() not in (None, 0):
                    raise AssertionError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                         f"{procs.log(name)[-3000:]}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_ready(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def get_status(port: int, token: str, timeout: float = 5.0):
    import grpc

    from dcmdp.proto import dcmdp_pb2 as pb
    from dcmdp.proto import dcmdp_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return dcmdp_pb2_grpc.TrainerStub(ch).GetStatus(pb.StatusRequest(header=pb.Header()),
                                                        metadata=(("authorization", f"Bearer {token}"),),
                                                        timeout=timeout)


def same_numbers(a: dict[str, Any], b: dict[str, Any], skip_prefixes=("time/", "throughput/", "leases/")) -> list[str]:
    """Keys of ``a`` whose values differ in ``b`` (timings and runtime counters skipped)."""
    return [k for k in a if not k.startswith(skip_prefixes) and a[k] != b.get(k)]
