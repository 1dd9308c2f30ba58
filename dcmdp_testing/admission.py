"""Offline emulation of what kube-apiserver does to a DCMDPRun on ``create``, from the CRD alone.

No API server can run here, so this replays its steps, in its order, on the generated CRD:

1. ``apiVersion``/``kind`` must name this CRD, ``metadata.name`` must be set; ``status`` is
   dropped (the status subresource ignores it on create).
2. Unknown fields are errors (``kubectl``'s default ``--validate=strict`` field validation):
   ``unknown field "spec.algorithm.stepz"``. Inside ``x-kubernetes-preserve-unknown-fields``
   nodes (pod templates) anything goes.
3. ``null`` in a field that is not ``nullable`` is dropped (then defaulted, like an absent field).
4. Defaults are applied (structural defaulting: a missing field with a default gets it, then
   its own fields are defaulted in turn).
5. The ``openAPIV3Schema`` is checked with ``jsonschema`` (OpenAPI v3 ≈ JSON Schema draft 4;
   ``nullable`` becomes a ``null`` type; ``pattern`` is matched like Go's RE2, where ``$`` is the
   end of the text); ``x-kubernetes-list-type: map`` keys must be unique.
6. When the schema passes, every ``x-kubernetes-validations`` CEL rule is evaluated with
   ``celpy`` (cel-python) on its node, with values typed by the schema as the API server types
   them (``number`` is a CEL ``double``, ``integer`` an ``int``).

Errors come back as ``(field path, message)`` pairs, paths written like the spec model's
(``spec.rollout.pools[1].name``), so the two can be compared. ``jsonschema`` and ``celpy`` are
test dependencies: this package is not installed into any image.
"""

from __future__ import annotations

import copy
import re
import sys
from functools import lru_cache
from typing import Any, Iterator, Optional

import celpy
import jsonschema
from celpy import celtypes, json_to_cel

from dcmdp import crd as C
from dcmdp import podsecurity

Errors = list[tuple[str, str]]
FREE_FORM_CEL_DEPTH = 64


def _fmt(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out or "(root)"


@lru_cache(maxsize=1)
def _root_schema() -> dict[str, Any]:
    return C.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _preserves(schema: dict[str, Any]) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields"))


# ------------------------------------------------------------------- unknown fields, nulls, defaults
def _unknown_fields(value: Any, schema: dict[str, Any], path: list[Any]) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            if key in schema["properties"]:
                yield from _unknown_fields(sub, schema["properties"][key], path + [key])
            elif not _preserves(schema):
                yield _fmt(path + [key]), f'unknown field "{_fmt(path + [key])}"'
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _unknown_fields(item, schema["items"], path + [i])


def _prune_nulls(value: Any, schema: dict[str, Any]) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        out = {}
        for key, sub in value.items():
            prop = schema["properties"].get(key)
            if prop is None:
                out[key] = sub
            elif sub is None and not prop.get("nullable"):
                continue  # the API server drops it (and may then default it)
            else:
                out[key] = _prune_nulls(sub, prop)
        return out
    if isinstance(value, list) and "items" in schema:
        return [_prune_nulls(v, schema["items"]) for v in value]
    return value


def apply_defaults(value: Any, schema: dict[str, Any]) -> None:
    """In place, as apiextensions-apiserver's structural defaulting does."""
    if isinstance(value, dict) and "properties" in schema:
        for key, prop in schema["properties"].items():
            if "default" in prop and key not in value:
                value[key] = copy.deepcopy(prop["default"])
        for key, sub in value.items():
            if key in schema["properties"]:
                apply_defaults(sub, schema["properties"][key])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(item, schema["items"])


# ------------------------------------------------------------------------------ OpenAPI schema
@lru_cache(maxsize=1)
def _validator() -> Any:
    def go_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
        # RE2's `$` (no multi-line flag) is the end of the text; Python's also matches before a
        # final newline. `\Z` is Python's end of text.
        if isinstance(instance, str) and not re.search(re.sub(r"\$$", r"\\Z", pattern), instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")

    cls = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": go_pattern})
    return cls(C.to_json_schema(_root_schema()))


def _schema_errors(obj: dict[str, Any]) -> Errors:
    errors = []
    for err in sorted(_validator().iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        msg = err.message
        if err.validator == "anyOf":
            msg = f"{err.instance!r}: must be a number > 0, 'auto' or a positive decimal string"
        errors.append((_fmt(err.absolute_path), msg))
    return errors


def _list_map_errors(value: Any, schema: dict[str, Any], path: list[Any]) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            if key in schema["properties"]:
                yield from _list_map_errors(sub, schema["properties"][key], path + [key])
    elif isinstance(value, list) and "items" in schema:
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            seen: set[str] = set()
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue  # a type error, reported by the schema check
                k = {key: item.get(key) for key in keys}
                if repr(k) in seen:
                    yield _fmt(path + [i]), f"Duplicate value: {k}"
                seen.add(repr(k))
        for i, item in enumerate(value):
            yield from _list_map_errors(item, schema["items"], path + [i])


# ------------------------------------------------------------------------------------------ CEL
@lru_cache(maxsize=None)
def _program(rule: str) -> Any:
    limit = sys.getrecursionlimit()
    env = celpy.Environment()  # sets the process's recursion limit to 2500: put back a higher one
    sys.setrecursionlimit(max(limit, sys.getrecursionlimit()))
    return env.program(env.compile(rule))


def _cel_value(value: Any, schema: dict[str, Any]) -> Any:
    """A JSON value as the API server hands it to CEL: typed by the schema, not by the JSON."""
    kind = schema.get("type")
    if value is None:
        return None
    if kind == "object" and "properties" in schema:
        return celtypes.MapType(
            {celtypes.StringType(k): _cel_value(v, schema["properties"][k]) for k, v in value.items() if k in schema["properties"]}
        )
    if kind == "array":
        return celtypes.ListType([_cel_value(v, schema["items"]) for v in value])
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "string":
        return celtypes.StringType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if podsecurity.too_deep(value, FREE_FORM_CEL_DEPTH) is not None:
        # A free-form node (a pod template's affinity, say) nested deeper than any rule reads:
        # handed to CEL as an empty map (its presence is what `has()` sees) rather than converted
        # recursively once per enclosing rule.
        return celtypes.MapType({})
    return json_to_cel(value)


def _cel_errors(value: Any, schema: dict[str, Any], path: list[Any]) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict) and "properties" in schema:
        rules = schema.get("x-kubernetes-validations", [])
        if rules:
            this = _cel_value(value, schema)
            for r in rules:
                where = ((_fmt(path) if path else "") + r.get("fieldPath", "")).lstrip(".") or "(root)"
                try:
                    ok = _program(r["rule"]).evaluate({"self": this})
                except Exception as exc:  # a rule that cannot run is an error, as in the API server
                    yield where, f"rule {r['rule']!r} failed to evaluate: {exc}"
                    continue
                if not isinstance(ok, bool) and type(ok).__name__ != "BoolType":
                    yield where, f"rule {r['rule']!r} did not evaluate to a boolean: {ok!r}"
                elif not ok:
                    yield where, r["message"]
        for key, sub in value.items():
            if key in schema["properties"]:
                yield from _cel_errors(sub, schema["properties"][key], path + [key])
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _cel_errors(item, schema["items"], path + [i])


# ------------------------------------------------------------------------------------ the whole
def admit(manifest: Any) -> tuple[Optional[dict[str, Any]], Errors]:
    """``(the object as it would be stored, [])`` or ``(None, [(path, message), …])``."""
    if not isinstance(manifest, dict):
        return None, [("(root)", "a DCMDPRun manifest must be a mapping")]
    errors: Errors = []
    if manifest.get("apiVersion") != f"{C.GROUP}/{C.VERSION}":
        errors.append(("apiVersion", f"no matches for {manifest.get('apiVersion')!r}: must be {C.GROUP}/{C.VERSION}"))
    if manifest.get("kind") != C.KIND:
        errors.append(("kind", f"no matches for kind {manifest.get('kind')!r}: must be {C.KIND}"))
    meta = manifest.get("metadata")
    if not isinstance(meta, dict) or not (meta.get("name") or meta.get("generateName")):
        errors.append(("metadata.name", "Required value: name or generateName is required"))
    if errors:
        return None, errors

    schema = _root_schema()
    obj = {k: copy.deepcopy(v) for k, v in manifest.items() if k != "status"}
    errors = [e for e in _unknown_fields(obj.get("spec"), schema["properties"]["spec"], ["spec"])]
    extra_root = sorted(set(obj) - set(schema["properties"]))
    errors += [(k, f'unknown field "{k}"') for k in extra_root]
    if errors:
        return None, errors
    obj = _prune_nulls(obj, schema)
    apply_defaults(obj, schema)
    errors = _schema_errors(obj) + list(_list_map_errors(obj, schema, []))
    if errors:
        return None, errors
    # From the root: its rules see metadata.name (the names Kubernetes derives from it).
    errors = list(_cel_errors(obj, schema, []))
    if errors:
        return None, errors
    return obj, []


def validate_status(status: Any) -> Errors:
    """Errors of a ``.status`` the operator is about to write (schema only; unknown fields kept)."""
    status_schema = C.to_json_schema(_root_schema()["properties"]["status"])
    v = jsonschema.Draft4Validator(status_schema)
    return [(_fmt(["status", *e.absolute_path]), e.message) for e in v.iter_errors(status)] + list(
        _list_map_errors(status, _root_schema()["properties"]["status"], ["status"])
    )
