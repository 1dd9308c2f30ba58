"""dcmdp.ranks: gpusPerReplica and its default from the template, the world size, torchrun's command."""

from __future__ import annotations

import pytest

from dcmdp import ranks
from dcmdp.spec import SpecError, parse_run
from dcmdp_testing.admission import admit
from runtime_helpers import TINY, merge


def trainer(**over):
    algo = {"miniBatchSize": 8, "promptsPerStep": 8}  # 32 sequences a mini-batch: up to 32 ranks
    return parse_run(merge(TINY, {"spec": {"algorithm": algo, "trainer": over}})).spec.trainer


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
    ({"gpusPerReplica": 8, "template": {"resources": {"limits": {"nvidia.com/gpu": "8"}}}}, 8),  # both, equal
    ({"gpusPerReplica": 2}, 2),  # no GPU limit (CPU ranks on gloo)
])
def test_gpus_per_replica_defaults_from_the_templates_gpu_limit(over, gpus):
    t = trainer(**over)
    assert ranks.gpus_per_replica(t) == gpus
    assert ranks.world_size(trainer(replicas=3, **over)) == 3 * gpus


@pytest.mark.parametrize("value", [0, 257, "2", 1.5])
def test_gpus_per_replica_is_checked(value):
    with pytest.raises(SpecError, match="spec.trainer.gpusPerReplica"):
        trainer(gpusPerReplica=value)


@pytest.mark.parametrize("over, mismatch", [
    ({"gpusPerReplica": 4, "template": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}, "4 ranks per pod but the "
     "trainer template's nvidia.com/gpu limit is 2"),
    ({"gpusPerReplica": 1, "template": {"spec": {"containers": [
        {"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}}, "1 ranks per pod but the "
     "trainer template's nvidia.com/gpu limit is 8"),
    ({"gpusPerReplica": 8, "template": {"resources": {"limits": {"nvidia.com/gpu": "8"}}}}, None),
    ({"gpusPerReplica": 4}, None),
    ({"template": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}, None),
])
def test_gpus_per_replica_must_match_the_templates_gpu_limit(over, mismatch):
    """One rank per GPU: more ranks than GPUs fail on device selection, fewer leave GPUs idle."""
    found = ranks.gpus_mismatch(trainer(**over))
    assert (found is None) if mismatch is None else found.startswith(mismatch)


def test_torchrun_command_starts_one_rank_per_gpu_of_the_replica():
    t = trainer(replicas=2, gpusPerReplica=8)
    cmd = ranks.torchrun_command(t, node_rank="$(NODE_RANK)", master_addr="r-trainer-0.r-trainer", master_port=29500,
                                 args=["--config", "c.yaml"])
    assert cmd == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "$(NODE_RANK)",
                   "--master-addr", "r-trainer-0.r-trainer", "--master-port", "29500", "--max-restarts", "0",
                   "--module", "dcmdp_trainer", "--config", "c.yaml"]


def test_more_ranks_than_a_mini_batch_has_sequences_is_refused():
    """Every rank takes a share of each mini-batch (miniBatchSize × groupSize sequences); the
    model and the CRD's CEL rule check replicas × gpusPerReplica as written (a default from the
    template's GPU limit is checked by the trainer when it starts)."""
    algo = {"groupSize": 2, "miniBatchSize": 2, "promptsPerStep": 4}
    ok = parse_run(merge(TINY, {"spec": {"algorithm": algo, "trainer": {"gpusPerReplica": 4}}}))
    assert ranks.world_size(ok.spec.trainer) == 4
    for trainer in ({"replicas": 5}, {"replicas": 2, "gpusPerReplica": 3}):
        manifest = merge(TINY, {"spec": {"algorithm": algo, "trainer": trainer}})
        with pytest.raises(SpecError, match=r"spec.trainer.gpusPerReplica: more trainer ranks"):
            parse_run(manifest)
        assert [path for path, _ in admit(manifest)[1]] == ["spec.trainer.gpusPerReplica"], trainer


def test_the_trainer_refuses_a_sampled_reference_over_several_ranks(tmp_path, monkeypatch, capfd):
    """Only rank 0 keeps the weight history δ against the sampled version needs: exit 2 at start,
    naming the field, before any rank joins the process group."""
    from dcmdp_trainer.__main__ import main
    from runtime_helpers import tiny_run, write_manifest

    config = write_manifest(tiny_run(algorithm={"discrepancyReference": "sampled"}, trainer={"gpusPerReplica": 2}),
                            tmp_path / "run.yaml")
    monkeypatch.setenv("DCMDP_TOKEN", "t")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "spec.algorithm.discrepancyReference: sampled is not supported over 2 trainer ranks" in capfd.readouterr().err
