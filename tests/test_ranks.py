"""dcmdp.ranks: gpusPerReplica and its default from the template, the world size, torchrun's command."""

from __future__ import annotations

import pytest

from dcmdp import ranks
from dcmdp.spec import SpecError, parse_run
from runtime_helpers import TINY, merge


def trainer(**over):
    return parse_run(merge(TINY, {"spec": {"trainer": over}})).spec.trainer


@pytest.mark.parametrize("over, gpus", [
    ({}, 1),
    ({"template": {"resources": {"limits": {"nvidia.com/gpu": "8"}}}}, 8),  # short form
    ({"template": {"resources": {"limits": {"nvidia.com/gpu": 4}}}}, 4),
    ({"template": {"spec": {"containers": [{"name": "sidecar", "resources": {"limits": {"nvidia.com/gpu": 2}}},
                                           {"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": 4}}}]}}}, 4),
    ({"template": {"spec": {"containers": [{"name": "sidecar", "resources": {"limits": {"nvidia.com/gpu": 2}}}]}}}, 1),
    ({"template": {"resources": {"requests": {"nvidia.com/gpu": "8"}}}}, 1),  # a limit, not a request
    ({"template": {"resources": {"limits": {"nvidia.com/gpu": "500m"}}}}, 1),  # not whole GPUs
    ({"template": {"resources": {"limits": {"nvidia.com/gpu": "0"}}}}, 1),
    ({"gpusPerReplica": 2, "template": {"resources": {"limits": {"nvidia.com/gpu": "8"}}}}, 2),  # explicit wins
])
def test_gpus_per_replica_defaults_from_the_templates_gpu_limit(over, gpus):
    t = trainer(**over)
    assert ranks.gpus_per_replica(t) == gpus
    assert ranks.world_size(trainer(replicas=3, **over)) == 3 * gpus


@pytest.mark.parametrize("value", [0, 257, "2", 1.5])
def test_gpus_per_replica_is_checked(value):
    with pytest.raises(SpecError, match="spec.trainer.gpusPerReplica"):
        trainer(gpusPerReplica=value)


def test_torchrun_command_starts_one_rank_per_gpu_of_the_replica():
    t = trainer(replicas=2, gpusPerReplica=8)
    cmd = ranks.torchrun_command(t, node_rank="$(NODE_RANK)", master_addr="r-trainer-0.r-trainer", master_port=29500,
                                 args=["--config", "c.yaml"])
    assert cmd == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "$(NODE_RANK)",
                   "--master-addr", "r-trainer-0.r-trainer", "--master-port", "29500", "--max-restarts", "0",
                   "--module", "dcmdp_trainer", "--config", "c.yaml"]
