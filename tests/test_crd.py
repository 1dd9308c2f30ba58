"""The generated CRD: current, a valid apiextensions/v1 object, structural, and in agreement with
the spec model on well over 500 generated invalid manifests (and on the valid ones)."""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from dcmdp import crd as C
from dcmdp import spec as S
from dcmdp.names import MAX_RUN_NAME
from dcmdp_testing.admission import admit, apply_defaults, validate_status

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SCHEMA = C.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# ------------------------------------------------------------------------------ the object itself
@pytest.mark.parametrize("path", C.OUTPUTS, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_crd_is_the_generated_one(path: Path) -> None:
    assert path.exists(), f"{path} is missing: run python -m dcmdp.crd --write (make crd)"
    assert path.read_text() == C.render(), f"{path} is stale: run python -m dcmdp.crd --write (make crd)"


def test_crd_passes_kubernetes_validate_strict() -> None:
    obj = yaml.safe_load(C.render())
    kubernetes_validate.validate(obj, "1.33.0", strict=True)  # raises on the first error


def test_kubernetes_validate_would_catch_a_broken_crd() -> None:
    obj = yaml.safe_load(C.render())
    obj["spec"]["versions"][0]["additionalPrinterColumns"][0]["jsonPaht"] = ".x"  # typo: strict rejects
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_names_subresources_and_columns() -> None:
    obj = C.crd()
    names = obj["spec"]["names"]
    assert obj["metadata"]["name"] == "dcmdpruns.dcmdp.io"
    assert names["shortNames"] == ["dcr"] and names["categories"] == ["dcmdp", "ml"]
    version = obj["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}  # no scale: nothing real to scale
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Steps"] == ".spec.algorithm.steps"
    assert {"Step", "Reward", "Discrepancy", "Lambdas", "Age"} <= set(columns)
    for col in version["additionalPrinterColumns"]:
        node = _node_at(col["jsonPath"])
        if col["jsonPath"] != ".metadata.creationTimestamp":
            assert node is not None, f"printer column {col['name']} points at nothing: {col['jsonPath']}"
            assert node["type"] == col["type"], col


def _node_at(json_path: str, schema: dict[str, Any] = SCHEMA) -> Any:
    node: Any = schema
    for part in json_path.strip(".").split("."):
        if node.get("type") == "array":
            node = node["items"]
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node


# --------------------------------------------------------------------------- structural schema
JUNCTORS = ("anyOf", "allOf", "oneOf", "not")
FORBIDDEN_IN_JUNCTORS = ("description", "type", "default", "additionalProperties", "nullable")


def structural_problems(node: dict[str, Any], path: str = "", in_junctor: bool = False) -> Iterator[str]:
    """kube-apiserver's structural-schema rules (apiextensions NewStructural + validation)."""
    if in_junctor:
        for key in FORBIDDEN_IN_JUNCTORS:
            if key in node:
                yield f"{path}: {key} inside anyOf/allOf/oneOf/not"
        for key in node:
            if key.startswith("x-kubernetes-"):
                yield f"{path}: {key} inside a junctor"
        if "properties" in node or "items" in node:
            yield f"{path}: properties/items inside a junctor (not mirrored outside)"
    else:
        typeless_ok = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        if not node.get("type") and not typeless_ok:
            yield f"{path}: no type"
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        yield f"{path}: x-kubernetes-preserve-unknown-fields: false is not allowed"
    if "additionalProperties" in node:
        if "properties" in node:
            yield f"{path}: additionalProperties together with properties"
        if node["additionalProperties"] is False:
            yield f"{path}: additionalProperties: false"
    if node.get("uniqueItems"):
        yield f"{path}: uniqueItems: true is forbidden"
    if node.get("type") == "array" and "items" not in node:
        yield f"{path}: array without items"
    for key in ("$ref", "definitions", "dependencies", "patternProperties", "id", "title"):
        if key in node:
            yield f"{path}: {key} is not supported"
    if node.get("x-kubernetes-list-type") == "map":
        items = node["items"]
        if items.get("type") != "object":
            yield f"{path}: a map list needs object items"
        for key in node.get("x-kubernetes-list-map-keys", []):
            prop = items.get("properties", {}).get(key)
            if prop is None:
                yield f"{path}: map key {key} is not a property"
            elif key not in items.get("required", []) and "default" not in prop:
                yield f"{path}: map key {key} must be required or defaulted"
    for key, sub in node.get("properties", {}).items():
        # apiextensions' validateStructuralMetadataInvariants: at the root and in embedded
        # resources, `metadata` may only restrict name and generateName. Elsewhere (a pod
        # template's metadata, as in Deployment-like CRDs) it is an ordinary field.
        if key == "metadata" and (not path or node.get("x-kubernetes-embedded-resource")):
            extra = set(sub.get("properties", {})) - {"name", "generateName"}
            if extra or set(sub) - {"type", "properties"}:
                yield f"{path}.metadata: only name and generateName may be restricted here"
        yield from structural_problems(sub, f"{path}.{key}", in_junctor)
    if "items" in node:
        yield from structural_problems(node["items"], f"{path}[]", in_junctor)
    for junctor in JUNCTORS:
        subs = node.get(junctor)
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs] if subs else []):
            yield from structural_problems(sub, f"{path}.{junctor}[{i}]", True)


def test_schema_is_structural() -> None:
    assert list(structural_problems(SCHEMA)) == []
    metadata = SCHEMA["properties"]["metadata"]
    assert set(metadata["properties"]) <= {"name", "generateName"}  # the only restrictions allowed


def test_structural_check_catches_violations() -> None:
    bad = copy.deepcopy(SCHEMA)
    spec = bad["properties"]["spec"]
    del spec["properties"]["suspend"]["type"]
    spec["properties"]["trainer"]["properties"]["template"]["additionalProperties"] = False
    spec["properties"]["algorithm"]["properties"]["constraint"]["properties"]["tolerance"]["anyOf"][1]["type"] = "string"
    spec["properties"]["rollout"]["properties"]["pools"]["uniqueItems"] = True
    problems = "\n".join(structural_problems(bad))
    for needle in ("suspend: no type", "additionalProperties: false", "type inside anyOf", "uniqueItems"):
        assert needle in problems


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_every_default_is_valid_under_its_own_schema() -> None:
    """The API server rejects a CRD whose defaults do not validate (after defaulting them)."""
    count = 0
    for path, node in _walk(SCHEMA):
        if "default" in node:
            value = copy.deepcopy(node["default"])
            apply_defaults(value, node)
            jsonschema.Draft4Validator(C.to_json_schema(node)).validate(value)
            count += 1
    assert count > 60


def _self_refs(rule: str) -> list[list[str]]:
    return [m.split(".")[1:] for m in re.findall(r"\bself(?:\.\w+)+", rule)]


def test_cel_rules_compile_and_name_real_fields() -> None:
    env = celpy.Environment()
    rules: set[str] = set()
    for path, node in _walk(SCHEMA):
        for r in node.get("x-kubernetes-validations", []):
            env.program(env.compile(r["rule"]))  # raises on a syntax error
            for ref in _self_refs(r["rule"]):
                sub: Any = node
                for part in ref:
                    sub = sub.get("properties", {}).get(part)
                    assert sub is not None, f"{path}: rule {r['rule']!r} names a missing field {'.'.join(ref)}"
                    if sub.get("type") == "array" or "additionalProperties" in sub:
                        break  # a list or a map: what follows is a macro (all, exists) or a key
            assert r.get("fieldPath") is None or _node_at(r["fieldPath"], node) is not None, r
            rules.add(r["rule"])
    # A model used in several places (pod templates, containers) carries its rules to each.
    model_rules = {r.rule for m in C._model_classes(S.DCMDPRun).values() for r in getattr(m, "CEL", ())}
    assert rules == model_rules and len(rules) >= 12


def test_tolerance_is_typeless_with_value_only_branches() -> None:
    tol = _node_at(".spec.algorithm.constraint.tolerance")
    assert "type" not in tol and tol["x-kubernetes-preserve-unknown-fields"] is True
    assert tol["default"] == S.ConstraintSpec.model_fields["tolerance"].default
    assert all("type" not in branch for branch in tol["anyOf"])


@pytest.mark.parametrize(
    "value, ok",
    [
        (0.0037, True), (1, True), (1e300, True), ("auto", True), ("0.01", True), ("+1", True), (".5", True),
        ("1e-3", True), ("2.", True), (0, False), (-0.1, False), ("0", False), ("0.000", False), ("-1", False),
        ("1e400", False), ("1_0", False), (" 1", False), ("auto ", False), ("Auto", False), ("nan", False),
        ("inf", False), ("", False), (True, False), (False, False), ([0.1], False), ({"c": 0.1}, False),
    ],
)
def test_tolerance_values_agree(value: Any, ok: bool) -> None:
    manifest = _run({"algorithm": {"constraint": {"tolerance": value}}, "rollout": {"pools": [{"name": "p", "tolerance": value}]}})
    _, crd_errors = admit(manifest)
    model_errors = _model_errors(manifest)
    assert (not crd_errors) == ok, crd_errors
    assert (not model_errors) == ok, model_errors
    if not ok:
        assert {p for p, _ in crd_errors} == {p for p, _ in model_errors} == {
            "spec.algorithm.constraint.tolerance",
            "spec.rollout.pools[0].tolerance",
        }


# ------------------------------------------------------------------------- model ↔ CRD agreement
def _run(spec: dict[str, Any], name: str = "r") -> dict[str, Any]:
    return {"apiVersion": S.API_VERSION, "kind": S.KIND, "metadata": {"name": name}, "spec": spec}


def _model_errors(manifest: Any) -> list[tuple[str, str]]:
    try:
        S.parse_run(manifest)
    except S.SpecError as exc:
        return exc.errors
    return []


def _bases() -> list[dict[str, Any]]:
    loaded = [yaml.load(p.read_text(), Loader=S.YAMLLoader) for p in EXAMPLES]
    return loaded + [_run({})]


def _stored(manifest: dict[str, Any]) -> dict[str, Any]:
    stored, errors = admit(manifest)
    assert not errors, errors
    return stored


@pytest.mark.parametrize("base", _bases(), ids=lambda b: b["metadata"]["name"])
def test_api_server_defaults_equal_model_defaults(base: dict[str, Any]) -> None:
    """What the cluster stores (CRD defaults applied) is what the model resolves, field by field."""
    stored_run = _stored(base)
    stored = stored_run["spec"]
    resolved = S.dump_run(S.parse_run(base))["spec"]
    # Pools are stored as written (no defaults inside list items, see test_no_drift_...); the
    # model fills them in the same.
    assert [p["name"] for p in stored["rollout"]["pools"]] == [p["name"] for p in resolved["rollout"]["pools"]]
    assert {**stored, "rollout": {**stored["rollout"], "pools": None}} == {**resolved, "rollout": {**resolved["rollout"], "pools": None}}
    assert S.dump_run(S.parse_run(stored_run))["spec"] == resolved


def _client_side_drift(desired: Any, live: Any, path: str = "") -> list[str]:
    """What a client-side three-way diff (kubectl diff, Argo CD's default) reports when the
    last-applied configuration is ``desired`` itself: a JSON merge patch (custom resources have no
    strategic merge) of the desired fields onto ``live`` that changes it. Maps merge key by key,
    lists and scalars are replaced whole."""
    if isinstance(desired, dict) and isinstance(live, dict):
        return [p for k, v in desired.items() for p in _client_side_drift(v, live.get(k), f"{path}.{k}")]
    return [] if desired == live else [path]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_no_drift_between_every_example_and_what_the_api_server_stores(path: Path) -> None:
    """GitOps: Argo CD (client-side diff) and kubectl diff see every example in sync."""
    desired = yaml.load(path.read_text(), Loader=S.YAMLLoader)
    live = _stored(desired)
    live["metadata"] = {**desired["metadata"], "uid": "u", "generation": 1}  # the server's own
    assert _client_side_drift(desired, live) == []


def test_the_drift_check_can_fail() -> None:
    live = {"spec": {"rollout": {"pools": [{"name": "a", "replicas": 1}]}}}
    assert _client_side_drift({"spec": {"rollout": {"pools": [{"name": "a"}]}}}, live) == [".spec.rollout.pools"]


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(obj)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def _fmt(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + p for i, p in enumerate(path))


def _leaf_mutations(schema: dict[str, Any], value: Any) -> Iterator[tuple[Any, bool]]:
    """(new value, whether it satisfies this node's own schema) for one node."""
    kind = schema.get("type")
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if kind == "integer":
        yield from ((v, False) for v in (str(value), 1.5, True))
        if lo is not None:
            yield lo, True
            yield lo - 1, False
        if hi is not None:
            yield hi, True
            yield hi + 1, False
    elif kind == "number":
        yield from (("abc", False), (True, False), ("0.5", False))
        if lo is not None:
            yield (lo, not schema.get("exclusiveMinimum"))
            yield lo - 1, False
        if hi is not None:
            yield (hi, not schema.get("exclusiveMaximum"))
            yield hi + 1, False
    elif kind == "string":
        yield 5, False
        if "enum" in schema:
            yield from ((v, True) for v in schema["enum"] if v is not None)
            yield "no-such-value", False
        if "pattern" in schema:
            yield "Not Valid!", False
        if schema.get("minLength"):
            yield "", False
        if schema.get("maxLength"):
            yield "a" * (schema["maxLength"] + 1), False
    elif kind == "boolean":
        yield from (("true", False), (1, False), (not value, True))
    elif kind == "array":
        yield "x", False
        yield [{"x": 1}] if schema["items"].get("type") != "object" else [5], False
        if schema.get("minItems"):
            yield [], False
        if schema.get("maxItems") and isinstance(value, list) and value:
            yield [copy.deepcopy(value[0]) for _ in range(schema["maxItems"] + 1)], False
    elif kind == "object":
        yield from (("x", False), (5, False), ([1], False))
        if "properties" in schema and isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
            yield {**value, "bogusField": 1}, False
            camel = next((k for k in value if k != k.lower()), None)
            if camel:  # the Python name of a field is not a manifest name
                snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
                yield {**{k: v for k, v in value.items() if k != camel}, snake: value[camel]}, False
    elif "anyOf" in schema:  # tolerance
        yield from ((0, False), (-1.5, False), ("zero", False), ("0", False), (True, False), ([0.1], False))
        yield from (("auto", True), (0.25, True), ("0.01", True))


def _mutations(stored: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool, str]]:
    """(label, manifest, expected valid by the node's own schema, field the error must name)."""

    def walk(node_schema: dict[str, Any], value: Any, path: tuple[Any, ...]) -> Iterator[Any]:
        for new, ok in _leaf_mutations(node_schema, value):
            yield f"{_fmt(path)}={new!r}"[:120], _set(stored, path, new), ok, _fmt(path)
        if isinstance(value, dict) and "properties" in node_schema:
            for key, sub in value.items():
                if key in node_schema["properties"]:
                    yield from walk(node_schema["properties"][key], sub, path + (key,))
        elif isinstance(value, list) and "items" in node_schema and node_schema["items"].get("type") == "object":
            for i, item in enumerate(value):
                yield from walk(node_schema["items"], item, path + (i,))

    yield from walk(SCHEMA["properties"]["spec"], stored["spec"], ("spec",))
    meta = SCHEMA["properties"]["metadata"]["properties"]["name"]
    for new in ("Bad_Name", "a" * 64, "a" * (MAX_RUN_NAME + 1), "-a", "a.", "1abc"):
        yield f"metadata.name={new!r}", _set(stored, ("metadata", "name"), new), False, "metadata.name"
    yield "apiVersion", _set(stored, ("apiVersion",), "dcmdp.io/v1"), False, "apiVersion"
    yield "kind", _set(stored, ("kind",), "DCMDPJob"), False, "kind"
    assert meta["maxLength"] == MAX_RUN_NAME


def _cross_field(stored: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool, str]]:
    """Each CEL rule broken (and kept) on purpose."""
    s = ("spec",)
    alg, con, model, task = s + ("algorithm",), s + ("algorithm", "constraint"), s + ("model",), s + ("task",)
    pools = stored["spec"]["rollout"]["pools"]
    cases: list[tuple[str, list[tuple[tuple[Any, ...], Any]], bool, str]] = [
        ("lambdaInit>lambdaMax", [(con + ("lambdaInit",), 2.0), (con + ("lambdaMax",), 1.0)], False, "lambdaInit"),
        ("lambdaInit<lambdaMin", [(con + ("lambdaInit",), 0.1), (con + ("lambdaMin",), 0.5)], False, "lambdaInit"),
        ("lambdaMin>lambdaMax", [(con + ("lambdaMin",), 3.0), (con + ("lambdaMax",), 2.0), (con + ("lambdaInit",), 2.5)], False, "lambdaMin"),
        ("lambda all equal", [(con + ("lambdaMin",), 0.5), (con + ("lambdaMax",), 0.5), (con + ("lambdaInit",), 0.5)], True, ""),
        ("miniBatch>prompts", [(alg + ("promptsPerStep",), 8), (alg + ("miniBatchSize",), 16)], False, "miniBatchSize"),
        ("prompts%miniBatch", [(alg + ("promptsPerStep",), 24), (alg + ("miniBatchSize",), 16)], False, "promptsPerStep"),
        ("prompts%miniBatch ok", [(alg + ("promptsPerStep",), 48), (alg + ("miniBatchSize",), 16)], True, ""),
        ("corrections without dc-grpo", [(alg + ("name",), "grpo"), (alg + ("corrections",), ["tis"])], False, "corrections"),
        ("corrections repeat", [(alg + ("name",), "dc-grpo"), (alg + ("corrections",), ["icepop", "icepop"])], False, "corrections"),
        ("tis and mis", [(alg + ("name",), "dc-grpo"), (alg + ("corrections",), ["tis", "mis"])], False, "corrections"),
        ("tis and icepop", [(alg + ("name",), "dc-grpo"), (alg + ("corrections",), ["tis", "icepop"])], True, ""),
        ("heads % kv", [(model + ("numHeads",), 6), (model + ("numKvHeads",), 4)], False, "numHeads"),
        ("experts per tok", [(model + ("numExperts",), 4), (model + ("numExpertsPerTok",), 5)], False, "numExpertsPerTok"),
        ("jsonl without dataset", [(task + ("name",), "jsonl"), (task + ("dataset",), None)], False, "dataset"),
        ("dataset without jsonl", [(task + ("name",), "addition"), (task + ("dataset",), {"path": "/d.jsonl"})], False, "dataset"),
        ("jsonl with dataset", [(task + ("name",), "jsonl"), (task + ("dataset",), {"path": "/d.jsonl", "verifier": "m.x:f"})], True, ""),
        ("bad verifier", [(task + ("name",), "jsonl"), (task + ("dataset",), {"path": "/d.jsonl", "verifier": "m:"})], False, "verifier"),
        ("kueue without queue", [(s + ("scheduling",), {"gang": "kueue"})], False, "queueName"),
        ("kueue with empty queue", [(s + ("scheduling",), {"gang": "kueue", "queueName": ""})], False, "queueName"),
        ("kueue with queue", [(s + ("scheduling",), {"gang": "kueue", "queueName": "q"})], True, ""),
        ("volcano without queue", [(s + ("scheduling",), {"gang": "volcano"})], True, ""),
        ("duplicate pool", [(s + ("rollout", "pools"), pools + [copy.deepcopy(pools[0])])], False, "pool"),
        ("all pools empty", [(s + ("rollout", "pools"), [{**p, "replicas": 0} for p in pools])], False, "replicas"),
        ("lag > maxStaleness", [(alg + ("maxStaleness",), 2), (s + ("rollout", "pools", 0, "lag"), 3)], False, "lag"),
        ("lag = maxStaleness", [(alg + ("maxStaleness",), 2), (s + ("rollout", "pools", 0, "lag"), 2)], True, ""),
        ("lag, no staleness limit", [(alg + ("maxStaleness",), 0), (s + ("rollout", "pools", 0, "lag"), 9)], True, ""),
    ]
    cases += _escalations(s)
    one_pool = lambda name: [(s + ("rollout", "pools"), [{"name": name, "replicas": 1}])]  # noqa: E731
    big_mb = [(alg + ("promptsPerStep",), 1024), (alg + ("miniBatchSize",), 1024)]  # room for 1001 ranks
    mb_rows = lambda m: [(alg + ("promptsPerStep",), m), (alg + ("miniBatchSize",), m), (alg + ("groupSize",), 2)]  # noqa: E731
    tt = s + ("trainer", "template")
    cases += [
        # names Kubernetes derives: <run>-trainer-<index> (pod hostname), <run>-rollout-<pool>
        ("hostname 63 by replicas", [(("metadata", "name"), "a" * 51), (s + ("trainer", "replicas"), 1000)] + one_pool("p") + big_mb, True, ""),
        ("hostname 64 by replicas", [(("metadata", "name"), "a" * 51), (s + ("trainer", "replicas"), 1001)] + one_pool("p") + big_mb, False, "metadata.name"),
        # every trainer rank takes a share of each mini-batch (miniBatchSize × groupSize sequences)
        ("ranks = mini-batch rows", [(s + ("trainer", "replicas"), 8), (s + ("trainer", "gpusPerReplica"), 8)] + mb_rows(32), True, ""),
        ("ranks > mini-batch rows", [(s + ("trainer", "replicas"), 8), (s + ("trainer", "gpusPerReplica"), 8)] + mb_rows(31), False, "gpusPerReplica"),
        ("replicas > mini-batch rows", [(s + ("trainer", "replicas"), 65), (s + ("trainer", "gpusPerReplica"), 1)] + mb_rows(32), False, "gpusPerReplica"),
        ("deployment 64", [(("metadata", "name"), "a" * 40)] + one_pool("p" * 15), False, "pools"),
        ("deployment 63", [(("metadata", "name"), "a" * 40)] + one_pool("p" * 14), True, ""),
        ("name starts with a digit", [(("metadata", "name"), "1run")], False, "metadata.name"),
        # label keys and values, as the API server checks them on the pods
        ("label key a/b/c", [(tt, {"labels": {"a/b/c": "x"}})], False, "labels"),
        ("label value with /", [(tt, {"labels": {"team": "a/b"}})], False, "labels"),
        ("label value 64", [(tt, {"labels": {"team": "x" * 64}})], False, "labels"),
        ("full-form label value", [(tt, {"metadata": {"labels": {"k": "v/1"}}})], False, "labels"),
        ("annotation key", [(tt, {"annotations": {"bad key!": "v"}})], False, "annotations"),
        ("good labels", [(tt, {"labels": {"example.com/team": "rl-1", "empty": ""}, "annotations": {"a": "any / value"}})], True, ""),
        ("kueue queue with /", [(s + ("scheduling",), {"gang": "kueue", "queueName": "team/q"})], False, "queueName"),
        ("queue 64", [(s + ("scheduling",), {"gang": "kueue", "queueName": "q" * 64})], False, "queueName"),
        ("priority class", [(s + ("scheduling",), {"priorityClassName": "High_Priority"})], False, "priorityClassName"),
    ]
    for label, edits, ok, field in cases:
        out = stored
        for path, value in edits:
            out = _set(out, path, value) if value is not None else _drop(out, path)
        yield label, out, ok, field


ESCALATING_TEMPLATES: list[tuple[str, dict[str, Any], str]] = [
    # (label, template, the field the error must name)
    ("hostNetwork", {"hostNetwork": True}, "hostNetwork"),
    ("hostPID", {"hostPID": True}, "hostPID"),
    ("hostIPC full form", {"spec": {"hostIPC": True}}, "hostIPC"),
    ("privileged sidecar", {"spec": {"containers": [{"name": "x", "image": "busybox", "securityContext": {"privileged": True}}]}}, "privileged"),
    ("privilege escalation", {"initContainers": [{"name": "i", "securityContext": {"allowPrivilegeEscalation": True}}]}, "allowPrivilegeEscalation"),
    ("capability", {"spec": {"containers": [{"name": "trainer", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}}, "capabilities"),
    ("hostPath /", {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}, "hostPath"),
    ("runAsUser 0", {"securityContext": {"runAsUser": 0}}, "runAsUser"),
    ("runAsNonRoot false", {"spec": {"securityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
    ("container root", {"spec": {"containers": [{"name": "trainer", "securityContext": {"runAsUser": 0}}]}}, "runAsUser"),
    ("unconfined seccomp", {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, "seccompProfile"),
    ("hostPort", {"spec": {"containers": [{"name": "trainer", "ports": [{"containerPort": 80, "hostPort": 80}]}]}}, "hostPort"),
    ("serviceAccountName", {"serviceAccountName": "dcmdp-operator"}, "serviceAccountName"),
    ("serviceAccount", {"spec": {"serviceAccount": "default"}}, "serviceAccount"),
    ("token", {"automountServiceAccountToken": True}, "automountServiceAccountToken"),
    # outside the allow-list (issue 15: the deny-list let these through)
    ("gitRepo volume", {"volumes": [{"name": "g", "gitRepo": {"repository": "https://example.com/x.git"}}]}, "gitRepo"),
    ("nfs volume", {"spec": {"volumes": [{"name": "n", "nfs": {"server": "10.0.0.1", "path": "/"}}]}}, "nfs"),
    ("hostProcess", {"securityContext": {"windowsOptions": {"hostProcess": True}}}, "hostProcess"),
    ("procMount Unmasked", {"spec": {"containers": [{"name": "trainer", "securityContext": {"procMount": "Unmasked"}}]}}, "procMount"),
    ("unsafe sysctl", {"securityContext": {"sysctls": [{"name": "kernel.core_pattern", "value": "|/tmp/x"}]}}, "sysctls"),
    ("SELinux spc_t", {"spec": {"securityContext": {"seLinuxOptions": {"type": "spc_t"}}}}, "seLinuxOptions"),
    ("SELinux user", {"securityContext": {"seLinuxOptions": {"user": "system_u"}}}, "seLinuxOptions"),
    ("AppArmor field", {"spec": {"containers": [{"name": "trainer", "securityContext": {"appArmorProfile": {"type": "Unconfined"}}}]}}, "appArmorProfile"),
    ("AppArmor annotation", {"metadata": {"annotations": {"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}}}, "annotations"),
    ("seccomp annotation", {"annotations": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}}, "annotations"),
    ("secret volume", {"volumes": [{"name": "s", "secret": {"secretName": "dcmdp-operator-token"}}]}, "secret"),
    ("projected secret", {"volumes": [{"name": "s", "projected": {"sources": [{"secret": {"name": "db"}}]}}]}, "secret"),
    ("secretKeyRef", {"env": [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]}, "secretKeyRef"),
    ("envFrom secret", {"spec": {"containers": [{"name": "trainer", "envFrom": [{"secretRef": {"name": "db"}}]}]}}, "secretRef"),
    ("projected token", {"volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}]}, "serviceAccountToken"),
    ("nodeName", {"nodeName": "control-plane"}, "nodeName"),
    ("shareProcessNamespace", {"spec": {"shareProcessNamespace": True}}, "shareProcessNamespace"),
    ("writable root", {"spec": {"containers": [{"name": "trainer", "securityContext": {"readOnlyRootFilesystem": False}}]}}, "readOnlyRootFilesystem"),
    ("probe host", {"spec": {"containers": [{"name": "s", "image": "x", "livenessProbe": {"httpGet": {"host": "169.254.169.254", "port": 80}}}]}}, "livenessProbe"),
    ("ephemeralContainers", {"spec": {"ephemeralContainers": [{"name": "e", "image": "x"}]}}, "ephemeralContainers"),
    ("hostIP", {"spec": {"containers": [{"name": "trainer", "ports": [{"containerPort": 80, "hostIP": "0.0.0.0"}]}]}}, "hostIP"),
    ("Bidirectional mount", {"volumeMounts": [{"name": "tmp", "mountPath": "/x", "mountPropagation": "Bidirectional"}]}, "mountPropagation"),
]
SAFE_TEMPLATES: list[tuple[str, dict[str, Any]]] = [
    ("scheduling", {"nodeSelector": {"a": "b"}, "tolerations": [{"key": "k", "operator": "Exists"}], "priorityClassName": "high"}),
    ("resources, env, volumes", {"resources": {"limits": {"cpu": "2"}}, "env": [{"name": "A", "value": "1"}], "volumes": [{"name": "c", "emptyDir": {}}]}),
    ("tightened", {"securityContext": {"runAsUser": 2000, "runAsNonRoot": True}, "hostNetwork": False, "automountServiceAccountToken": False}),
    ("NET_BIND_SERVICE", {"spec": {"containers": [{"name": "trainer", "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}}}]}}),
    ("user namespace", {"hostUsers": False}),
    ("confined profiles", {"securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}, "appArmorProfile": {"type": "RuntimeDefault"}, "seLinuxOptions": {"type": "container_t", "level": "s0:c1"}, "sysctls": [{"name": "net.ipv4.tcp_keepalive_time", "value": "60"}]}}),
    ("confined annotation", {"metadata": {"annotations": {"container.apparmor.security.beta.kubernetes.io/trainer": "runtime/default"}}}),
    ("configMaps", {"volumes": [{"name": "c", "configMap": {"name": "cfg"}}, {"name": "p", "projected": {"sources": [{"configMap": {"name": "cfg"}}, {"downwardAPI": {"items": [{"path": "l", "fieldRef": {"fieldPath": "metadata.labels"}}]}}]}}], "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}}], "envFrom": [{"configMapRef": {"name": "cfg"}}]}),
    ("native sidecar mounting the run's token", {"spec": {"initContainers": [{"name": "s", "image": "busybox", "restartPolicy": "Always", "command": ["sleep", "inf"], "volumeMounts": [{"name": "dcmdp-token", "mountPath": "/t", "readOnly": True}]}]}}),
]


def _escalations(s: tuple[Any, ...]) -> list[tuple[str, list[tuple[tuple[Any, ...], Any]], bool, str]]:
    """Every escalation refused, in the trainer's and a pool's template; harmless templates kept."""
    out: list[tuple[str, list[tuple[tuple[Any, ...], Any]], bool, str]] = []
    for where in (s + ("trainer", "template"), s + ("rollout", "pools", 0, "template")):
        out += [(f"{where[-2]}: {label}", [(where, t)], False, field) for label, t, field in ESCALATING_TEMPLATES]
        out += [(f"{where[-2]}: {label}", [(where, t)], True, "") for label, t in SAFE_TEMPLATES]
    return out


def _drop(obj: Any, path: tuple[Any, ...]) -> Any:
    out = copy.deepcopy(obj)
    node = out
    for part in path[:-1]:
        node = node[part]
    node.pop(path[-1], None)
    return out


def _names(errors: list[tuple[str, str]], field: str) -> bool:
    """An error names ``field``: its path is the field (or inside it), or its path is a parent
    and the message names the field; ``field`` without a dot is a name to find anywhere."""
    if "." not in field:
        return any(field in f"{path} {msg}" for path, msg in errors)
    last = re.split(r"[.\[]", field)[-1].rstrip("]")
    return any(
        path == field or path.startswith((field + ".", field + "[")) or (field.startswith(path) and last in msg)
        for path, msg in errors
    )


def test_crd_and_model_agree_on_generated_manifests() -> None:
    cases = []
    for base in _bases():
        stored = _stored(base)
        cases += list(_mutations(stored)) + list(_cross_field(stored))
        # and the same mutations on the manifest as written (defaults left to the server/model)
    rng = random.Random(0)
    rng.shuffle(cases)
    invalid = valid = 0
    disagreements, unnamed = [], []
    for label, manifest, ok_by_schema, field in cases:
        stored, crd_errors = admit(manifest)
        model_errors = _model_errors(manifest)
        if bool(crd_errors) != bool(model_errors):
            disagreements.append((label, crd_errors, model_errors))
            continue
        if crd_errors:
            invalid += 1
            if not ok_by_schema and field and not (_names(crd_errors, field) and _names(model_errors, field)):
                unnamed.append((label, field, crd_errors, model_errors))
        else:
            valid += 1
            # the object the cluster stores resolves, in the model, to the same run
            assert S.dump_run(S.parse_run(stored))["spec"] == S.dump_run(S.parse_run(manifest))["spec"], label
        if not ok_by_schema:
            assert crd_errors, f"{label}: expected a rejection"
    assert not disagreements, "\n".join(map(str, disagreements[:10]))
    assert not unnamed, f"{len(unnamed)} errors do not name their field:\n" + "\n".join(map(str, unnamed[:10]))
    print(f"{invalid} invalid and {valid} valid generated manifests: CRD and model agree on all")
    assert invalid >= 500 and valid >= 100, (invalid, valid)


# ------------------------------------------------------------------------------ status contract
def test_operator_status_fits_the_status_schema() -> None:
    """What the operator's pure status function writes is what the CRD's status schema accepts
    (a field the schema did not know would still survive, but typed fields must match)."""
    import datetime as dt

    from dcmdp_operator import status as st

    run = S.parse_run(yaml.load((REPO / "examples" / "kind-cpu.yaml").read_text(), Loader=S.YAMLLoader))
    trainer = {"step": 3, "total_steps": 40, "weight_version": 3, "reward_mean": 0.5, "prob_diff_mean": 0.001,
               "run_lambda": 0.2, "tolerance": 0.003, "checkpoint_step": 0, "updated_unix_ms": 1_700_000_000_000}
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    status = st.compute(run, st.Observed(trainer=trainer), None, 1, now)
    written = {k: v for k, v in status.items() if v is not None}  # None = delete in a merge patch
    assert validate_status(written) == []
    known = set(SCHEMA["properties"]["status"]["properties"])
    assert set(written) <= known, f"status fields the CRD does not declare: {set(written) - known}"
    assert validate_status({**written, "step": "three"})[0][0] == "status.step"
