"""The remote rollout source's RPC-facing operations (``dcmdp_trainer/coordinator.py``)."""

from __future__ import annotations

import pytest

from dcmdp_trainer.coordinator import Coordinator
from dcmdp_trainer.session import Session
from dcmdp_trainer.weights import WeightPublisher
from runtime_helpers import tiny_run


@pytest.fixture
def coord(tmp_path):
    session = Session(tiny_run(model={"warmStart": {"steps": 0}}), tmp_path, threads=1)
    publisher = WeightPublisher(keep=2)
    publisher.publish(0, session.weights(0))
    yield Coordinator(session, publisher)
    session.metrics.close()


def test_a_first_register_records_the_pools_engine_and_precision(coord):
    coord.register("w0", "int8", "", "")  # a worker's first Register: it has not had its pool's spec yet
    coord.register("w1", "bf16", "vllm", "bf16")  # what the worker says wins
    assert (coord.workers["w0"].engine, coord.workers["w0"].precision) == ("hf", "int8")
    assert (coord.workers["w1"].engine, coord.workers["w1"].precision) == ("vllm", "bf16")


def test_a_pool_without_replicas_is_refused_by_name(coord):
    with pytest.raises(KeyError, match="unknown rollout pool 'nope' \\(pools with replicas: bf16, int8\\)"):
        coord.register("w", "nope", "hf", "bf16")
