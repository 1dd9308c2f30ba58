"""The ``DCMDPRun`` CustomResourceDefinition, generated from the spec model (never hand-written).

``python -m dcmdp.crd --write`` writes ``crds/dcmdp.io_dcmdpruns.yaml`` and the Helm chart's copy;
``python -m dcmdp.crd`` prints it; ``tests/test_crd.py`` fails when a committed copy is stale.

How the pydantic model becomes a *structural* ``openAPIV3Schema`` (what kube-apiserver demands):

* ``$ref``\\s are inlined, titles dropped, ``const`` becomes a one-value ``enum``, JSON-Schema
  2020 ``exclusiveMinimum: x`` becomes OpenAPI's ``minimum: x, exclusiveMinimum: true``.
* Defaults: scalar defaults are copied; a nested object gets ``default: {}`` so the API server
  creates it and fills *its* defaults (the stored object is the fully resolved run, and printer
  columns such as ``.spec.algorithm.steps`` always have a value); ``rollout.pools`` defaults to
  the model's one ``default`` pool.
* ``null`` means "not set" on both sides: the API server drops a ``null`` of a non-nullable field
  before defaulting, and the model does the same (``SpecModel._null_means_unset``). Only a field
  where ``null`` differs from its default (``model.builtin``) is ``nullable: true``.
* A ``tuple[X, X]`` is an array of ``X`` with ``minItems = maxItems = 2``.
* Pod ``template`` overlays declare only the allow-listed fields (:mod:`dcmdp.podsecurity`): the
  API server refuses any other (``unknown field`` under kubectl's strict field validation; a
  client that asks for none has it pruned, never applied), and CEL rules refuse the escalating
  values. A CRD generated ``--allow otherFields`` (or ``volumes``) preserves unknown fields there.
* ``tolerance`` is "a number > 0, or ``auto``, or a positive decimal string". A structural schema
  cannot give a node two types (``type`` is forbidden inside ``anyOf``, and
  ``x-kubernetes-int-or-string`` rejects floats), so the node is typeless with
  ``x-kubernetes-preserve-unknown-fields: true`` and an ``anyOf`` of three *value-only* branches
  (see :func:`_tolerance_schema`). CEL cannot be used here: the API server gives a typeless
  node no CEL type, so no rule can see it.
* Each model class's ``CEL`` rules (in ``dcmdp/spec.py``, beside the Python validator that
  enforces the same rule) become ``x-kubernetes-validations`` on that object.
* ``rollout.pools`` is a ``map`` list keyed by ``name`` (server-side apply merges pools by name,
  and the API server itself rejects a repeated name). Its items carry no defaults (GitOps: a
  client-side diff sees a list whole); the spec model fills them in.
* ``status`` has its own schema, from :class:`dcmdp.status.RunStatus`: what the operator writes.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel

from dcmdp import names, podsecurity
from dcmdp import spec as S
from dcmdp.status import RunStatus

GROUP = S.API_GROUP
VERSION = S.API_VERSION.split("/", 1)[1]
KIND = S.KIND
PLURAL = S.PLURAL
SINGULAR = KIND.lower()
SHORT_NAMES = ["dcr"]
CATEGORIES = ["dcmdp", "ml"]
NAME = f"{PLURAL}.{GROUP}"
FILENAME = f"{GROUP}_{PLURAL}.yaml"

REPO = Path(__file__).resolve().parent.parent
# The generated CRD lives here and in the Helm chart (Helm installs a chart's crds/ folder first).
OUTPUTS = (REPO / "crds" / FILENAME, REPO / "helm" / "dcmdp" / "crds" / FILENAME)

# kube-apiserver's CEL cost estimator needs bounds on lists that rules iterate over.
_MAX_CORRECTIONS = len(S.Correction.__args__)  # unique values of a 3-value enum



# ---------------------------------------------------------------------------- schema builder
def _model_classes(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from ``root``, by the name pydantic uses in ``$defs``."""
    found: dict[str, type[BaseModel]] = {}

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                return
            found[tp.__name__] = tp
            for f in tp.model_fields.values():
                walk(f.annotation)
        for arg in getattr(tp, "__args__", ()) or ():
            walk(arg)

    walk(root)
    return found


def _tolerance_schema(description: Optional[str], default: Any) -> dict[str, Any]:
    """A typeless node taking a number > 0, ``auto``, or a positive decimal string.

    Each ``anyOf`` branch uses value validations only (``type`` is forbidden there). A validation
    keyword applies only to values of its own type, so each branch shuts out the types it does not
    want with bounds nothing can meet: ``minLength: 1, maxLength: 0`` (no string), ``minItems: 1,
    maxItems: 0`` (no array), ``minProperties: 1, maxProperties: 0`` (no object), ``minimum: 0,
    maximum: -1`` (no number) and ``not: {enum: [true, false]}`` (no boolean).
    """
    no_array = {"minItems": 1, "maxItems": 0}
    no_object = {"minProperties": 1, "maxProperties": 0}
    no_bool = {"not": {"enum": [True, False]}}
    out: dict[str, Any] = {}
    if description:
        out["description"] = description
    if default is not None:
        out["default"] = default
    out["x-kubernetes-preserve-unknown-fields"] = True
    out["anyOf"] = [
        {"minimum": 0, "exclusiveMinimum": True, "minLength": 1, "maxLength": 0, **no_array, **no_object, **no_bool},
        {"enum": ["auto"]},
        {"pattern": S.POSITIVE_NUMBER, "minimum": 0, "maximum": -1, **no_array, **no_object, **no_bool},
    ]
    return out


def _field_default(model: type[BaseModel], alias: str) -> tuple[bool, Any]:
    """(has a default, the default as the API server should store it) for a field of ``model``."""
    for name, f in model.model_fields.items():
        if (f.alias or name) != alias:
            continue
        if f.is_required():
            return False, None
        value = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
        if value is None:
            return False, None
        if isinstance(value, BaseModel):
            # Only what differs from the nested defaults; the API server fills in the rest.
            return True, value.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        if isinstance(value, list):
            return True, [
                v.model_dump(mode="json", by_alias=True, exclude_defaults=True) if isinstance(v, BaseModel) else v
                for v in value
            ]
        if isinstance(value, tuple):
            return True, list(value)
        return True, value
    raise KeyError(f"{model.__name__} has no field {alias!r}")


class _Builder:
    def __init__(self, root: type[BaseModel], allow: frozenset[str] = frozenset()):
        self.allow = allow  # pod-security escalations whose CEL rules are left out
        self.schema = root.model_json_schema(by_alias=True)
        self.defs = dict(self.schema.get("$defs", {}))
        self.defs[root.__name__] = {k: v for k, v in self.schema.items() if k != "$defs"}
        self.classes = _model_classes(root)

    def deref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node = {**self.defs[name], **rest, "x-model": name}
        return node

    def convert(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        node = self.deref(node)
        if "anyOf" in node:
            branches = [b for b in node["anyOf"] if b.get("type") != "null"]  # see convert_object
            outer = {k: v for k, v in node.items() if k not in ("anyOf", "default", "title")}
            if len(branches) == 1:
                return self.convert({**self.deref(branches[0]), **outer}, path)
            types = sorted(b.get("type", "?") + ("=" + str(b["const"]) if "const" in b else "") for b in branches)
            if types == ["number", "string=auto"]:
                return _tolerance_schema(node.get("description"), None)
            raise ValueError(f"{path}: no structural form for the union {types}")

        out: dict[str, Any] = {}
        if "description" in node:
            out["description"] = node["description"]
        kind = node.get("type")
        if kind == "object" and "properties" in node:
            out["type"] = "object"
            out.update(self.convert_object(node, path))
        elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
            out["type"] = "object"  # a map (labels): CEL can iterate over its keys
            out["additionalProperties"] = self.convert(node["additionalProperties"], path + "{}")
            for k in ("minProperties", "maxProperties"):
                if k in node:
                    out[k] = node[k]
        elif kind == "object":
            out["type"] = "object"
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif kind == "array":
            out["type"] = "array"
            if "prefixItems" in node:
                items = [self.convert(i, path + "[]") for i in node["prefixItems"]]
                if any(i != items[0] for i in items):
                    raise ValueError(f"{path}: a tuple of different types has no structural form")
                out["items"] = items[0]
            else:
                out["items"] = self.convert(node["items"], path + "[]")
            for k in ("minItems", "maxItems"):
                if k in node:
                    out[k] = node[k]
        elif kind in ("string", "integer", "number", "boolean"):
            out["type"] = kind
            if kind == "integer":
                out["format"] = "int64"
            for k in ("minLength", "maxLength", "pattern", "format", "enum"):
                if k in node:
                    out[k] = node[k]
            if "const" in node:
                out["enum"] = [node["const"]]
            for bound, op in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
                if op in node:
                    out[bound] = node[op]
                    out[op] = True
                elif bound in node:
                    out[bound] = node[bound]
        else:
            raise ValueError(f"{path}: unsupported schema node {node}")
        return out

    def convert_object(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        model = self.classes[node["x-model"]]
        out: dict[str, Any] = {}
        props: dict[str, Any] = {}
        for alias, sub in node["properties"].items():
            prop = self.convert(sub, f"{path}.{alias}")
            # Only a field where null differs from "not set" keeps a null (the model agrees:
            # SpecModel._null_means_unset); elsewhere the API server drops it.
            if alias in getattr(model, "null_keeping_fields", frozenset)():
                prop["nullable"] = True
            has, default = _field_default(model, alias)
            if has:
                prop["default"] = default
            props[alias] = prop
        if node.get("required"):
            out["required"] = sorted(node["required"])
        if model.model_config.get("extra") == "allow" and getattr(model, "OPEN_WITH", None) in self.allow:
            # A pod-template object takes fields outside the allow-list only where the admin
            # allows them; otherwise the API server refuses (strict field validation) or prunes them.
            out["x-kubernetes-preserve-unknown-fields"] = True
        out["properties"] = props
        rules = [r for r in getattr(model, "CEL", ()) if r.escalation not in self.allow]
        if rules:
            out["x-kubernetes-validations"] = [
                {"rule": r.rule, "message": r.message, **({"fieldPath": r.field_path} if r.field_path else {})}
                for r in rules
            ]
        return out


def _spec_schema(allow: frozenset[str] = frozenset()) -> dict[str, Any]:
    b = _Builder(S.DCMDPRun, allow)
    spec = b.convert({"$ref": "#/$defs/RunSpec"}, "spec")
    # List semantics the API server needs for cost bounds and merging.
    alg = spec["properties"]["algorithm"]["properties"]
    alg["corrections"]["maxItems"] = _MAX_CORRECTIONS
    pools = spec["properties"]["rollout"]["properties"]["pools"]
    pools["x-kubernetes-list-type"] = "map"
    pools["x-kubernetes-list-map-keys"] = ["name"]
    # No defaults inside list items: a client-side diff (kubectl, Argo CD's default) replaces a
    # list whole, so a default the API server added inside a pool would show as drift forever.
    # The spec model fills them in (the operator and `dcmdp run` read runs through it).
    pools["items"] = _without_defaults(pools["items"])
    return spec


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def _status_schema() -> dict[str, Any]:
    b = _Builder(RunStatus)
    status = b.convert({"$ref": "#/$defs/RunStatus"}, "status")
    status["x-kubernetes-preserve-unknown-fields"] = True
    status["properties"]["pools"]["items"]["x-kubernetes-preserve-unknown-fields"] = True
    status["properties"]["pools"]["x-kubernetes-list-type"] = "map"
    status["properties"]["pools"]["x-kubernetes-list-map-keys"] = ["name"]
    status["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    # Status fields have no defaults (the operator writes what it knows).
    for prop in status["properties"].values():
        prop.pop("default", None)
    return status


def _strip_models(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_models(v) for k, v in node.items() if k != "x-model"}
    if isinstance(node, list):
        return [_strip_models(v) for v in node]
    return node


def open_api_schema(allow: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` of a DCMDPRun (``allow``: see :func:`crd`)."""
    spec = _spec_schema(allow)
    spec["description"] = "What to train and where: the same manifest runs locally with `dcmdp run -f`."
    spec["default"] = {}
    metadata = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": names.MAX_RUN_NAME, "pattern": names.DNS_1035_LABEL},
        },
    }
    root = {
        "type": "object",
        "description": "A DC-GRPO training run: a trainer and rollout pools that exchange rollouts and weights.",
        "x-kubernetes-validations": [
            {"rule": r.rule, "message": r.message, **({"fieldPath": r.field_path} if r.field_path else {})}
            for r in S.DCMDPRun.CEL
        ],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": metadata,
            "spec": spec,
            "status": _status_schema(),
        },
    }
    return _strip_models(root)


def to_json_schema(node: Any) -> Any:
    """An OpenAPI v3 schema node as JSON Schema (draft 4): ``x-kubernetes-*`` keys dropped,
    ``nullable`` folded into the ``type`` (and ``enum``) as ``null``. The Helm values schema and the
    admission emulation (``dcmdp_testing.admission``) check documents with it."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("nullable") and "enum" in node:
        out["enum"] = list(node["enum"]) + [None]
    return out


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Steps", "type": "integer", "jsonPath": ".spec.algorithm.steps"},
    {"name": "Reward", "type": "number", "jsonPath": ".status.reward"},
    {"name": "Discrepancy", "type": "number", "jsonPath": ".status.probDiffMean",
     "description": "δ̄ = mean |p_train − p_inf| of the last step"},
    {"name": "Lambdas", "type": "string", "jsonPath": ".status.lambdas",
     "description": "each pool's applied Lagrange multiplier λ (pool=λ)"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Tolerance", "type": "number", "jsonPath": ".status.tolerance", "priority": 1},
    {"name": "Weights", "type": "integer", "jsonPath": ".status.weightVersion", "priority": 1},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


def crd(allow: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The CustomResourceDefinition object (apiextensions.k8s.io/v1). ``allow``: pod-security
    escalations (:data:`dcmdp.podsecurity.ESCALATIONS`) the cluster admin allows; their CEL rules
    are left out (the committed CRD allows none)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": NAME,
            "labels": {"app.kubernetes.io/name": "dcmdp", "app.kubernetes.io/part-of": "dcmdp"},
            "annotations": {"dcmdp.io/generated-by": "python -m dcmdp.crd --write (from dcmdp/spec.py)"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    # No scale subresource: no single replica count means "the size of a run"
                    # (pools scale independently), so `kubectl scale` would be a lie.
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": open_api_schema(allow)},
                }
            ],
        },
    }


HEADER = "# Generated by `python -m dcmdp.crd --write` from dcmdp/spec.py. Do not edit.\n"


def render(allow: frozenset[str] = frozenset()) -> str:
    """The CRD as the YAML text that is committed (``allow``: see :func:`crd`)."""
    return HEADER + yaml.safe_dump(crd(allow), sort_keys=False, allow_unicode=True, width=100)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmdp.crd", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write crds/ and the Helm chart's copy")
    parser.add_argument(
        "--allow",
        default="",
        help="comma-separated pod-security escalations the cluster admin allows "
        f"({', '.join(podsecurity.ESCALATIONS)}): print the CRD without their CEL rules",
    )
    args = parser.parse_args(argv)
    try:
        allow = podsecurity.check_allow(a for a in args.allow.split(",") if a)
    except ValueError as exc:
        parser.error(str(exc))
    if allow and args.write:
        parser.error("--allow prints a CRD for one cluster; the committed CRD (--write) allows none")
    text = render(allow)
    if not args.write:
        sys.stdout.write(text)
        return 0
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
