"""The worker registry: bounded, silent idle workers forgotten, who is still to be told the run ended
(an injected wall clock: no test sleeps)."""

import pytest

from dcmdp_trainer.worker_registry import WORKER_SILENT_S, TooManyWorkers, WorkerRegistry


class Clock:
    def __init__(self):
        self.t = 1_700_000_000.0

    def __call__(self):
        return self.t


def registry(max_workers=2, leases=None):
    clock = Clock()
    held = leases if leases is not None else {}
    return WorkerRegistry(max_workers, leases=lambda wid: held.get(wid, 0), clock=clock), clock, held


def test_a_call_registers_and_refreshes_a_worker():
    reg, clock, _ = registry()
    w = reg.seen("a", "bf16", 3)
    assert (w.worker_id, w.pool, w.version, w.last_seen, w.told_finished) == ("a", "bf16", 3, clock.t, False)
    clock.t += 5
    assert reg.seen("a", "bf16", 4) is w and (w.version, w.last_seen) == (4, clock.t)
    assert reg.in_pool("bf16") == 1 and reg.in_pool("int8") == 0


def test_a_full_registry_refuses_a_new_worker_until_one_is_silent_and_idle():
    reg, clock, held = registry()
    reg.seen("a", "bf16", 0)
    reg.seen("b", "int8", 0)
    with pytest.raises(TooManyWorkers, match=r"2 rollout workers heard from in the last 300 s \(at most 2\): "
                                             r"worker 'c' refused"):
        reg.entry("c", "bf16")
    clock.t += WORKER_SILENT_S + 1  # both silent now; a holds a lease, so only b may go
    held["a"] = 1
    reg.seen("c", "bf16", 0)
    assert sorted(reg.workers) == ["a", "c"]
    assert [w.worker_id for w in reg.heard_within(10)] == ["c"]


def test_who_is_still_to_be_told_the_run_finished():
    reg, clock, held = registry(max_workers=8)
    for wid in ("live", "busy", "dead", "told"):
        reg.seen(wid, "bf16", 0)
    clock.t += 30
    reg.seen("live", "bf16", 0)
    held["busy"] = 1
    reg.workers["told"].told_finished = True
    assert [w.worker_id for w in reg.waiting_to_be_told(silent_s=6)] == ["live", "busy"]


def test_the_bound_must_admit_a_worker():
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        WorkerRegistry(0, leases=lambda wid: 0)
