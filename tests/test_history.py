"""The weight history: older versions kept only in the wire dtypes a worker may still fetch them in."""

import pytest
import torch

from dcmdp_trainer.history import forms_for, narrow, wanted
from dcmdp_trainer.leases import LeaseBook, WorkItem
from dcmdp_trainer.weights import SOURCE, WeightPublisher, WeightsUnavailable

ALL = {"bf16": 0, "fp16": 0, "fp32": 0}


def test_wanted_lag_windows_and_pins():
    # a lag-2 bf16 pool needs newest-2 and newest-1 in bf16; a pin adds its own dtype; newest is not "older"
    assert wanted(10, range(5, 11), {"bf16": 2, "fp32": 0}, [(6, "fp16"), (9, "fp32")]) == {
        6: {"fp16"}, 8: {"bf16"}, 9: {"bf16", "fp32"}}
    assert wanted(10, range(5, 11), ALL) == {}


@pytest.mark.parametrize("dtypes, forms", [
    ({"bf16"}, ("bf16",)), ({"fp16"}, ("fp16",)), ({"bf16", "fp16"}, ("fp32",)), ({"fp32", "bf16"}, ("fp32",)),
])
def test_forms_for_is_the_cheapest(dtypes, forms):
    assert forms_for(dtypes) == forms


def test_forms_for_names_an_unknown_dtype():
    with pytest.raises(ValueError, match="int8"):
        forms_for({"int8"})


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(300, 7, generator=g), "b.bias": torch.randn(33, generator=g),
            "steps": torch.tensor([seed], dtype=torch.long)}


def stream(pub: WeightPublisher, version: int, dtype: str) -> list[tuple[bytes, int]]:
    return [(c.data, c.crc32) for c in pub.chunks(version, dtype)]


def test_older_versions_keep_only_what_may_be_fetched_in_its_wire_dtype():
    pins: set = set()
    pub = WeightPublisher(keep=5, bucket_bytes=1024, lags=ALL, pinned=lambda: pins)
    states = [state(v) for v in range(5)]
    pub.publish(0, states[0])
    before = {d: stream(pub, 0, d) for d in ("bf16", "fp16")}  # cached layouts and crcs of v0
    pins = {(0, "bf16")}  # a bf16 worker holds a lease naming v0
    pub.publish(1, states[1])
    assert pub.kept_forms() == {0: ("bf16",), 1: (SOURCE,)}
    kept = pub._snapshots[0]["bf16"]
    assert kept["a.weight"].dtype == torch.bfloat16 and kept["steps"] is states[0]["steps"]  # ints shared
    assert stream(pub, 0, "bf16") == before["bf16"]  # the copy streams the same bytes and crcs
    with pytest.raises(WeightsUnavailable, match="no longer kept in fp16"):
        pub.prepared(0, "fp16")
    pins = {(1, "bf16"), (1, "fp16")}  # 16-bit copies in both would cost as much as fp32: the snapshot
    pub.publish(2, states[2])
    assert pub.kept_forms() == {1: (SOURCE,), 2: (SOURCE,)}
    assert pub._snapshots[1][SOURCE] is states[1]
    pins = set()
    pub.publish(3, states[3])
    assert pub.kept_forms() == {3: (SOURCE,)}
    with pytest.raises(WeightsUnavailable, match="version 2 is not kept"):
        pub.prepared(2, "bf16")


def test_lagged_pools_keep_their_window_and_keep_bounds_everything():
    pub = WeightPublisher(keep=3, bucket_bytes=1024, lags={"fp16": 2, "fp32": 0},
                          pinned=lambda: {(v, "fp32") for v in range(10)})
    for v in range(6):
        pub.publish(v, state(v))
    # the fp16 pool samples v3 and will sample v4; the fp32 pins reach back no further than keep = 3
    assert pub.kept_forms() == {3: (SOURCE,), 4: (SOURCE,), 5: (SOURCE,)}
    pub.pinned = None
    pub.publish(6, state(6))
    assert pub.kept_forms() == {4: ("fp16",), 5: ("fp16",), 6: (SOURCE,)}
    assert torch.equal(pub._snapshots[4]["fp16"]["a.weight"], state(4)["a.weight"].half())


def test_a_version_the_trainer_holds_anyway_is_not_copied():
    held = {}
    pub = WeightPublisher(keep=3, lags={"bf16": 2}, held_elsewhere=lambda v: v in held)
    for v in range(3):
        held[v] = state(v)
        pub.publish(v, held[v])
    assert pub.kept_forms() == {0: (SOURCE,), 1: (SOURCE,), 2: (SOURCE,)}
    assert all(pub._snapshots[v][SOURCE] is held[v] for v in range(3))


def test_without_lags_the_last_versions_are_kept_whole():
    pub = WeightPublisher(keep=2)
    for v in range(4):
        pub.publish(v, state(v))
    assert pub.kept_forms() == {2: (SOURCE,), 3: (SOURCE,)}


def test_narrow_rounds_as_the_wire_does():
    s = state(0)
    got = narrow(s, "fp16")
    assert got["b.bias"].dtype == torch.float16 and torch.equal(got["b.bias"], s["b.bias"].half())
    assert got["steps"] is s["steps"]


def test_lease_book_names_active_leases_and_fixed_queued_versions():
    book = LeaseBook(timeout=10.0, clock=lambda: 0.0)
    book.add(WorkItem("s1/bf16/0", "bf16", 1, [], 0, 1, 4))
    book.add(WorkItem("eval/fp32", "fp32", -1, [], 0, 1, 4, is_eval=True, version=3))
    assert book.named_versions() == {("fp32", 3)}
    rec = book.acquire("bf16", "w1", lambda item: 7)
    assert book.named_versions() == {("fp32", 3), ("bf16", 7)}
    book.complete(rec.lease_id, "w1")
    assert book.named_versions() == {("fp32", 3)}


def test_the_runtime_pins_what_leases_name_until_they_end(tmp_path):
    """The publisher as ``python -m dcmdp_trainer`` wires it to the real coordinator: a version
    stays while a lease names it (in its pool's wire dtype), and goes once the lease has ended."""
    from dcmdp.precision import wire_dtype
    from dcmdp_trainer.__main__ import lease_pins
    from dcmdp_trainer.coordinator import Coordinator
    from dcmdp_trainer.history import pool_lags
    from dcmdp_trainer.session import Session
    from runs import tiny_run

    run = tiny_run(algorithm={"maxStaleness": 3, "steps": 8},
                   rollout={"pools": [{"name": "a", "precision": "bf16"}, {"name": "b", "precision": "fp32"}]})
    s = Session(run, tmp_path, threads=1)
    dtype_of = {p.name: wire_dtype(p.precision) for p in run.spec.rollout.pools}
    pub = WeightPublisher(keep=s.max_lag + 1, dtypes=sorted(set(dtype_of.values())),
                          lags=pool_lags(run.spec.rollout.pools), held_elsewhere=lambda v: v in s.history)
    pub.publish(s.version, s.weights(s.version))
    coord = Coordinator(s, pub)
    pub.pinned = lambda: lease_pins(coord, dtype_of)
    coord.state.update(phase="Running")
    coord.start()
    coord.register("w", "a", "hf", "bf16")
    lease, _ = coord.acquire("w", "a", 0)
    assert lease.version == 0

    def publish() -> None:
        with torch.no_grad():
            next(s.model.parameters()).add_(1.0)
        s.version += 1
        s._publish()
        coord.published()

    publish()  # v1: v0 is named by the lease and is the version the coordinator handed out until now
    assert pub.kept_forms() == {0: (SOURCE,), 1: (SOURCE,)}
    publish()  # v2: only pool a's lease names v0 now: a bf16 copy of it
    assert pub.kept_forms() == {0: ("bf16",), 1: (SOURCE,), 2: (SOURCE,)}
    assert coord.book.complete(lease.lease_id, "w").accepted
    publish()  # v3: nothing names v0 or v1 any more
    assert pub.kept_forms() == {2: (SOURCE,), 3: (SOURCE,)}
    s.metrics.close()
