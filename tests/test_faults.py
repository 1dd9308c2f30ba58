"""No hang on faults: a trainer whose final writes fail stops its server and exits 1 with the
cause; the trainer does not wait its linger for dead workers; the launcher notices a trainer that
stopped answering."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dcmdp_trainer.coordinator import Coordinator
from dcmdp_trainer.launcher import RunFailed, run_processes
from dcmdp_trainer.session import Session
from dcmdp_trainer.weights import WeightPublisher
from runtime_helpers import Procs, read_ready, tiny_run, trainer_args, wait_for, write_manifest


def test_failed_final_writes_stop_the_server_and_exit_1_with_the_cause(tmp_path):
    procs = Procs(tmp_path)
    try:
        config = write_manifest(tiny_run(model={"warmStart": {"steps": 0}}), tmp_path / "run.yaml")
        token = tmp_path / "token"
        token.write_text("t")
        ready, out = tmp_path / "ready.json", tmp_path / "out"
        procs.start("trainer", trainer_args(config, out, token, ready))
        wait_for(lambda: read_ready(ready), 120, "the trainer", procs)
        (out / "summary.json").mkdir()  # the final summary cannot be written (as on a read-only folder)
        procs.kill("trainer", signal.SIGTERM)
        assert procs.wait("trainer", 60) == 1
        log = procs.log("trainer")
        assert "final checkpoint/summary could not be written" in log and "summary.json" in log
    finally:
        procs.close()


def test_the_linger_does_not_wait_for_dead_workers(tmp_path):
    session = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp_path, threads=1)
    try:
        publisher = WeightPublisher(keep=2)
        publisher.publish(0, session.weights(0))
        coord = Coordinator(session, publisher)
        coord.register("alive", "bf16", "hf", "bf16")
        coord.register("dead", "int8", "hf", "int8")
        coord.workers["dead"].last_seen -= 30  # not heard of for 30 s, no lease
        t0 = time.monotonic()
        assert coord.wait_workers_told(1.0) is False  # the live one is waited for (and not told)
        assert 0.9 < time.monotonic() - t0 < 3
        coord.workers["alive"].told_finished = True
        t0 = time.monotonic()
        assert coord.wait_workers_told(10.0) is True  # only the dead one is left: no wait
        assert time.monotonic() - t0 < 1
    finally:
        session.metrics.close()


@pytest.mark.slow
def test_the_launcher_notices_a_trainer_that_stopped_answering(tmp_path):
    stopped = []

    def freeze(row):  # the trainer hangs (SIGSTOP) after its first step
        if not stopped:
            pid = read_ready(tmp_path / ".trainer-ready.json")["pid"]
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    run = tiny_run(algorithm={"steps": 50})
    t0 = time.monotonic()
    with pytest.raises(RunFailed, match="stopped answering"):
        run_processes(run, tmp_path, on_step=freeze, threads=1, trainer_silent_s=6)
    assert stopped and time.monotonic() - t0 < 240
    with pytest.raises(ProcessLookupError):  # and it was killed
        os.kill(stopped[0], 0)
