"""Which spec changes a live run takes, and which it refuses. Pure.

The accepted spec is the one the children were built from: the ConfigMap ``<run>-config`` holds it
(``run.yaml``, what the trainer reads), so the operator never writes to the run's ``spec``.

Safe, applied live: ``suspend``, ``ttlSecondsAfterFinished``, and per rollout pool (same pools, same
order) its ``replicas``, ``image`` and pod ``template``. Anything else (model, task, algorithm,
trainer, checkpoint, scheduling, failure policy, a pool's engine/precision/tolerance, adding or
removing pools) would need a new trainer: it is refused, the run goes on with the accepted spec
(plus the safe part of the change), and the condition ``Ready=False reason=SpecChangeRefused`` names
the refused fields until the spec is reverted.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any, Optional

from dcmdp.spec import DCMDPRun, SpecError, dump_run, parse_run

SAFE_TOP = ("suspend", "ttlSecondsAfterFinished")
SAFE_POOL = ("replicas", "image", "template")
_POOL_FIELD = re.compile(r"^spec\.rollout\.pools\[(\d+)\]\.([A-Za-z]+)")


def diff_paths(old: Any, new: Any, path: str) -> list[str]:
    """Paths (``spec.a.b[2].c``) where two JSON-like values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            if k not in old or k not in new:
                out.append(f"{path}.{k}")
            else:
                out.extend(diff_paths(old[k], new[k], f"{path}.{k}"))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out.extend(diff_paths(a, b, f"{path}[{i}]"))
        return out
    return [] if old == new else [path]


def _same_pools(old: dict[str, Any], new: dict[str, Any]) -> bool:
    names = lambda s: [p.get("name") for p in s.get("rollout", {}).get("pools", [])]  # noqa: E731
    return names(old) == names(new)


def is_safe(path: str, same_pools: bool) -> bool:
    if any(path == f"spec.{k}" for k in SAFE_TOP):
        return True
    m = _POOL_FIELD.match(path)
    return bool(m and same_pools and m.group(2) in SAFE_POOL)


def reconcile_spec(
    accepted: Optional[dict[str, Any]], new: DCMDPRun, allow_escalations: frozenset[str] = frozenset()
) -> tuple[DCMDPRun, list[str]]:
    """(the spec to run, the refused field paths). ``accepted``: the manifest the children were
    built from (None for a new run: everything is accepted). ``allow_escalations``: the pod
    escalations the operator allows (as in :func:`dcmdp.spec.parse_run`)."""
    parse = functools.partial(parse_run, allow_escalations=allow_escalations)
    if not accepted or not isinstance(accepted.get("spec"), dict):
        return new, []
    try:
        # Normalised like `new` (defaults filled in), so only real changes show up.
        old_spec = dump_run(parse({"apiVersion": new.api_version, "kind": new.kind, "spec": accepted["spec"]}))["spec"]
    except SpecError:
        return new, []  # an unreadable record (e.g. an older operator's): take the new spec
    new_spec = dump_run(new)["spec"]
    same_pools = _same_pools(old_spec, new_spec)
    changed = diff_paths(old_spec, new_spec, "spec")
    refused = [p for p in changed if not is_safe(p, same_pools)]
    if not refused:
        return new, []
    # Keep the accepted spec; take the safe part of the change.
    effective = copy.deepcopy(old_spec)
    for key in SAFE_TOP:
        if key in new_spec:
            effective[key] = new_spec[key]
        else:
            effective.pop(key, None)
    if same_pools:
        for old_pool, new_pool in zip(effective["rollout"]["pools"], new_spec["rollout"]["pools"]):
            for key in SAFE_POOL:
                if key in new_pool:
                    old_pool[key] = new_pool[key]
                else:
                    old_pool.pop(key, None)
    data = dump_run(new)
    data["spec"] = effective
    try:
        return parse(data), refused
    except SpecError:  # the safe part alone is not a valid run: keep the accepted spec as it was
        data["spec"] = old_spec
        return parse(data), refused
