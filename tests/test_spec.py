"""The spec model: good manifests load, bad ones fail with the field path and the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dcmdp import ranks
from dcmdp import spec as S

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def run(spec: Any = None, **top: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": S.API_VERSION, "kind": S.KIND, "metadata": {"name": "r"}, **top}
    if spec is not None:
        out["spec"] = spec
    return out


def errors_of(manifest: Any) -> list[tuple[str, str]]:
    with pytest.raises(S.SpecError) as info:
        S.parse_run(manifest)
    return info.value.errors


# ------------------------------------------------------------------------------------- good ones
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    r = S.load_run(path)
    assert r.kind == S.KIND and r.metadata.name


def test_gpu_example_puts_trainer_and_pools_on_their_own_nodes() -> None:
    r = S.load_run(REPO / "examples" / "gpu-cluster.yaml")
    assert r.spec.trainer.precision == "bf16"
    assert r.spec.trainer.template.overlay()["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-H100")
    # a GPU cluster's trainer: on cuda, one rank per GPU of its pods, memory-bounded forwards
    assert r.spec.trainer.device == "cuda" and r.spec.trainer.micro_batch_tokens > 0
    assert r.spec.trainer.gpus_per_replica == ranks.template_gpus(r.spec.trainer.template.overlay()) == 8
    assert ranks.world_size(r.spec.trainer) == 16
    assert [(p.engine, p.precision) for p in r.spec.rollout.pools] == [("vllm", "fp8"), ("vllm", "bf16")]
    for p in r.spec.rollout.pools:
        assert p.template.overlay()["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L4"
        assert p.template.overlay()["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in p.template.overlay()["tolerations"])


def test_kind_example_is_cpu_only_and_small() -> None:
    r = S.load_run(REPO / "examples" / "kind-cpu.yaml")
    assert r.spec.model.builtin == "tiny-qwen3" and r.spec.model.path is None
    for template in [r.spec.trainer.template] + [p.template for p in r.spec.rollout.pools]:
        assert "nvidia.com/gpu" not in str(template) and "nodeSelector" not in template
    assert all(p.engine == "hf" for p in r.spec.rollout.pools)


def test_empty_manifest_is_the_default_run() -> None:
    r = S.parse_run({})
    assert r.metadata.name == "run" and r.spec.algorithm.name == "dc-grpo"
    assert [p.name for p in r.spec.rollout.pools] == ["default"]
    assert r.spec.pool_tolerance(r.spec.rollout.pools[0]) == 0.0037


@pytest.mark.parametrize(
    "spec",
    [
        {"algorithm": {"constraint": {"tolerance": "auto"}}},
        {"algorithm": {"constraint": {"tolerance": 1}}},  # an int where a number is expected
        {"algorithm": {"constraint": {"tolerance": "0.002"}}},  # a positive decimal string
        {"algorithm": {"name": "dc-grpo", "corrections": ["tis", "icepop"]}},
        {"algorithm": {"name": "tis"}},
        {"algorithm": {"promptsPerStep": 48, "miniBatchSize": 16}},
        {"algorithm": {"adamBetas": [0.0, 0.999]}},
        {"algorithm": {"maxStaleness": 2}, "rollout": {"pools": [{"name": "a", "lag": 2}]}},
        {"task": {"name": "jsonl", "dataset": {"path": "/d.jsonl", "verifier": "my_pkg.rewards:score"}}},
        {"model": {"builtin": "tiny-qwen3-moe", "numExperts": 4, "numExpertsPerTok": 4}},
        {"model": {"path": "/models/qwen", "builtin": None}},
        {"rollout": {"pools": [{"name": "a", "replicas": 0}, {"name": "b", "tolerance": "auto"}]}},
        {"scheduling": {"gang": "kueue", "queueName": "gpu"}},
        {"scheduling": {"gang": "volcano"}},
        {"checkpoint": {"pvc": {"enabled": True, "size": "1.5Ti", "storageClassName": "fast"}}},
        {"trainer": {"template": {"nodeSelector": {"pool": "gpu"}, "affinity": {"anything": {"free": "form"}}}}},
        {"ttlSecondsAfterFinished": 0, "suspend": True},
    ],
)
def test_good_specs(spec: dict[str, Any]) -> None:
    S.parse_run(run(spec))


def test_tolerance_string_becomes_a_number_and_pool_falls_back_to_the_run() -> None:
    r = S.parse_run(run({"algorithm": {"constraint": {"tolerance": "0.002"}}, "rollout": {"pools": [{"name": "a"}, {"name": "b", "tolerance": 0.5}]}}))
    a, b = r.spec.rollout.pools
    assert r.spec.pool_tolerance(a) == 0.002 and isinstance(r.spec.pool_tolerance(a), float)
    assert r.spec.pool_tolerance(b) == 0.5


def test_algorithm_helpers() -> None:
    assert S.parse_run(run({"algorithm": {"name": "icepop"}})).spec.algorithm.active_corrections == ["icepop"]
    alg = S.parse_run(run({"algorithm": {"corrections": ["mis"]}})).spec.algorithm
    assert alg.uses_constraint and alg.active_corrections == ["mis"]


def test_null_means_not_set() -> None:
    r = S.parse_run(run({"algorithm": {"steps": None}, "trainer": {"template": None}, "task": {"dataset": None}}))
    assert r.spec.algorithm.steps == 100 and r.spec.trainer.template.overlay() == {} and r.spec.task.dataset is None
    assert S.parse_run(run({"model": {"builtin": None}})).spec.model.builtin is None  # null is a value here
    assert S.ModelSpec.null_keeping_fields() == {"builtin"}


def test_dump_is_a_fixed_point() -> None:
    for path in EXAMPLES:
        first = S.dump_run(S.load_run(path))
        assert S.dump_run(S.parse_run(first)) == first
        assert "status" not in first and first["spec"]["algorithm"]["adamBetas"] == [0.9, 0.95]


# -------------------------------------------------------------------------------------- bad ones
BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, manifest, the path the error is at, a word the message has)
    ("unknown field", run({"algorithm": {"stepz": 10}}), "spec.algorithm.stepz", "unknown field"),
    ("template field off the allow-list", run({"trainer": {"template": {"nodeName": "n1"}}}), "spec.trainer.template.nodeName", "allow-list"),
    ("snake_case", run({"algorithm": {"group_size": 8}}), "spec.algorithm.group_size", "camelCase"),
    ("string for int", run({"algorithm": {"steps": "10"}}), "spec.algorithm.steps", "integer"),
    ("float for int", run({"algorithm": {"steps": 10.5}}), "spec.algorithm.steps", "integer"),
    ("bool for int", run({"trainer": {"replicas": True}}), "spec.trainer.replicas", "integer"),
    ("string for bool", run({"suspend": "yes"}), "spec.suspend", "boolean"),
    ("string for float", run({"algorithm": {"learningRate": "1e-6"}}), "spec.algorithm.learningRate", "number"),
    ("nan", run({"algorithm": {"klCoef": float("nan")}}), "spec.algorithm.klCoef", "finite"),
    ("below minimum", run({"algorithm": {"groupSize": 1}}), "spec.algorithm.groupSize", "greater than or equal to 2"),
    ("above maximum", run({"algorithm": {"clipLow": 1.0}}), "spec.algorithm.clipLow", "less than 1"),
    ("zero where > 0", run({"algorithm": {"temperature": 0}}), "spec.algorithm.temperature", "greater than 0"),
    ("bad enum", run({"algorithm": {"name": "ppo"}}), "spec.algorithm.name", "dc-grpo"),
    ("bad correction", run({"algorithm": {"corrections": ["tis", "xyz"]}}), "spec.algorithm.corrections[1]", "icepop"),
    ("bad precision", run({"rollout": {"pools": [{"name": "a", "precision": "fp4"}]}}), "spec.rollout.pools[0].precision", "fp8"),
    ("bad engine", run({"rollout": {"pools": [{"name": "a", "engine": "sglang"}]}}), "spec.rollout.pools[0].engine", "vllm"),
    ("pool without name", run({"rollout": {"pools": [{"replicas": 1}]}}), "spec.rollout.pools[0].name", "required"),
    ("pool name not DNS", run({"rollout": {"pools": [{"name": "GPU_pool"}]}}), "spec.rollout.pools[0].name", "pattern"),
    ("no pools", run({"rollout": {"pools": []}}), "spec.rollout.pools", "at least 1"),
    ("duplicate pools", run({"rollout": {"pools": [{"name": "a"}, {"name": "a"}]}}), "spec.rollout", "unique"),
    ("all pools empty", run({"rollout": {"pools": [{"name": "a", "replicas": 0}]}}), "spec.rollout", "replicas"),
    ("tolerance zero", run({"algorithm": {"constraint": {"tolerance": 0}}}), "spec.algorithm.constraint.tolerance", "> 0"),
    ("tolerance word", run({"algorithm": {"constraint": {"tolerance": "tight"}}}), "spec.algorithm.constraint.tolerance", "auto"),
    ("tolerance bool", run({"rollout": {"pools": [{"name": "a", "tolerance": True}]}}), "spec.rollout.pools[0].tolerance", "auto"),
    ("lambda order", run({"algorithm": {"constraint": {"lambdaInit": 2.0, "lambdaMax": 1.0}}}), "spec.algorithm.constraint", "lambdaInit"),
    ("lambda bounds", run({"algorithm": {"constraint": {"lambdaMin": 2.0, "lambdaMax": 1.0}}}), "spec.algorithm.constraint", "lambdaMin"),
    ("mini batch", run({"algorithm": {"promptsPerStep": 8, "miniBatchSize": 16}}), "spec.algorithm", "miniBatchSize"),
    ("divisible", run({"algorithm": {"promptsPerStep": 24, "miniBatchSize": 16}}), "spec.algorithm", "promptsPerStep"),
    ("tis+mis", run({"algorithm": {"corrections": ["tis", "mis"]}}), "spec.algorithm", "corrections"),
    ("corrections alone", run({"algorithm": {"name": "grpo", "corrections": ["tis"]}}), "spec.algorithm", "corrections"),
    ("betas", run({"algorithm": {"adamBetas": [0.9, 1.0]}}), "spec.algorithm.adamBetas[1]", "less than 1"),
    ("three betas", run({"algorithm": {"adamBetas": [0.9, 0.9, 0.9]}}), "spec.algorithm.adamBetas", "2 items"),
    ("heads", run({"model": {"numHeads": 6, "numKvHeads": 4}}), "spec.model", "numKvHeads"),
    ("head dim", run({"model": {"headDim": 16}}), "spec.model.headDim", "32"),
    ("jsonl needs dataset", run({"task": {"name": "jsonl"}}), "spec.task", "dataset"),
    ("dataset needs jsonl", run({"task": {"dataset": {"path": "x"}}}), "spec.task", "dataset"),
    ("verifier", run({"task": {"name": "jsonl", "dataset": {"path": "x", "verifier": "fuzzy"}}}), "spec.task.dataset.verifier", "module:function"),
    ("kueue queue", run({"scheduling": {"gang": "kueue"}}), "spec.scheduling", "queueName"),
    ("pvc size", run({"checkpoint": {"pvc": {"size": "ten gigs"}}}), "spec.checkpoint.pvc.size", "pattern"),
    ("lag vs staleness", run({"algorithm": {"maxStaleness": 1}, "rollout": {"pools": [{"name": "a", "lag": 3}]}}), "spec", "lag"),
    ("template not a map", run({"trainer": {"template": ["nodeSelector"]}}), "spec.trainer.template", "dictionary"),
    ("spec not a map", run("everything"), "spec", "dictionary"),
    ("wrong kind", run(kind="RayJob"), "kind", "DCMDPRun"),
    ("wrong version", run(apiVersion="dcmdp.io/v1"), "apiVersion", "v1alpha1"),
    ("bad name", {**run(), "metadata": {"name": "My Run"}}, "metadata.name", "DNS-1035 label"),
    ("bad label value", {**run(), "metadata": {"name": "r", "labels": {"team": "a b"}}}, "metadata.labels",
     "team: value 'a b' must be empty or at most 63"),
    ("annotations too big", {**run(), "metadata": {"name": "r", "annotations": {"note": "x" * 262_144}}},
     "metadata.annotations", "annotations total 262148 bytes: at most 262144"),
    ("negative ttl", run({"ttlSecondsAfterFinished": -1}), "spec.ttlSecondsAfterFinished", "greater than or equal to 0"),
]


@pytest.mark.parametrize("manifest, path, word", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifests_name_the_field(manifest: dict[str, Any], path: str, word: str) -> None:
    errors = errors_of(manifest)
    assert path in dict(errors), errors
    assert word.lower() in dict(errors)[path].lower(), errors


def test_at_least_twenty_kinds_of_bad_manifests() -> None:
    assert len(BAD) >= 20


def test_error_message_lists_every_field_once() -> None:
    with pytest.raises(S.SpecError) as info:
        S.parse_run(run({"algorithm": {"steps": 0, "groupSize": 0}, "suspend": 3}))
    text = str(info.value)
    assert text.startswith("manifest is invalid:")
    for path in ("spec.algorithm.steps", "spec.algorithm.groupSize", "spec.suspend"):
        assert text.count(f"  {path}: ") == 1


def test_not_a_mapping() -> None:
    assert errors_of(["a"]) == [("(root)", "a DCMDPRun manifest must be a mapping")]


# ------------------------------------------------------------------------------------ load_run
def test_load_run_reads_exponents_as_numbers_like_kubectl(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("kind: DCMDPRun\nspec:\n  algorithm:\n    learningRate: 1e-6\n    clipHigh: 2E-1\n")
    alg = S.load_run(f).spec.algorithm
    assert alg.learning_rate == 1e-6 and alg.clip_high == 0.2
    assert yaml.load("v: 1e-6", Loader=S.YAMLLoader) == {"v": 1e-6}
    assert yaml.load("v: 1.5", Loader=S.YAMLLoader) == {"v": 1.5}
    assert yaml.load("v: e5", Loader=S.YAMLLoader) == {"v": "e5"}


def test_load_run_picks_the_run_from_a_multi_document_file(tmp_path: Path) -> None:
    f = tmp_path / "all.yaml"
    f.write_text("kind: ConfigMap\nmetadata: {name: x}\n---\nkind: DCMDPRun\nmetadata: {name: picked}\n")
    assert S.load_run(f).metadata.name == "picked"


@pytest.mark.parametrize(
    "text, path, word",
    [
        (None, "(file)", "no such file"),
        ("spec: [unclosed", "(yaml)", "not valid YAML"),
        ("kind: A\n---\nkind: B\n", "kind", "no document"),
        ("kind: DCMDPRun\nspec: {algorithm: {steps: -1}}\n", "spec.algorithm.steps", "greater"),
    ],
)
def test_load_run_errors(tmp_path: Path, text: Any, path: str, word: str) -> None:
    f = tmp_path / "run.yaml"
    if text is not None:
        f.write_text(text)
    with pytest.raises(S.SpecError) as info:
        S.load_run(f)
    assert info.value.errors[0][0] == path and word in info.value.errors[0][1]
    assert str(f) in str(info.value)


# ------------------------------------------------------------ policy-loss conventions (issue 17)
def test_policy_loss_conventions_parse_with_todays_defaults() -> None:
    alg = S.parse_run(run({})).spec.algorithm
    assert (alg.advantage_std, alg.loss_aggregation, alg.loss_denominator, alg.correction_level) == (
        "population", "token-mean", "all", "token")
    assert alg.dual_clip is None and alg.log_ratio_clamp == 20.0 and alg.mis_low == 0.0
    verl_like = {"advantageStd": "unbiased", "lossAggregation": "seq-mean-token-sum", "lossAggregationConstant": 1024,
                 "lossDenominator": "kept", "dualClip": 3, "logRatioClamp": 20, "misLow": 0.5,
                 "correctionLevel": "geometric", "corrections": ["mis"]}
    alg = S.parse_run(run({"algorithm": verl_like})).spec.algorithm
    assert alg.dual_clip == 3.0 and alg.loss_aggregation_constant == 1024.0 and alg.correction_level == "geometric"


@pytest.mark.parametrize("field, value, word", [
    ("advantageStd", "sample", "unbiased"),
    ("lossAggregation", "sum", "seq-mean-token-mean"),
    ("lossAggregationConstant", 0, "greater than 0"),
    ("lossDenominator", "dropped", "kept"),
    ("dualClip", 1.0, "greater than 1"),
    ("logRatioClamp", 100, "less than or equal to 80"),
    ("misLow", 1.0, "less than 1"),
    ("correctionLevel", "batch", "geometric"),
])
def test_policy_loss_convention_errors_name_the_field(field: str, value: Any, word: str) -> None:
    errs = errors_of(run({"algorithm": {field: value}}))
    assert any(path == f"spec.algorithm.{field}" and word in msg for path, msg in errs), errs


def test_max_staleness_auto_points_at_adaptive_staleness():
    doc = {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "x"},
           "spec": {"algorithm": {"maxStaleness": "auto"}}}
    [(field, message)] = errors_of(doc)
    assert field == "spec.algorithm.maxStaleness"
    assert message.startswith("'auto' is spelt `adaptiveStaleness: true` with `maxStaleness: K`")
    doc["spec"]["algorithm"] = {"name": "dc-grpo", "maxStaleness": 3, "adaptiveStaleness": True}
    assert S.parse_run(doc).spec.algorithm.adaptive_staleness


def test_an_unknown_field_names_the_closest_known_one():
    doc = {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "x"},
           "spec": {"algorithm": {"groupSise": 4, "constraint": {"lamdaInit": 0.1}},
                    "rollout": {"pools": [{"name": "a", "precison": "bf16"}]}, "zzz": 1}}
    assert sorted(errors_of(doc)) == [
        ("spec.algorithm.constraint.lamdaInit", "unknown field (did you mean lambdaInit?)"),
        ("spec.algorithm.groupSise", "unknown field (did you mean groupSize?)"),
        ("spec.rollout.pools[0].precison", "unknown field (did you mean precision?)"),
        ("spec.zzz", "unknown field (check the spelling; fields are camelCase)"),
    ]


def test_a_template_resources_map_of_the_wrong_shape_is_an_error_naming_it():
    with pytest.raises(S.ValidationError) as e:
        S.TrainerSpec.model_validate({"template": {"resources": {"limits": -0.25}}})
    assert "template.resources" in str(e.value) and "resources.limits must be a map" in str(e.value)
    assert ranks.template_gpus({"resources": {"limits": -0.25}}) is None  # (and never a crash on a raw overlay)
