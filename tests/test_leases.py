"""The lease book: leases expire and are re-issued; late, unknown, repeated submissions are rejected."""

from dataclasses import dataclass

from dcmdp_trainer.leases import ACTIVE, COMPLETED, EXPIRED, LeaseBook, WorkItem


@dataclass
class P:
    index: int
    ids: tuple = ()


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def item(key, pool="a", step=0, idx=(0, 1), **kw):
    return WorkItem(key, pool, step, [P(i) for i in idx], seed=1, n=4, max_new_tokens=8, **kw)


def always(v):
    return lambda item: v


def test_lease_complete_once_and_reject_repeats():
    clock = Clock()
    book = LeaseBook(timeout=5.0, clock=clock)
    book.add(item("s0/a/0"))
    rec = book.acquire("a", "w1", always(0))
    assert rec is not None and rec.version == 0 and rec.state == ACTIVE
    assert book.outstanding() == 1 and book.outstanding("w1") == 1 and book.queued("a") == 0
    assert book.acquire("a", "w2", always(0)) is None  # nothing left
    assert not book.complete(rec.lease_id, "w2").accepted  # not the holder
    v = book.complete(rec.lease_id, "w1")
    assert v.accepted and rec.state == COMPLETED and book.completed_total == 1
    again = book.complete(rec.lease_id, "w1")
    assert not again.accepted and again.reason == "duplicate"
    assert book.complete("no-such-lease", "w1").reason == "unknown"
    assert book.rejected == {"wrong-worker": 1, "duplicate": 1, "unknown": 1}
    assert book.completed_total == 1 and book.outstanding() == 0


def test_expired_lease_is_reissued_and_its_late_submission_rejected():
    clock = Clock()
    book = LeaseBook(timeout=5.0, clock=clock)
    book.add(item("s0/a/0"))
    book.add(item("s0/a/1", idx=(2, 3)))
    first = book.acquire("a", "w1", always(0))
    assert first.item.key == "s0/a/0"
    clock.t += 5.5
    # the lease is overdue: the next acquire expires it and hands its item out again, first
    second = book.acquire("a", "w2", always(0))
    assert first.state == EXPIRED and book.expired_total == 1 and book.reissued_total == 1
    assert second.item.key == "s0/a/0" and second.worker == "w2" and second.item.attempts == 1
    late = book.complete(first.lease_id, "w1")
    assert not late.accepted and late.reason == "expired"
    assert book.complete(second.lease_id, "w2").accepted
    third = book.acquire("a", "w1", always(0))
    assert third.item.key == "s0/a/1"
    # submitted after the deadline but before anyone called expire(): still expired
    clock.t += 6
    assert book.check(third.lease_id, "w1").reason == "expired"
    assert book.completed_total == 1


def test_pools_are_separate_eval_first_and_staleness_gate():
    clock = Clock()
    book = LeaseBook(timeout=5.0, clock=clock)
    book.add(item("s1/a/0", step=1))
    book.add(item("s1/b/0", pool="b", step=1))
    book.add(item("eval1/a", step=-1, is_eval=True, version=0))
    allowed = lambda it: None if it.step > 0 else 0  # step 1 not allowed yet (on-policy, version 0)
    ev = book.acquire("a", "w1", allowed)
    assert ev.item.is_eval and ev.version == 0  # evaluation first, with its fixed version
    assert book.acquire("a", "w1", allowed) is None  # step 1 is held back by the gate
    assert book.queued("a") == 1
    rec = book.acquire("a", "w1", lambda it: 1)  # version 1 published: now it may go
    assert rec.item.key == "s1/a/0" and rec.version == 1
    assert book.acquire("a", "w1", always(1)) is None  # pool b's work is not pool a's
    assert book.acquire("b", "w9", always(1)).item.key == "s1/b/0"


def test_release_requeues_and_forget_bounds_memory():
    clock = Clock()
    book = LeaseBook(timeout=5.0, clock=clock)
    book.add(item("s0/a/0"))
    rec = book.acquire("a", "w1", always(0))
    book.release(rec.lease_id, "stale")
    assert book.rejected == {"stale": 1} and book.queued("a") == 1
    assert book.complete(rec.lease_id, "w1").reason == "released"
    rec2 = book.acquire("a", "w2", always(0))
    assert rec2.item.key == "s0/a/0" and rec2.lease_id != rec.lease_id
    assert book.complete(rec2.lease_id, "w2").accepted
    book.forget(lambda r: False)
    assert rec2.lease_id not in book.leases and rec.lease_id not in book.leases
    # a forgotten lease still cannot be counted again
    assert book.complete(rec2.lease_id, "w2").reason == "unknown"
