"""Create-or-patch a desired child, idempotently.

GET; absent → POST (as :func:`children.for_creation` shapes it); present and owned by this run →
nothing when the desired fields are already there (:func:`is_subset`), else a server-side apply of
the fields that can change. A resync or an operator restart therefore writes nothing when nothing
changed, and never creates a second copy. An existing object of the same name that the run does not
own is never touched: :class:`ChildConflict`.
"""

from __future__ import annotations

from typing import Any, Optional

from . import children, kube


class ChildConflict(Exception):
    """An object with a child's name exists and is not owned by the run."""

    def __init__(self, kind: str, name: str, owner: str):
        self.kind = kind
        self.name = name
        super().__init__(f"{kind} {name} already exists and is not owned by this run ({owner})")


def _scalar_equal(a: Any, b: Any) -> bool:
    if a == b:
        return True
    # The API server returns quantities and some ints as strings (`nvidia.com/gpu: 1` → "1").
    if isinstance(a, (int, float, str)) and isinstance(b, (int, float, str)) and not isinstance(a, bool):
        return str(a) == str(b)
    return False


def is_subset(desired: Any, existing: Any) -> bool:
    """True when every field of ``desired`` has the same value in ``existing`` (the server may add
    defaults and other fields; lists must match item by item)."""
    if isinstance(desired, dict):
        return isinstance(existing, dict) and all(
            k in existing and is_subset(v, existing[k]) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(existing, list)
            and len(desired) == len(existing)
            and all(is_subset(d, e) for d, e in zip(desired, existing))
        )
    return _scalar_equal(desired, existing)


# Fields that can change after creation, per kind (the rest is immutable or set once).
def patchable(desired: dict[str, Any]) -> dict[str, Any]:
    """The part of a desired child that may be applied to an existing object."""
    kind = desired["kind"]
    meta = {k: desired["metadata"][k] for k in ("name", "namespace", "labels", "ownerReferences")}
    base = {"apiVersion": desired["apiVersion"], "kind": kind, "metadata": meta}
    if kind == "Job":
        # A Job's pod template, completions and mode are immutable: only these two move.
        spec = {k: desired["spec"][k] for k in ("suspend", "parallelism") if k in desired["spec"]}
        return {**base, "spec": spec}
    if kind == "Secret":
        # The token is written once, at creation: a resync never rotates it.
        return {**base, "type": desired.get("type", "Opaque")}
    if kind == "PersistentVolumeClaim":
        return {**base, "spec": {"resources": desired["spec"]["resources"]}}
    return {**base, **{k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata")}}


def controller_uid(obj: dict[str, Any]) -> Optional[str]:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


async def apply(
    client: kube.Client, desired: dict[str, Any], existing: Optional[dict[str, Any]] = None, *, known: bool = False
) -> tuple[dict[str, Any], str]:
    """Make ``desired`` exist. Returns (the object as the server has it, "created" | "patched" |
    "unchanged"). ``known=True``: ``existing`` was just read (None = absent), no GET needed."""
    res = kube.resource_of(desired)
    ns = desired["metadata"]["namespace"]
    name = desired["metadata"]["name"]
    if not known:
        existing = await client.get(res, ns, name)
    if existing is None:
        try:
            return await client.create(res, ns, children.for_creation(desired)), "created"
        except kube.Conflict:  # created meanwhile (a concurrent reconcile): patch it instead
            existing = await client.get(res, ns, name)
            if existing is None:
                raise
    want_uid = desired["metadata"]["ownerReferences"][0]["uid"]
    have_uid = controller_uid(existing)
    if have_uid != want_uid:
        raise ChildConflict(desired["kind"], name, f"controller uid {have_uid}" if have_uid else "no controller")
    patch = patchable(desired)
    if is_subset(patch, existing):
        return existing, "unchanged"
    return await client.apply(res, ns, patch), "patched"
