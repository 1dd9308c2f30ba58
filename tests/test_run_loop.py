"""The run loop over the in-process rollout source: the evaluation schedule, the callbacks, the
metrics rows, the run state the status reports, and a failure of the source."""

import json

import pytest

from dcmdp.engine import Rollout
from dcmdp_trainer.local import LocalPools
from dcmdp_trainer.run_loop import RunLoop, version_lags
from dcmdp_trainer.session import Session
from runs import tiny_run


def rollout(pool, version):
    return Rollout(0, [1], [2], [-1.0], 0.0, pool, version)


def test_version_lags_are_each_pools_mean_lag_behind_the_trained_version():
    rs = [rollout("bf16", 4), rollout("int8", 2), rollout("bf16", 3), rollout("int8", 4)]
    assert version_lags(rs, 4) == {"bf16": 0.5, "int8": 1.0}
    assert version_lags([], 4) == {}


def test_one_loop_evaluates_on_schedule_calls_back_and_records_the_state(tmp_path):
    run = tiny_run(algorithm={"steps": 5}, eval={"everySteps": 2}, checkpoint={"everySteps": 3},
                   rollout={"pools": [{"name": "bf16", "precision": "bf16"},
                                      {"name": "int8", "precision": "int8", "lag": 1}]})
    session = Session(run, tmp_path, threads=1, serve_lags=True)
    pools = LocalPools(session)
    steps, evals = [], []
    loop = RunLoop(session, pools, on_step=steps.append, on_eval=evals.append)
    try:
        loop.run()
    finally:
        pools.close()
        session.close()
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4]
    assert [e["step"] for e in evals] == [0, 2, 4, 5]  # the start, every 2 steps, the end
    assert all("eval/accuracy_greedy" in steps[i] for i in (1, 3, 4)) and "eval/accuracy_greedy" not in steps[0]
    for e in evals:
        pooled = [e["pool/bf16/eval/accuracy_sampled"], e["pool/int8/eval/accuracy_sampled"]]
        assert e["eval/accuracy_sampled"] == pytest.approx(sum(pooled) / 2, abs=1e-15)
    assert all(r["time/step_s"] >= r["time/sample_s"] >= 0 for r in steps)
    assert all("throughput/tokens_per_s" not in r for r in steps)  # no token count in-process
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0, 2, 4, 5]
    st = loop.state
    assert (st.phase, st.finished, st.step, st.total_steps, st.checkpoint_step) == ("Succeeded", True, 5, 5, 3)
    assert st.last_row["step"] == 4 and st.eval_accuracy == evals[-1]["eval/accuracy_sampled"]
    # the int8 pool samples one version behind (lag 1) once there is an older version to sample with
    assert st.lag_by_pool == {"bf16": 0.0, "int8": 1.0}


class FailingPools(LocalPools):
    """The in-process source, failing at step 1 (a test wrapper)."""

    def collect(self, step):
        if step == 1:
            raise RuntimeError("engine lost")
        return super().collect(step)


def test_a_failure_of_the_source_sets_the_phase_failed_and_is_raised(tmp_path):
    session = Session(tiny_run(), tmp_path, threads=1, serve_lags=True)
    pools = FailingPools(session)
    loop = RunLoop(session, pools)
    try:
        with pytest.raises(RuntimeError, match="engine lost"):
            loop.run()
    finally:
        pools.close()
        session.close()
    assert (loop.state.phase, loop.state.message, loop.state.step) == ("Failed", "RuntimeError: engine lost", 1)
    assert not loop.state.finished
