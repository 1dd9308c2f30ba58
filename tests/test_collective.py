"""The data plane's signs of life against a real TCPStore: a worker's Heartbeat, the trainer's
LifeWatch (a rank that stops beating is reported dead; give_up reaches every heartbeat), the
trainer's wait for every rank's "done", and the interruptible wait on an operation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dcmdp.transport.collective import (Heartbeat, LifeWatch, alive_key, broadcast, client_store, done_key,
                                        master_store, open_group, wait)


@pytest.fixture
def store():
    return master_store("127.0.0.1", 10.0)


def test_a_rank_that_stops_beating_is_reported_dead_and_give_up_reaches_the_others(store):
    dead: list[int] = []
    watch = LifeWatch(store, "g", 3, dead.append, dead_after_s=1.0)
    survivor = Heartbeat(client_store("127.0.0.1", store.port, 5.0), "g", 1)
    doomed = Heartbeat(client_store("127.0.0.1", store.port, 5.0), "g", 2)
    try:
        time.sleep(1.2)
        assert dead == [] and store.add(alive_key("g", 1), 0) >= 2  # both beat
        doomed.close()  # (stopped without saying it received everything: as if killed)
        deadline = time.monotonic() + 5
        while not dead and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dead == [2]
        watch.give_up()
        assert survivor.failed.wait(3.0)  # the survivor stops waiting at once, not at its timeout
    finally:
        survivor.close()
        doomed.close()
        watch.close()
    assert not store.check([alive_key("g", 1)])  # close() removed the counters


def test_a_rank_that_said_done_is_never_reported_dead(store):
    dead: list[int] = []
    watch = LifeWatch(store, "g", 2, dead.append, dead_after_s=0.6)
    beat = Heartbeat(client_store("127.0.0.1", store.port, 5.0), "g", 1)
    try:
        beat.close(done=True)
        watch.wait_done(threading.Event(), 5.0)
        time.sleep(1.5)
        assert dead == []
    finally:
        watch.close()


def test_the_trainer_sees_the_last_done_within_milliseconds_not_a_poll_period(store):
    """The round ends (and the workers' group is free for their next version) as soon as the last
    worker says it is done; the wait had slept 100 ms between looks."""
    peer = client_store("127.0.0.1", store.port, 5.0)
    took = []
    for attempt in range(3):
        group = f"g{attempt}"
        watch = LifeWatch(store, group, 3, lambda r: None)
        try:
            def finish():
                time.sleep(0.005)
                for r in (1, 2):
                    peer.set(done_key(group, r), "1")

            threading.Thread(target=finish).start()
            t0 = time.perf_counter()
            watch.wait_done(threading.Event(), 5.0)
            took.append(time.perf_counter() - t0)
        finally:
            watch.close()
    assert min(took) < 0.05, took


def test_wait_done_leaves_when_stopped_or_timed_out(store):
    watch = LifeWatch(store, "g", 2, lambda r: None)
    try:
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        with pytest.raises(RuntimeError, match="given up"):
            watch.wait_done(stop, 30.0)
        with pytest.raises(RuntimeError, match="did not finish receiving within"):
            watch.wait_done(threading.Event(), 0.3)
    finally:
        watch.close()


def test_a_wait_on_an_operation_whose_peer_never_comes_leaves_when_stopped(store):
    """gloo ends an operation whose peer is gone only at its timeout (60 s here); ``wait`` leaves
    as soon as the round is given up."""
    out: dict = {}
    peer = client_store("127.0.0.1", store.port, 10.0)  # (a store connection of its own, as a worker has)
    t = threading.Thread(target=lambda: out.update(pg=open_group(peer, "w", 1, 2, join_timeout_s=10.0)))
    t.start()
    pg = open_group(store, "w", 0, 2, join_timeout_s=10.0)
    t.join()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    work = broadcast(out["pg"], torch.zeros(16), 60.0)  # rank 1 receives; rank 0 never sends
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="given up"):
        wait(work, stop)
    assert time.monotonic() - t0 < 5
    broadcast(pg, torch.ones(16), 10.0).wait()  # (let the pending receive complete before teardown)
    work.wait()


class StuckStore:
    """A store whose every call blocks: a connection that stalls (a DNS timeout inside torch's
    connect took 5 s here)."""

    def __init__(self):
        self.release = threading.Event()

    def add(self, key, n):
        self.release.wait(30)
        return 0

    def check(self, keys):
        return False

    def set(self, key, value):
        pass


def test_closing_a_stuck_heartbeat_waits_once_not_once_per_call():
    """The receive path closes its heartbeat when done and again on the way out: a heartbeat stuck
    in a store call cost the worker 5 s per call (10 s) after its data had arrived."""
    stuck = StuckStore()
    beat = Heartbeat(stuck, "g", 1)
    try:
        t0 = time.monotonic()
        beat.close(done=True)
        beat.close()
        assert 4.5 < time.monotonic() - t0 < 7.0
    finally:
        stuck.release.set()


def test_the_open_file_limit_is_raised_towards_what_kept_groups_need():
    import resource
    import subprocess
    import sys

    # in a child whose soft limit starts at 256 (hard limit as it is): raised to min(4096, hard)
    code = ("import resource; from dcmdp.transport.collective import raise_open_file_limit as r; "
            "s, h = resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (256, h)); "
            "print(r(4096), r(100))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    assert out.stdout.split() == [str(want), str(want)]  # (and never lowered)
