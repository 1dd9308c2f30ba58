"""``dcmdp run -f``: the trainer and one worker process per pool replica on loopback.

The same entry points as the pods of a cluster (``dcmdp-trainer``, ``dcmdp-rollout``), started as
child processes: the trainer on a free port with a generated run token, then every worker. The
launcher follows the trainer's metrics.jsonl / eval.jsonl (the trainer writes them in ``--out``)
into the progress callbacks, so the progress bar, metrics.jsonl and plots are the same as the
in-process runner's. Every child runs in its own process group and gets SIGTERM if the launcher
dies (``PR_SET_PDEATHSIG``); Ctrl-C or a failing child stops them all (SIGTERM, then SIGKILL)
and the run ends with an error. Child logs (JSON lines) are in ``OUT/logs/``. A run of more than
one trainer rank (``replicas × gpusPerReplica``, ``dcmdp.ranks``) starts them all here, as one
node: torchrun's environment (``RANK`` = ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``),
logs ``trainer-<rank>.log``.

A ``vllm`` pool's workers run under the vLLM venv's Python: ``$DCMDP_VLLM_PYTHON`` or
``.venv-vllm/bin/python`` beside this venv (``make vllm-venv``).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional


from dcmdp import yamlfile
from dcmdp.ranks import world_size
from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.proto import dcmdp_pb2_grpc
from dcmdp.transport.channel import open_channel
from dcmdp.spec import DCMDPRun, dump_run

Callback = Callable[[dict[str, Any]], None]
READY_TIMEOUT_S = 600.0
TRAINER_SILENT_S = 60.0  # a trainer that answered no GetStatus for this long has hung: the run fails


class RunFailed(SystemExit):
    """A child process failed: the message names it and ends with its last log lines."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.message = message


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_python(engine: str) -> str:
    """The interpreter for a pool's worker: the vLLM venv for ``vllm``, this one otherwise."""
    if engine != "vllm":
        return sys.executable
    env = os.environ.get("DCMDP_VLLM_PYTHON")
    if env:
        return env
    for root in (Path(sys.prefix).parent, Path.cwd()):
        cand = root / ".venv-vllm" / "bin" / "python"
        if cand.exists():
            return str(cand)
    raise RunFailed("a vllm pool needs the vLLM venv: run `make vllm-venv` (creates .venv-vllm) "
                    "or set DCMDP_VLLM_PYTHON to its python")


class Child:
    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def close(self) -> None:
        self._log.close()


class Children:
    """The run's child processes; ``stop`` leaves none behind."""

    def __init__(self) -> None:
        self.items: list[Child] = []

    def start(self, *args) -> Child:
        c = Child(*args)
        self.items.append(c)
        return c

    def stop(self, grace: float = 15.0) -> None:
        for c in self.items:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.items:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in self.items:
            c.signal(signal.SIGKILL)
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            c.close()


class TrainerWatch:
    """Asks the trainer for its status every ``every_s`` (one call in flight at a time, never
    blocking the caller); :meth:`silent_for` is how long it has answered none."""

    def __init__(self, target: str, token: str, every_s: float = 5.0, timeout_s: float = 10.0):
        self._channel = open_channel(target, token)
        self._call = dcmdp_pb2_grpc.TrainerStub(self._channel).GetStatus
        self._request = pb.StatusRequest()
        self.every_s, self.timeout_s = every_s, timeout_s
        self.last_answer = time.monotonic()
        self._pending: Any = None
        self._next = time.monotonic()

    def silent_for(self) -> float:
        now = time.monotonic()
        if self._pending is not None and self._pending.done():
            if self._pending.exception() is None:
                self.last_answer = now
            self._pending = None
        if self._pending is None and now >= self._next:
            self._pending = self._call.future(self._request, timeout=self.timeout_s)
            self._next = now + self.every_s
        return now - self.last_answer

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._channel.close()


class JsonlFollower:
    """New complete lines of a JSON-lines file, as they are appended."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def run_processes(run: DCMDPRun, out_dir: Path, *, steps: Optional[int] = None, resume: bool = False,
                  on_step: Optional[Callback] = None, on_eval: Optional[Callback] = None, threads: int = 0,
                  host: str = "127.0.0.1", worker_threads: Optional[int] = None,
                  extra_env: Optional[dict[str, str]] = None, trainer_silent_s: float = TRAINER_SILENT_S) -> dict[str, Any]:
    """Run the manifest as separate trainer and worker processes; returns the trainer's summary.

    ``threads`` (torch threads) applies to every process; when 0, the trainer keeps torch's
    default and each worker gets cores // (1 + workers) threads (at least 1), so the processes do
    not oversubscribe the machine."""
    from dcmdp_trainer import checkpoint

    out = Path(out_dir)
    if resume and checkpoint.latest(out) is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(out)}")
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    config = out / "run.yaml"
    config.write_text(yamlfile.dumps(dump_run(run)))
    token_file = out / ".token"
    token_file.touch(mode=0o600)
    os.chmod(token_file, 0o600)
    token_file.write_text(secrets.token_urlsafe(32))
    ready = out / ".trainer-ready.json"
    ready.unlink(missing_ok=True)
    if not resume:
        for f in ("metrics.jsonl", "eval.jsonl", "summary.json"):
            (out / f).unlink(missing_ok=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    env.pop("DCMDP_TOKEN", None)
    spec = run.spec
    children = Children()
    watch: Optional[TrainerWatch] = None
    try:
        trainer_cmd = [sys.executable, "-m", "dcmdp_trainer", "--config", str(config), "--port", "0",
                       "--host", host, "--metrics-port", "0", "--out", str(out), "--token-file", str(token_file),
                       "--ready-file", str(ready), "--linger", "10"]
        if resume:
            trainer_cmd.append("--resume")
        if steps:
            trainer_cmd += ["--steps", str(steps)]
        if threads:
            trainer_cmd += ["--threads", str(threads)]
        ranks = world_size(spec.trainer)  # all on this machine: one node, LOCAL_RANK = RANK (torchrun's env)
        rank_env = {}
        if ranks > 1:
            rank_env = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": host,
                        "MASTER_PORT": str(free_port(host))}
        trainers = []
        for r in range(ranks):
            e = dict(env, **rank_env, RANK=str(r), LOCAL_RANK=str(r)) if ranks > 1 else env
            trainers.append(children.start(f"trainer-{r}" if ranks > 1 else "trainer", trainer_cmd,
                                           logs / (f"trainer-{r}.log" if ranks > 1 else "trainer.log"), e))
        trainer = trainers[0]
        info = _wait_ready(ready, trainers)
        target = f"{host}:{info['port']}"
        start_step = int(info.get("step", 0))
        wthreads = worker_threads if worker_threads is not None else threads
        if not wthreads:  # share the cores: the trainer keeps torch's default, workers split the rest
            n_workers = sum(p.replicas for p in spec.rollout.pools)
            wthreads = max(1, (os.cpu_count() or 1) // (1 + n_workers))
        workers = []
        for pool in spec.rollout.pools:
            for i in range(pool.replicas):
                cmd = [worker_python(pool.engine), "-m", "dcmdp_rollout", "--trainer", target, "--pool", pool.name,
                       "--replica", str(i), "--worker-id", f"{pool.name}-{i}", "--token-file", str(token_file),
                       "--metrics-port", "0", "--metrics-host", host, "--give-up-after", "60"]
                if wthreads:
                    cmd += ["--threads", str(wthreads)]
                workers.append(children.start(f"worker {pool.name}-{i}", cmd, logs / f"rollout-{pool.name}-{i}.log", env))

        metrics, evals = JsonlFollower(out / "metrics.jsonl"), JsonlFollower(out / "eval.jsonl")
        if resume and evals.path.exists():
            evals.offset = evals.path.stat().st_size  # evaluations of the run before the restart

        def pump() -> None:
            for row in evals.poll():
                if on_eval:
                    on_eval(row)
            for row in metrics.poll():
                if row.get("step", 0) >= start_step and on_step:
                    on_step(row)

        watch = TrainerWatch(target, token_file.read_text().strip(), every_s=min(5.0, trainer_silent_s / 3))
        while True:
            pump()
            code = trainer.poll()
            if code is not None:
                break
            silent = watch.silent_for()
            if silent > trainer_silent_s:
                raise RunFailed(f"the trainer (pid {trainer.pid}) stopped answering: no GetStatus reply for "
                                f"{silent:.0f} s; its log ({trainer.log_path}):\n{trainer.tail()}")
            for c in trainers[1:] + workers:
                rc = c.poll()
                if rc is not None and rc != 0:
                    raise RunFailed(f"{c.name} (pid {c.pid}) exited with code {rc}; its log "
                                    f"({c.log_path}):\n{c.tail()}")
            time.sleep(0.2)
        pump()
        if code != 0:
            raise RunFailed(f"the trainer (pid {trainer.pid}) exited with code {code}; its log "
                            f"({trainer.log_path}):\n{trainer.tail()}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(c.poll() is None for c in workers + trainers):
            time.sleep(0.1)
        summary = json.loads((out / "summary.json").read_text())
        summary["processes"] = {c.name: {"pid": c.pid, "exit": c.poll()} for c in children.items}
        return summary
    finally:
        if watch is not None:
            watch.close()
        children.stop()


def _wait_ready(ready: Path, trainers: list[Child]) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists():
            return json.loads(ready.read_text())
        for t in trainers:
            rc = t.poll()
            if rc is not None:
                raise RunFailed(f"{t.name} (pid {t.pid}) exited with code {rc} before serving; its log "
                                f"({t.log_path}):\n{t.tail()}")
        time.sleep(0.1)
    raise RunFailed(f"the trainer did not start serving within {READY_TIMEOUT_S:.0f} s")
