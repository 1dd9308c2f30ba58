"""The status snapshot: the typed RunStatus the trainer reports, and its wire form."""

import math

import pytest

from dcmdp.proto import dcmdp_pb2 as pb
from dcmdp.status import POOL_FIELDS, TRAINER_FIELDS, RunStatus
from dcmdp_trainer.run_state import RunState
from dcmdp_trainer.status_snapshot import (STATUS_ATTRIBUTES, TrainerStatus, WorkerInfo, known, pool_status,
                                           snapshot, to_proto)

ROW = {"reward/mean": 0.5, "discrepancy/prob_diff_mean": 0.004, "constraint/run_lambda": 0.25,
       "constraint/tolerance": math.nan,  # `auto` still calibrating
       "pool/bf16/discrepancy/prob_diff_mean": 0.002, "pool/bf16/constraint/lambda": 0.144,
       "pool/bf16/constraint/tolerance": 0.003, "pool/bf16/discrepancy/tokens": 900, "pool/bf16/reward/mean": 0.75}


def status():
    state = RunState(total_steps=20, step=12, checkpoint_step=10, phase="Running", eval_accuracy=0.4,
                     last_row=ROW, lag_by_pool={"bf16": 0.5}, updated=1767268800.25)
    pools = [pool_status("bf16", ROW, workers=2, lag=0.5, dropped=3),
             pool_status("int8", ROW, workers=1, lag=0.0, dropped=0)]
    workers = [WorkerInfo(worker_id="w0", pool="bf16", weight_version=12, last_seen_unix_ms=5, leases=1)]
    return snapshot(state, run_name="r", weight_version=12, pools=pools, queue_depth=4, leases_outstanding=1,
                    leases_expired=2, rollouts_dropped_stale=3, workers=workers)


def test_known_is_a_finite_number_or_none():
    assert known({"a": 1}, "a") == 1.0 and known({"a": math.inf}, "a") is None
    assert known({}, "a") is None and known({"a": None}, "a") is None and known({"a": True}, "a") is None


def test_the_snapshot_is_a_run_status_with_the_trainers_figures():
    st = status()
    assert isinstance(st, RunStatus) and isinstance(st, TrainerStatus)
    assert (st.phase, st.step, st.total_steps, st.weight_version, st.checkpoint_step) == ("Running", 12, 20, 12, 10)
    assert (st.reward, st.prob_diff_mean, st.run_lambda, st.eval_accuracy) == (0.5, 0.004, 0.25, 0.4)
    assert st.tolerance is None  # calibrating: unknown, never 0
    assert st.updated_unix_ms == 1767268800250 and st.finished is False
    bf16, int8 = st.pools
    assert (bf16.name, bf16.prob_diff_mean, bf16.lambda_, bf16.tolerance, bf16.tokens, bf16.workers, bf16.reward,
            bf16.version_lag_mean, bf16.rollouts_dropped_stale) == ("bf16", 0.002, 0.144, 0.003, 900, 2, 0.75, 0.5, 3)
    assert (int8.prob_diff_mean, int8.lambda_, int8.tolerance, int8.tokens, int8.reward) == (None, None, None, 0, None)


def test_the_wire_form_carries_every_field_and_leaves_unknown_ones_unset():
    msg = to_proto(status())
    assert msg.header.weight_version == 12 and msg.run_name == "r" and msg.phase == "Running"
    assert (msg.step, msg.total_steps, msg.queue_depth, msg.leases_outstanding, msg.leases_expired,
            msg.rollouts_dropped_stale, msg.checkpoint_step) == (12, 20, 4, 1, 2, 3, 10)
    assert msg.reward_mean == 0.5 and msg.run_lambda == 0.25 and msg.eval_accuracy == 0.4
    assert not msg.HasField("tolerance")
    assert msg.pools[0].HasField("lambda") and getattr(msg.pools[0], "lambda") == 0.144
    assert msg.pools[0].version_lag_mean == 0.5 and msg.pools[0].rollouts_dropped_stale == 3
    assert not msg.pools[1].HasField("lambda") and not msg.pools[1].HasField("reward_mean")
    assert [(w.worker_id, w.pool, w.weight_version, w.last_seen_unix_ms, w.leases) for w in msg.workers] == [
        ("w0", "bf16", 12, 5, 1)]


def test_the_field_list_is_the_models_every_proto_field_has_its_attribute():
    scalars = {f.name for f in pb.Status.DESCRIPTOR.fields if f.message_type is None}
    assert set(STATUS_ATTRIBUTES) == scalars
    # what the operator copies maps through the same attributes as RunStatus names them
    for proto, camel in TRAINER_FIELDS.items():
        attr = STATUS_ATTRIBUTES[proto]
        assert (RunStatus.model_fields[attr].alias or attr) == camel
    assert set(POOL_FIELDS) <= {f.name for f in pb.PoolStatus.DESCRIPTOR.fields}


def test_the_run_state_copy_is_consistent_and_unknown_fields_are_refused():
    state = RunState(total_steps=3)
    copy = state.copy()
    state.update(step=2, last_row={"a": 1})
    assert copy.step == 0 and copy.last_row == {} and state.step == 2
    with pytest.raises(AttributeError, match="RunState has no field 'stepz'"):
        state.update(stepz=1)
