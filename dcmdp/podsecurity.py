"""What a pod template of a ``DCMDPRun`` may not ask for: the escalations, and who may allow them.

Anyone allowed to create a ``DCMDPRun`` gets pods built from its ``spec.trainer.template`` and
``spec.rollout.pools[].template``. Without a check, a template could ask for the node itself
(``hostPID``, ``privileged``, a ``hostPath`` of ``/``) or for the identity of another service
account. Each such request belongs to one *escalation* (a name an admin can allow):

===================  =========================================================================
``hostNamespaces``   ``hostNetwork``, ``hostPID``, ``hostIPC`` true; a container ``hostPort``
``privileged``       ``securityContext.privileged`` or ``allowPrivilegeEscalation`` true;
                     ``seccompProfile.type: Unconfined`` (pod or container)
``capabilities``     ``securityContext.capabilities.add`` other than ``NET_BIND_SERVICE``
``hostPath``         a volume of kind ``hostPath``
``runAsRoot``        ``runAsUser: 0`` or ``runAsNonRoot: false`` (pod or container)
``serviceAccount``   ``serviceAccountName`` / ``serviceAccount`` (another identity);
                     ``automountServiceAccountToken: true``
===================  =========================================================================

These are refused three times, with the same rules: by the spec model (``dcmdp/spec.py``,
:func:`violations`, so ``dcmdp validate`` and the operator name the field), by the CRD's CEL
rules (``x-kubernetes-validations``, generated from the same model: the API server refuses the
run), and by the operator on the pod it is about to create (the final pod, overlay merged).
A cluster admin widens this with the operator's Helm value ``podSecurity.allow`` (a list of the
names above), which the operator reads, and installs the CRD generated for that list
(``python -m dcmdp.crd --allow NAME,...``): see docs/kubernetes.md, "Security model".
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

ESCALATIONS: dict[str, str] = {
    "hostNamespaces": "host namespaces (hostNetwork, hostPID, hostIPC, hostPort)",
    "privileged": "privileged containers, privilege escalation or an unconfined seccomp profile",
    "capabilities": "added Linux capabilities",
    "hostPath": "hostPath volumes",
    "runAsRoot": "running as root (runAsUser 0, runAsNonRoot false)",
    "serviceAccount": "another service account or a mounted service-account token",
}
# The one capability the `restricted` Pod Security Standard lets a container add.
ALLOWED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


def check_allow(allow: Iterable[str], source: str = "podSecurity.allow") -> frozenset[str]:
    """``allow`` as a set, every name checked against :data:`ESCALATIONS` (ValueError naming it)."""
    out = frozenset(allow)
    unknown = sorted(out - set(ESCALATIONS))
    if unknown:
        raise ValueError(f"{source}: unknown escalation {unknown[0]!r} (known: {', '.join(ESCALATIONS)})")
    return out


def refusal(escalation: str, what: str) -> str:
    """The message of a refused field (the same text in the model, the CRD and the operator)."""
    return (
        f"{what} is refused: {ESCALATIONS[escalation]} need the cluster admin to allow "
        f"'{escalation}' (operator Helm value podSecurity.allow)"
    )


def _true(d: dict[str, Any], key: str) -> bool:
    return d.get(key) is True


def _security_context(sc: Any, path: str, container: bool) -> Iterator[tuple[str, str, str]]:
    if not isinstance(sc, dict):
        return
    if sc.get("runAsUser") == 0 and not isinstance(sc.get("runAsUser"), bool):
        yield "runAsRoot", f"{path}.runAsUser", "runAsUser 0"
    if sc.get("runAsNonRoot") is False:
        yield "runAsRoot", f"{path}.runAsNonRoot", "runAsNonRoot false"
    seccomp = sc.get("seccompProfile")
    if isinstance(seccomp, dict) and seccomp.get("type") == "Unconfined":
        yield "privileged", f"{path}.seccompProfile.type", "seccompProfile Unconfined"
    if not container:
        return
    if _true(sc, "privileged"):
        yield "privileged", f"{path}.privileged", "privileged"
    if _true(sc, "allowPrivilegeEscalation"):
        yield "privileged", f"{path}.allowPrivilegeEscalation", "allowPrivilegeEscalation true"
    caps = sc.get("capabilities")
    if isinstance(caps, dict) and isinstance(caps.get("add"), list):
        extra = [c for c in caps["add"] if c not in ALLOWED_CAPABILITIES]
        if extra:
            yield "capabilities", f"{path}.capabilities.add", f"adding capability {extra[0]}"


def _pod_fields(pod: dict[str, Any], path: str) -> Iterator[tuple[str, str, str]]:
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if _true(pod, key):
            yield "hostNamespaces", f"{path}.{key}", key
    for key in ("serviceAccountName", "serviceAccount"):
        if pod.get(key) is not None:
            yield "serviceAccount", f"{path}.{key}", key
    if _true(pod, "automountServiceAccountToken"):
        yield "serviceAccount", f"{path}.automountServiceAccountToken", "automountServiceAccountToken true"
    yield from _security_context(pod.get("securityContext"), f"{path}.securityContext", container=False)
    volumes = pod.get("volumes")
    for i, v in enumerate(volumes if isinstance(volumes, list) else []):
        if isinstance(v, dict) and v.get("hostPath") is not None:
            yield "hostPath", f"{path}.volumes[{i}].hostPath", "a hostPath volume"
    for key in CONTAINER_LISTS:
        items = pod.get(key)
        for i, c in enumerate(items if isinstance(items, list) else []):
            if not isinstance(c, dict):
                continue
            cpath = f"{path}.{key}[{i}]"
            yield from _security_context(c.get("securityContext"), f"{cpath}.securityContext", container=True)
            ports = c.get("ports")
            for j, p in enumerate(ports if isinstance(ports, list) else []):
                if isinstance(p, dict) and p.get("hostPort") not in (None, 0):
                    yield "hostNamespaces", f"{cpath}.ports[{j}].hostPort", "hostPort"


def violations(template: Any, path: str, allow: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The escalations in a pod template overlay, short form or full form (``{metadata, spec}``),
    or in a pod spec, as ``(field path, message)`` pairs; those of an ``allow``\\ed escalation are
    left out. ``path`` is the template's own path (``spec.trainer.template``)."""
    if not isinstance(template, dict):
        return []
    allowed = frozenset(allow)
    found = list(_pod_fields(template, path))
    if isinstance(template.get("spec"), dict):
        found += _pod_fields(template["spec"], f"{path}.spec")
    return [(p, refusal(esc, what)) for esc, p, what in found if esc not in allowed]
