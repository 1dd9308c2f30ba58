"""The staleness rule: exact values of the pure rule, then the rule and the lease clock in the
trainer's remote rollout source (a real Session; time from an injected clock, so no test sleeps)."""

import pytest

from dcmdp.engine import Sample
from dcmdp_trainer.coordinator import Coordinator, Rejected
from dcmdp_trainer.rollout_source import RunFailed
from dcmdp_trainer.session import Session
from dcmdp_trainer.staleness import Staleness, adaptive_lag
from dcmdp_trainer.weights import WeightPublisher
from runs import tiny_run


def test_bound_is_the_larger_of_max_staleness_and_the_pools_lag():
    rule = Staleness(1, {"bf16": 0, "int8": 3})
    assert rule.bound("bf16") == 1 and rule.bound("int8") == 3


def test_a_pool_samples_lag_versions_behind_within_what_is_kept():
    rule = Staleness(0, {"bf16": 0, "int8": 2})
    assert rule.pool_version("bf16", 7) == 7
    assert rule.pool_version("int8", 7, oldest_kept=0) == 5
    assert rule.pool_version("int8", 7) == 7  # nothing kept but the newest
    assert rule.pool_version("int8", 7, oldest_kept=6) == 6  # version 5 is no longer kept
    assert rule.pool_version("int8", 1, oldest_kept=0) == 0


def test_which_steps_may_be_sampled_and_which_submissions_are_stale():
    rule = Staleness(1, {"a": 0})
    assert [rule.may_sample("a", s, 4) for s in (3, 4, 5, 6)] == [True, True, True, False]
    assert [rule.is_stale("a", 6, v) for v in (4, 5, 6)] == [True, False, False]
    assert rule.last_step(4, total_steps=100) == 5 and rule.last_step(4, total_steps=5) == 4
    assert Staleness(0, {"a": 0}).last_step(4, total_steps=100) == 4  # strictly on-policy


def test_negative_figures_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="maxStaleness"):
        Staleness(-1, {})
    with pytest.raises(ValueError, match=r"pools\[a\].lag"):
        Staleness(0, {"a": -1})


def test_adaptive_lag_is_proportional_to_the_multipliers_slack():
    # lag = clip(floor(K (1 − λ/λmax) + 1/2), 0, K)
    assert [adaptive_lag(lam, 1.0, 3) for lam in (0.0, 0.1, 0.2, 0.5, 0.6, 0.9, 1.0)] == [3, 3, 2, 2, 1, 0, 0]
    assert adaptive_lag(5.0, 10.0, 4) == 2 and adaptive_lag(2.5, 10.0, 4) == 3
    assert adaptive_lag(0.3, 0.0, 3) == 3  # λmax = 0: the multiplier can never bind
    assert adaptive_lag(1.0, 1.0, 0) == 0
    with pytest.raises(ValueError, match="maxStaleness"):
        adaptive_lag(0.0, 1.0, -1)
    with pytest.raises(ValueError, match="not finite"):
        adaptive_lag(float("nan"), 1.0, 3)
    rule = Staleness(3, {"a": 0}).with_max_staleness(1)
    assert rule.bound("a") == 1 and rule.last_step(4, total_steps=100) == 5


def test_adaptive_staleness_in_process_samples_at_the_lag_lambda_allows(tmp_path):
    """The in-process runner: each step's rollouts lag exactly the lag set from the previous
    step's λ, and metrics.jsonl lets anyone check the law from the file's own values."""
    from dcmdp.metrics import read_metrics
    from dcmdp_trainer.local import run_inprocess

    run = tiny_run(algorithm={"steps": 7, "maxStaleness": 3, "adaptiveStaleness": True,
                              "constraint": {"tolerance": 1e-9, "lambdaLR": 100.0, "lambdaInit": 0.0}},
                   rollout={"pools": [{"name": "n", "precision": "fp32", "noise": 1.0}]})
    run_inprocess(run, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    lags = [r["staleness/lag"] for r in rows]
    assert lags[0] == 3 and lags[-1] == 0  # λ starts at 0 (full lag), is pushed to λmax (no lag)
    for prev, row in zip(rows, rows[1:]):
        assert row["staleness/lag"] == prev["staleness/lag_next"]
        assert prev["staleness/lag_next"] == adaptive_lag(row["pool/n/constraint/lambda"], 1.0, 3)
    for row in rows:  # the version lag the rollouts really had (limited by the versions there are)
        assert row["version/lag_max"] == min(row["staleness/lag"], row["step"])
        assert row["throughput/steps_per_min"] > 0


def test_adaptive_staleness_needs_dc_grpo_and_a_ceiling():
    from dcmdp.spec import SpecError

    with pytest.raises(SpecError, match="adaptiveStaleness"):
        tiny_run(algorithm={"name": "grpo", "maxStaleness": 2, "adaptiveStaleness": True})
    with pytest.raises(SpecError, match="adaptiveStaleness"):
        tiny_run(algorithm={"adaptiveStaleness": True})


# -- the rule and the lease clock in the remote source -------------------------------------------
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    run = tiny_run(algorithm={"steps": 4, "maxStaleness": 0},
                   rollout={"leaseTimeoutSeconds": 30, "stallTimeoutSeconds": 60,
                            "pools": [{"name": "bf16", "precision": "bf16"}]})
    s = Session(run, tmp_path_factory.mktemp("run"), threads=1)
    yield s
    s.metrics.close()


def source(session):
    clock = Clock()
    publisher = WeightPublisher(keep=2)
    publisher.publish(0, session.weights(0))
    coord = Coordinator(session, publisher, clock=clock)
    coord.state.update(phase="Running")
    coord.start()
    return coord, clock


def samples(rec):
    return [Sample(p.index, [5, 6], [-1.0, -1.0]) for p in rec.item.prompts for _ in range(rec.item.n)]


def test_strictly_on_policy_queues_one_step_and_drops_an_older_submission(session):
    coord, _ = source(session)
    assert coord.issued_through == 0 and coord.book.queued("bf16") == 2  # 8 prompts in items of 4
    # version 1 is published (the weights are the same tensors: only the version matters here)
    coord.publisher.publish(1, session.weights(0))
    with coord.cond:
        coord.version = 1
        coord._fill()
    assert coord.issued_through == 1
    leased = [coord.acquire("w0", "bf16", 1)[0] for _ in range(3)]
    assert [r.item.key for r in leased] == ["s0/bf16/0", "s0/bf16/1", "s1/bf16/0"]
    rec = leased[2]
    assert rec.item.step == 1 and rec.version == 1
    with pytest.raises(Rejected, match="stale: sampled with version 0, step 1 allows at most 0 versions of lag"):
        coord.submit("w0", "bf16", rec.lease_id, 0, samples(rec), 0.1, 8)
    n = len(samples(rec))
    assert coord.dropped_stale == n and coord.dropped_by_pool == {"bf16": n} and coord.dropped_since_step == n
    assert coord.book.queued("bf16") == 2  # s1/bf16/1 and the dropped item, back to be leased again to be leased again
    assert coord.snapshot().rollouts_dropped_stale == n


def test_an_expired_lease_is_refused_and_its_item_leased_again(session):
    coord, clock = source(session)
    rec = coord.acquire("w0", "bf16", 0)[0]
    clock.t += 31  # past leaseTimeoutSeconds
    with pytest.raises(Rejected, match="expired"):
        coord.submit("w0", "bf16", rec.lease_id, 0, samples(rec), 0.1, 8)
    again = coord.acquire("w1", "bf16", 0)[0]
    assert again.item.key == rec.item.key and again.item.attempts == 1 and coord.book.expired_total == 1
    assert coord.submit("w1", "bf16", again.lease_id, 0, samples(again), 0.1, 8) == len(samples(again))
    assert coord.buffers[0].done == 1


def test_no_accepted_rollout_for_the_stall_timeout_fails_the_run_at_once(session):
    coord, clock = source(session)
    clock.t += 61
    with pytest.raises(RunFailed, match=r"no rollout accepted for 61 s \(rollout.stallTimeoutSeconds 60\); "
                                        r"0 worker\(s\) registered: is any rollout worker running\?"):
        coord.collect(0)
    assert coord.snapshot().phase == "Failed"
