"""Pure tests: which spec changes a live run takes, and which it refuses."""

from __future__ import annotations

from dcmdp.spec import parse_run
from dcmdp_operator import children, spec_changes
from dcmdp_operator.config import OperatorConfig

BASE = {
    "model": {"hiddenSize": 128},
    "rollout": {"pools": [{"name": "a", "replicas": 2}, {"name": "b", "replicas": 1, "template": {"nodeSelector": {"x": "1"}}}]},
}


def run_of(spec: dict):
    return parse_run({"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "r"}, "spec": spec})


def accepted(spec: dict) -> dict:
    """The record the operator keeps: the ConfigMap it built for this spec."""
    cm = next(o for o in children.build(run_of(spec), {"name": "r", "namespace": "n", "uid": "u"}, token="t",
                                       config=OperatorConfig()) if o["kind"] == "ConfigMap")
    return children.read_accepted(cm)


def test_a_new_run_takes_its_spec():
    run = run_of(BASE)
    assert spec_changes.reconcile_spec(None, run) == (run, [])


def test_unchanged_spec_has_no_diff_even_with_defaults_spelled_out():
    spelled = {**BASE, "algorithm": {"steps": 100}, "suspend": False}
    eff, refused = spec_changes.reconcile_spec(accepted(BASE), run_of(spelled))
    assert refused == [] and eff.spec == run_of(BASE).spec


def test_safe_changes_apply_live():
    new = {
        **BASE,
        "suspend": True,
        "ttlSecondsAfterFinished": 60,
        "rollout": {"pools": [{"name": "a", "replicas": 5, "image": "img:2"}, {"name": "b", "replicas": 0, "template": {"nodeSelector": {"x": "2"}}}]},
    }
    eff, refused = spec_changes.reconcile_spec(accepted(BASE), run_of(new))
    assert refused == []
    assert eff.spec.suspend is True and eff.spec.ttl_seconds_after_finished == 60
    assert [p.replicas for p in eff.spec.rollout.pools] == [5, 0]
    assert eff.spec.rollout.pools[0].image == "img:2"
    assert eff.spec.rollout.pools[1].template.overlay() == {"nodeSelector": {"x": "2"}}


def test_unsafe_changes_are_refused_and_the_safe_part_still_applies():
    new = {**BASE, "model": {"hiddenSize": 256}, "algorithm": {"steps": 7}, "suspend": True,
           "rollout": {"pools": [{"name": "a", "replicas": 4, "precision": "fp16"}, BASE["rollout"]["pools"][1]]}}
    eff, refused = spec_changes.reconcile_spec(accepted(BASE), run_of(new))
    assert refused == ["spec.algorithm.steps", "spec.model.hiddenSize", "spec.rollout.pools[0].precision"]
    assert eff.spec.model.hidden_size == 128 and eff.spec.algorithm.steps == 100  # the accepted values
    assert eff.spec.rollout.pools[0].precision == "bf16"
    assert eff.spec.suspend is True and eff.spec.rollout.pools[0].replicas == 4  # the safe part


def test_adding_or_renaming_pools_is_refused_whole():
    new = {**BASE, "rollout": {"pools": [{"name": "a", "replicas": 9}, {"name": "c", "replicas": 1}]}}
    eff, refused = spec_changes.reconcile_spec(accepted(BASE), run_of(new))
    # with other pools, even a replica change is not taken: the whole change waits
    assert refused == ["spec.rollout.pools[0].replicas", "spec.rollout.pools[1].name",
                       "spec.rollout.pools[1].template.nodeSelector"]
    assert [p.name for p in eff.spec.rollout.pools] == ["a", "b"]
    assert eff.spec.rollout.pools[0].replicas == 2  # different pools: no replica change taken either
    grown = {**BASE, "rollout": {"pools": BASE["rollout"]["pools"] + [{"name": "c"}]}}
    eff, refused = spec_changes.reconcile_spec(accepted(BASE), run_of(grown))
    assert refused == ["spec.rollout.pools"] and len(eff.spec.rollout.pools) == 2


def test_an_unreadable_record_accepts_the_new_spec():
    run = run_of(BASE)
    assert spec_changes.reconcile_spec({"spec": {"model": {"hiddenSize": "big"}}}, run) == (run, [])
    assert spec_changes.reconcile_spec({"nospec": 1}, run) == (run, [])


def test_diff_paths():
    assert spec_changes.diff_paths({"a": 1, "b": [1, {"c": 2}]}, {"a": 1, "b": [1, {"c": 3}], "d": 0}, "spec") == [
        "spec.b[1].c", "spec.d"]
    assert spec_changes.diff_paths([1], [1, 2], "x") == ["x"]
