"""Merge a user's pod template overlay (``spec.trainer.template``, ``spec.rollout.pools[].template``)
into the pod the operator builds. Pure functions, no I/O.

Two spellings are accepted:

* the short form, flat keys as users write them most often::

      template:
        nodeSelector: {cloud.google.com/gke-accelerator: nvidia-l4}
        tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
        resources: {limits: {nvidia.com/gpu: 1}}
        env: [{name: HF_HOME, value: /cache}]

  Pod-level keys go to the pod spec, container-level keys (``resources``, ``env``, ``envFrom``,
  ``volumeMounts``, ``imagePullPolicy``) to the main container, ``labels``/``annotations`` to the
  pod's metadata.
* the full form, a ``PodTemplateSpec``: ``{metadata: {...}, spec: {...}}``; in ``spec.containers``
  the container named like the main one (``trainer`` / ``rollout``) is merged into it, any other
  container is added as a sidecar.

Merging: mappings merge key by key (the overlay wins); lists of named items (env, volumes,
volumeMounts, containers, ports, imagePullSecrets) merge by ``name``; tolerations are appended;
other lists are replaced. What the run needs to work (command, image, ports, the token and config
mounts, the operator's labels) is applied after the overlay and cannot be overridden.
"""

from __future__ import annotations

import copy
from typing import Any

from dcmdp import podsecurity

# Short-form keys: the allow-list (dcmdp.podsecurity) and the pod fields an admin may allow
# ('otherFields'); anything else needs the full form.
POD_KEYS = (
    podsecurity.POD_FIELDS
    | frozenset(podsecurity.GATED_POD_FIELDS)
    | frozenset({"nodeName", "preemptionPolicy", "priority", "shareProcessNamespace"})
)
CONTAINER_KEYS = podsecurity.SHORT_CONTAINER_FIELDS
META_KEYS = frozenset({"labels", "annotations"})
NAMED_LISTS = frozenset({"env", "volumes", "volumeMounts", "containers", "initContainers", "ports", "imagePullSecrets"})
APPENDED_LISTS = frozenset({"tolerations"})


class TemplateError(ValueError):
    """An overlay that cannot be merged; ``path`` names the offending field."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


def merge(base: Any, overlay: Any, key: str = "") -> Any:
    """Deep-merge ``overlay`` into a copy of ``base`` (see the module docstring for the rules)."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = copy.deepcopy(base)
        for k, v in overlay.items():
            out[k] = merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(overlay, list):
        if key in APPENDED_LISTS:
            return copy.deepcopy(base) + [copy.deepcopy(v) for v in overlay if v not in base]
        if key in NAMED_LISTS and all(isinstance(v, dict) and "name" in v for v in base + overlay):
            out = copy.deepcopy(base)
            index = {item["name"]: i for i, item in enumerate(out)}
            for item in overlay:
                if item["name"] in index:
                    out[index[item["name"]]] = merge(out[index[item["name"]]], item)
                else:
                    index[item["name"]] = len(out)
                    out.append(copy.deepcopy(item))
            return out
    return copy.deepcopy(overlay)


def split(template: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """An overlay → (pod metadata overlay, pod spec overlay, main-container overlay)."""
    if not isinstance(template, dict):
        raise TemplateError(path, "must be a mapping")
    if "spec" in template or "metadata" in template:
        extra = sorted(set(template) - {"spec", "metadata"})
        if extra:
            raise TemplateError(
                f"{path}.{extra[0]}", "mixes the full form (metadata/spec) with short-form keys; use one"
            )
        meta = {} if template.get("metadata") is None else template["metadata"]
        spec = {} if template.get("spec") is None else template["spec"]
        if not isinstance(meta, dict):
            raise TemplateError(f"{path}.metadata", "must be a mapping")
        if not isinstance(spec, dict):
            raise TemplateError(f"{path}.spec", "must be a mapping")
        unknown = sorted(set(meta) - META_KEYS)
        if unknown:
            raise TemplateError(f"{path}.metadata.{unknown[0]}", "only labels and annotations can be set")
        return copy.deepcopy(meta), copy.deepcopy(spec), {}
    meta: dict[str, Any] = {}
    spec: dict[str, Any] = {}
    container: dict[str, Any] = {}
    for k, v in template.items():
        if k in META_KEYS:
            meta[k] = copy.deepcopy(v)
        elif k in CONTAINER_KEYS:
            container[k] = copy.deepcopy(v)
        elif k in POD_KEYS:
            spec[k] = copy.deepcopy(v)
        else:
            raise TemplateError(
                f"{path}.{k}",
                "unknown pod template field (short form: pod fields such as nodeSelector, tolerations, "
                "affinity; container fields resources, env, envFrom, volumeMounts, imagePullPolicy; "
                "labels, annotations; or the full form {metadata, spec})",
            )
    return meta, spec, container


def apply_overlay(
    pod_template: dict[str, Any], template: dict[str, Any], container_name: str, path: str
) -> dict[str, Any]:
    """Merge the user's overlay into ``pod_template`` (a PodTemplateSpec built by the operator)."""
    meta, spec, container = split(template, path)
    out = copy.deepcopy(pod_template)
    for key in ("labels", "annotations"):
        if key in meta:
            if not isinstance(meta[key], dict) or not all(isinstance(v, str) for v in meta[key].values()):
                raise TemplateError(f"{path}.{key}", "must map strings to strings")
            out["metadata"][key] = merge(out["metadata"].get(key, {}), meta[key])
    containers = spec.pop("containers", None)
    if containers is not None:
        if not isinstance(containers, list) or not all(isinstance(c, dict) and c.get("name") for c in containers):
            raise TemplateError(f"{path}.spec.containers", "must be a list of containers with names")
        for c in containers:
            if c["name"] == container_name:
                container = merge(container, {k: v for k, v in c.items() if k != "name"})
            else:
                out["spec"]["containers"].append(copy.deepcopy(c))
    for k, v in spec.items():
        out["spec"][k] = merge(out["spec"][k], v, k) if k in out["spec"] else copy.deepcopy(v)
    main = next(c for c in out["spec"]["containers"] if c["name"] == container_name)
    for k, v in container.items():
        main[k] = merge(main[k], v, k) if k in main else copy.deepcopy(v)
    return out
