"""The offline API-server emulation: each step does what kube-apiserver does, in its order."""

from __future__ import annotations

from typing import Any

from dcmdp import spec as S
from dcmdp_testing.admission import admit, validate_status


def run(spec: Any = None, **top: Any) -> dict[str, Any]:
    out = {"apiVersion": S.API_VERSION, "kind": S.KIND, "metadata": {"name": "r"}, **top}
    if spec is not None:
        out["spec"] = spec
    return out


def test_an_empty_spec_is_fully_defaulted() -> None:
    stored, errors = admit(run())
    assert errors == []
    spec = stored["spec"]
    assert spec["algorithm"]["steps"] == 100 and spec["algorithm"]["constraint"]["tolerance"] == 0.0037
    # the default pool, with no defaults inside (list items carry none: GitOps, see test_crd.py)
    assert spec["rollout"]["pools"] == [{"name": "default"}]
    assert spec["algorithm"]["adamBetas"] == [0.9, 0.95]


def test_defaults_fill_inside_a_given_object_but_not_inside_list_items() -> None:
    pools = [{"name": "a"}, {"name": "b", "replicas": 0}]
    stored, _ = admit(run({"algorithm": {"steps": 7}, "rollout": {"pools": pools}}))
    assert stored["spec"]["algorithm"]["steps"] == 7 and stored["spec"]["algorithm"]["groupSize"] == 8
    assert stored["spec"]["rollout"]["pools"] == pools  # as written; the spec model fills them in
    assert [p.replicas for p in S.parse_run(stored).spec.rollout.pools] == [1, 0]


def test_null_is_dropped_then_defaulted_but_nullable_null_survives() -> None:
    stored, errors = admit(run({"algorithm": {"steps": None, "constraint": {"tolerance": None}}, "model": {"builtin": None}}))
    assert errors == []
    assert stored["spec"]["algorithm"]["steps"] == 100
    assert stored["spec"]["algorithm"]["constraint"]["tolerance"] == 0.0037
    assert stored["spec"]["model"]["builtin"] is None  # nullable: null is a value here
    model = S.parse_run(run({"algorithm": {"steps": None}, "model": {"builtin": None}}))
    assert model.spec.algorithm.steps == 100 and model.spec.model.builtin is None  # the model agrees


def test_unknown_fields_are_errors_except_inside_free_form_template_objects() -> None:
    _, errors = admit(run({"algorithm": {"stepz": 3}}))
    assert errors == [("spec.algorithm.stepz", 'unknown field "spec.algorithm.stepz"')]
    _, errors = admit(run(surprise=1))
    assert errors == [("surprise", 'unknown field "surprise"')]
    _, errors = admit(run({"trainer": {"template": {"nodeName": "n1"}}}))
    assert errors == [("spec.trainer.template.nodeName", 'unknown field "spec.trainer.template.nodeName"')]
    template = {"nodeSelector": {"pool": "gpu"}, "affinity": {"anything": {"goes": [1, 2]}}}
    stored, errors = admit(run({"trainer": {"template": template}}))
    assert errors == [] and stored["spec"]["trainer"]["template"] == template


def test_status_is_ignored_on_create() -> None:
    stored, errors = admit(run({}, status={"phase": 42}))
    assert errors == [] and "status" not in stored


def test_kind_version_and_name_are_required() -> None:
    assert admit(run(kind="Job"))[1][0][0] == "kind"
    assert admit(run(apiVersion="dcmdp.io/v2"))[1][0][0] == "apiVersion"
    manifest = run()
    del manifest["metadata"]["name"]
    assert admit(manifest)[1][0][0] == "metadata.name"
    assert admit(["not", "a", "mapping"])[1] == [("(root)", "a DCMDPRun manifest must be a mapping")]


def test_all_schema_errors_are_reported_together_with_paths() -> None:
    _, errors = admit(run({"algorithm": {"steps": 0, "clipLow": 1.5}, "rollout": {"pools": [{"name": "A"}]}}))
    assert [p for p, _ in errors] == ["spec.algorithm.clipLow", "spec.algorithm.steps", "spec.rollout.pools[0].name"]


def test_pattern_end_is_the_end_of_the_text_as_in_go() -> None:
    # Python's `$` also matches before a final newline; Go's RE2 (the API server) does not.
    _, errors = admit(run({"rollout": {"pools": [{"name": "abc\n"}]}}))
    assert [p for p, _ in errors] == ["spec.rollout.pools[0].name"]


def test_cel_sees_numbers_as_doubles_like_the_api_server() -> None:
    # lambdaMin: 0 (an int in YAML) <= lambdaInit: 0.5 (a double): fine only if both are doubles.
    _, errors = admit(run({"algorithm": {"constraint": {"lambdaMin": 0, "lambdaInit": 0.5, "lambdaMax": 1}}}))
    assert errors == []


def test_cel_runs_only_after_the_schema_passes() -> None:
    _, errors = admit(run({"algorithm": {"promptsPerStep": "64", "miniBatchSize": 16}}))
    assert errors == [("spec.algorithm.promptsPerStep", "'64' is not of type 'integer'")]


def test_duplicate_pool_names_are_rejected_by_the_list_map() -> None:
    _, errors = admit(run({"rollout": {"pools": [{"name": "a"}, {"name": "a"}]}}))
    assert errors == [("spec.rollout.pools[1]", "Duplicate value: {'name': 'a'}")]


def test_validate_status() -> None:
    good = {
        "phase": "Running",
        "observedGeneration": 3,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Training", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "step": 10,
        "runLambda": 0.3,
        "lambdas": "bf16=0.2",
        "pools": [{"name": "bf16", "probDiffMean": 0.001, "lambda": 0.2, "tokens": 100, "workers": 2}],
        "futureField": {"kept": True},
    }
    assert validate_status(good) == []
    bad = {**good, "step": -1, "conditions": [{"type": "Ready", "status": "yes"}, {"type": "Ready", "status": "True"}]}
    paths = [p for p, _ in validate_status(bad)]
    assert "status.step" in paths and "status.conditions[0].status" in paths and "status.conditions[1]" in paths
