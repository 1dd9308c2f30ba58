"""What a pod template of a ``DCMDPRun`` may contain: an allow-list, and who may widen it.

Anyone allowed to create a ``DCMDPRun`` gets pods built from its ``spec.trainer.template`` and
``spec.rollout.pools[].template``. A template may set scheduling, resources, env, labels,
volumes of harmless kinds, sidecars and a security context that *tightens* the operator's
(``restricted`` Pod Security Standard); every other field is refused. The allow-list is data
here (:data:`POD_FIELDS`, :data:`CONTAINER_FIELDS`, :data:`VOLUME_KINDS`, …); what lies outside it
belongs to one *escalation*, a name the cluster admin can allow:

===================  =========================================================================
``hostNamespaces``   ``hostNetwork``, ``hostPID``, ``hostIPC`` true; a container ``hostPort``/``hostIP``
``privileged``       ``privileged`` or ``allowPrivilegeEscalation`` true; ``procMount`` other than
                     ``Default``; ``windowsOptions.hostProcess``; ``mountPropagation: Bidirectional``
``unconfined``       seccomp or AppArmor profile other than ``RuntimeDefault``/``Localhost`` (fields
                     and the legacy annotations); SELinux ``user``/``role`` or a ``type`` other than
                     the container types; sysctls outside the safe set; ``readOnlyRootFilesystem: false``
``capabilities``     ``capabilities.add`` other than ``NET_BIND_SERVICE``
``hostPath``         a volume of kind ``hostPath``
``runAsRoot``        ``runAsUser: 0`` or ``runAsNonRoot: false`` (pod or container)
``serviceAccount``   ``serviceAccountName`` / ``serviceAccount``; ``automountServiceAccountToken:
                     true``; a projected ``serviceAccountToken``
``secrets``          a ``secret`` volume or projected source, ``env[].valueFrom.secretKeyRef``,
                     ``envFrom[].secretRef`` (the run's own token is mounted already)
``volumes``          a volume kind outside :data:`VOLUME_KINDS` (``nfs``, ``gitRepo``, ``csi``, …)
``otherFields``      any other pod or container field (``nodeName``, ``shareProcessNamespace``,
                     probes, ``lifecycle``, ``ephemeralContainers``, …)
===================  =========================================================================

These are refused three times, with the same rules: by the spec model (``dcmdp/spec.py``,
:func:`violations`, so ``dcmdp validate`` and the operator name the field), by the CRD (its
template schema declares only the allow-listed fields, so the API server refuses any other with
``unknown field`` under kubectl's strict field validation and prunes it otherwise, and CEL rules
``x-kubernetes-validations`` refuse the values), and by the operator on the pod it is about to
create (the final pod, overlay merged). A cluster admin widens this with the operator's Helm value
``podSecurity.allow`` (a list of the names above), which the operator reads, and installs the CRD
generated for that list (``python -m dcmdp.crd --allow NAME,...``): see docs/kubernetes.md,
"Security model".
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

ESCALATIONS: dict[str, str] = {
    "hostNamespaces": "host namespaces (hostNetwork, hostPID, hostIPC, hostPort)",
    "privileged": "privileged containers, privilege escalation, unmasked /proc or Windows host processes",
    "unconfined": "unconfined seccomp, AppArmor or SELinux, unsafe sysctls or a writable root filesystem",
    "capabilities": "added Linux capabilities",
    "hostPath": "hostPath volumes",
    "runAsRoot": "running as root (runAsUser 0, runAsNonRoot false)",
    "serviceAccount": "another service account or a service-account token",
    "secrets": "Secrets (the run's own token is mounted already)",
    "volumes": "volume kinds outside the allow-list",
    "otherFields": "pod and container fields outside the allow-list",
}

# ---------------------------------------------------------------------------- the allow-list
# Pod fields a template may set (short form: at its top; full form: in `spec`). Those gated by an
# escalation are listed in GATED_POD_FIELDS; any other field is `otherFields`.
POD_FIELDS = frozenset(
    {
        "affinity",
        "containers",
        "dnsConfig",
        "dnsPolicy",
        "enableServiceLinks",
        "hostAliases",
        "hostUsers",  # false runs the pod in a user namespace: tighter, never looser
        "imagePullSecrets",  # the kubelet pulls with them; the pod never sees them
        "initContainers",
        "nodeSelector",
        "os",
        "priorityClassName",
        "readinessGates",
        "resourceClaims",
        "runtimeClassName",
        "schedulerName",
        "schedulingGates",
        "securityContext",
        "terminationGracePeriodSeconds",
        "tolerations",
        "topologySpreadConstraints",
        "volumes",
    }
)
GATED_POD_FIELDS: dict[str, str] = {
    "hostNetwork": "hostNamespaces",
    "hostPID": "hostNamespaces",
    "hostIPC": "hostNamespaces",
    "serviceAccountName": "serviceAccount",
    "serviceAccount": "serviceAccount",
    "automountServiceAccountToken": "serviceAccount",
}
# Container fields (sidecars, init containers, the main container in the full form).
CONTAINER_FIELDS = frozenset(
    {
        "args",
        "command",
        "env",
        "envFrom",
        "image",
        "imagePullPolicy",
        "name",
        "ports",
        "resizePolicy",
        "resources",
        "restartPolicy",  # an init container's `Always`: a native sidecar
        "securityContext",
        "volumeMounts",
        "workingDir",
    }
)
# The main container's fields a short-form template sets at its top.
SHORT_CONTAINER_FIELDS = frozenset({"resources", "env", "envFrom", "volumeMounts", "imagePullPolicy"})
TEMPLATE_METADATA_FIELDS = frozenset({"labels", "annotations"})
POD_SECURITY_CONTEXT_FIELDS = frozenset(
    {
        "appArmorProfile",
        "fsGroup",
        "fsGroupChangePolicy",
        "runAsGroup",
        "runAsNonRoot",
        "runAsUser",
        "seLinuxChangePolicy",
        "seLinuxOptions",
        "seccompProfile",
        "supplementalGroups",
        "supplementalGroupsPolicy",
        "sysctls",
        "windowsOptions",
    }
)
CONTAINER_SECURITY_CONTEXT_FIELDS = frozenset(
    {
        "allowPrivilegeEscalation",
        "appArmorProfile",
        "capabilities",
        "privileged",
        "procMount",
        "readOnlyRootFilesystem",
        "runAsGroup",
        "runAsNonRoot",
        "runAsUser",
        "seLinuxOptions",
        "seccompProfile",
        "windowsOptions",
    }
)
PORT_FIELDS = frozenset({"containerPort", "name", "protocol", "hostPort", "hostIP"})
VOLUME_MOUNT_FIELDS = frozenset({"name", "mountPath", "subPath", "subPathExpr", "readOnly", "recursiveReadOnly", "mountPropagation"})
ENV_FIELDS = frozenset({"name", "value", "valueFrom"})
ENV_SOURCE_FIELDS = frozenset({"fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef"})
ENV_FROM_FIELDS = frozenset({"prefix", "configMapRef", "secretRef"})
# Volume kinds a template may use; `hostPath` and `secret` have escalations of their own.
VOLUME_KINDS = frozenset({"configMap", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected"})
PROJECTED_FIELDS = frozenset({"sources", "defaultMode"})
PROJECTED_SOURCES = frozenset({"configMap", "downwardAPI", "clusterTrustBundle", "secret", "serviceAccountToken"})
# Profiles that confine: the `restricted` standard's values.
CONFINED_PROFILES = frozenset({"RuntimeDefault", "Localhost"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
# The sysctls the `baseline` standard lets a pod set (namespaced, harmless to the node).
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
# The one capability the `restricted` Pod Security Standard lets a container add.
ALLOWED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
# Legacy annotations that set a profile: a value must confine (runtime/default, localhost/...).
PROFILE_ANNOTATIONS = (
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/pod",
    "container.seccomp.security.alpha.kubernetes.io/",
)
CONFINED_ANNOTATION_VALUES = ("runtime/default", "docker/default")  # or localhost/<profile>
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")

# No pod field nests deeper than about a dozen levels; a template deeper than this is refused before
# anything walks it recursively (kube-apiserver stores JSON nested up to 10000 levels).
MAX_DEPTH = 32

Found = Iterator[tuple[str, str, str]]  # (escalation, field path, what)


def too_deep(value: Any, limit: int = MAX_DEPTH) -> Optional[str]:
    """The path (relative, ``a.b[0]``) of the first node of ``value`` nested deeper than ``limit``
    levels, or None. Iterative: any depth is safe to check."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > limit:
            return path
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))
    return None


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


def confined_annotation(value: Any) -> bool:
    """A profile annotation's value that confines: ``runtime/default`` or ``localhost/<profile>``."""
    return isinstance(value, str) and (value in CONFINED_ANNOTATION_VALUES or value.startswith("localhost/"))


def _true(d: dict[str, Any], key: str) -> bool:
    return d.get(key) is True


def _dicts(value: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, item in enumerate(value if isinstance(value, list) else []):
        if isinstance(item, dict):
            yield i, item


def _unknown(d: dict[str, Any], allowed: frozenset[str], path: str, escalation: str = "otherFields") -> Found:
    for key in sorted(set(d) - allowed):
        yield escalation, f"{path}.{key}", f"field {key} (not on the pod template allow-list)"


def _profile(p: Any, path: str, what: str) -> Found:
    if isinstance(p, dict) and p.get("type") is not None and p.get("type") not in CONFINED_PROFILES:
        yield "unconfined", f"{path}.type", f"{what} {p.get('type')}"


def _security_context(sc: Any, path: str, container: bool) -> Found:
    if not isinstance(sc, dict):
        return
    yield from _unknown(sc, CONTAINER_SECURITY_CONTEXT_FIELDS if container else POD_SECURITY_CONTEXT_FIELDS, path)
    if sc.get("runAsUser") == 0 and not isinstance(sc.get("runAsUser"), bool):
        yield "runAsRoot", f"{path}.runAsUser", "runAsUser 0"
    if sc.get("runAsNonRoot") is False:
        yield "runAsRoot", f"{path}.runAsNonRoot", "runAsNonRoot false"
    yield from _profile(sc.get("seccompProfile"), f"{path}.seccompProfile", "seccompProfile")
    yield from _profile(sc.get("appArmorProfile"), f"{path}.appArmorProfile", "appArmorProfile")
    se = sc.get("seLinuxOptions")
    if isinstance(se, dict):
        for key in ("user", "role"):
            if se.get(key) not in (None, ""):
                yield "unconfined", f"{path}.seLinuxOptions.{key}", f"seLinuxOptions.{key}"
        if se.get("type") is not None and se.get("type") not in SELINUX_TYPES:
            yield "unconfined", f"{path}.seLinuxOptions.type", f"seLinuxOptions.type {se.get('type')}"
    win = sc.get("windowsOptions")
    if isinstance(win, dict) and _true(win, "hostProcess"):
        yield "privileged", f"{path}.windowsOptions.hostProcess", "windowsOptions.hostProcess"
    for i, s in _dicts(sc.get("sysctls")):
        if s.get("name") not in SAFE_SYSCTLS:
            yield "unconfined", f"{path}.sysctls[{i}].name", f"sysctl {s.get('name')}"
    if not container:
        return
    if _true(sc, "privileged"):
        yield "privileged", f"{path}.privileged", "privileged"
    if _true(sc, "allowPrivilegeEscalation"):
        yield "privileged", f"{path}.allowPrivilegeEscalation", "allowPrivilegeEscalation true"
    if sc.get("procMount") not in (None, "Default"):
        yield "privileged", f"{path}.procMount", f"procMount {sc.get('procMount')}"
    if sc.get("readOnlyRootFilesystem") is False:
        yield "unconfined", f"{path}.readOnlyRootFilesystem", "readOnlyRootFilesystem false"
    caps = sc.get("capabilities")
    if isinstance(caps, dict) and isinstance(caps.get("add"), list):
        extra = [c for c in caps["add"] if c not in ALLOWED_CAPABILITIES]
        if extra:
            yield "capabilities", f"{path}.capabilities.add", f"adding capability {extra[0]}"


def _container(c: dict[str, Any], path: str, allowed: frozenset[str] = CONTAINER_FIELDS) -> Found:
    yield from _unknown(c, allowed, path)
    yield from _security_context(c.get("securityContext"), f"{path}.securityContext", container=True)
    for j, p in _dicts(c.get("ports")):
        yield from _unknown(p, PORT_FIELDS, f"{path}.ports[{j}]")
        for key in ("hostPort", "hostIP"):
            if p.get(key) not in (None, 0, ""):
                yield "hostNamespaces", f"{path}.ports[{j}].{key}", key
    for j, m in _dicts(c.get("volumeMounts")):
        yield from _unknown(m, VOLUME_MOUNT_FIELDS, f"{path}.volumeMounts[{j}]")
        if m.get("mountPropagation") == "Bidirectional":
            yield "privileged", f"{path}.volumeMounts[{j}].mountPropagation", "mountPropagation Bidirectional"
    for j, e in _dicts(c.get("env")):
        yield from _unknown(e, ENV_FIELDS, f"{path}.env[{j}]")
        source = e.get("valueFrom")
        if isinstance(source, dict):
            yield from _unknown(source, ENV_SOURCE_FIELDS, f"{path}.env[{j}].valueFrom")
            if source.get("secretKeyRef") is not None:
                yield "secrets", f"{path}.env[{j}].valueFrom.secretKeyRef", "secretKeyRef"
    for j, e in _dicts(c.get("envFrom")):
        yield from _unknown(e, ENV_FROM_FIELDS, f"{path}.envFrom[{j}]")
        if e.get("secretRef") is not None:
            yield "secrets", f"{path}.envFrom[{j}].secretRef", "envFrom secretRef"


def _volume(v: dict[str, Any], path: str, own_secrets: frozenset[str]) -> Found:
    for kind in sorted(set(v) - {"name"}):
        where = f"{path}.{kind}"
        if kind == "hostPath":
            yield "hostPath", where, "a hostPath volume"
        elif kind == "secret":
            name = v[kind].get("secretName") if isinstance(v[kind], dict) else None
            if name not in own_secrets:
                yield "secrets", where, "a secret volume"
        elif kind == "projected":
            projected = v[kind] if isinstance(v[kind], dict) else {}
            yield from _unknown(projected, PROJECTED_FIELDS, where, "volumes")
            sources = projected.get("sources")
            for j, s in _dicts(sources):
                spath = f"{where}.sources[{j}]"
                yield from _unknown(s, PROJECTED_SOURCES, spath, "volumes")
                if s.get("secret") is not None:
                    yield "secrets", f"{spath}.secret", "a projected secret"
                if s.get("serviceAccountToken") is not None:
                    yield "serviceAccount", f"{spath}.serviceAccountToken", "a projected serviceAccountToken"
        elif kind not in VOLUME_KINDS:
            yield "volumes", where, f"a {kind} volume"


def _annotations(annotations: Any, path: str) -> Found:
    if not isinstance(annotations, dict):
        return
    for key, value in annotations.items():
        if key.startswith(PROFILE_ANNOTATIONS) and not confined_annotation(value):
            yield "unconfined", path, f"annotation {key}: {value}"


def _pod_fields(pod: dict[str, Any], path: str, allowed: frozenset[str], own_secrets: frozenset[str]) -> Found:
    yield from _unknown(pod, allowed | set(GATED_POD_FIELDS), path)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if _true(pod, key):
            yield "hostNamespaces", f"{path}.{key}", key
    for key in ("serviceAccountName", "serviceAccount"):
        if pod.get(key) is not None:
            yield "serviceAccount", f"{path}.{key}", key
    if _true(pod, "automountServiceAccountToken"):
        yield "serviceAccount", f"{path}.automountServiceAccountToken", "automountServiceAccountToken true"
    yield from _security_context(pod.get("securityContext"), f"{path}.securityContext", container=False)
    for i, v in _dicts(pod.get("volumes")):
        yield from _volume(v, f"{path}.volumes[{i}]", own_secrets)
    for key in CONTAINER_LISTS:
        for i, c in _dicts(pod.get(key)):
            yield from _container(c, f"{path}.{key}[{i}]")


def violations(
    template: Any,
    path: str,
    allow: Iterable[str] = (),
    *,
    own_secrets: frozenset[str] = frozenset(),
    operator_fields: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """What in a pod template overlay (short form or full form ``{metadata, spec}``) or in a pod
    spec lies outside the allow-list, as ``(field path, message)`` pairs; those of an
    ``allow``\\ed escalation are left out. ``path`` is the template's own path
    (``spec.trainer.template``). For the operator's final pod: ``own_secrets`` names the Secrets it
    mounts itself (the run's token, its TLS key pair), ``operator_fields`` the pod fields it sets."""
    if not isinstance(template, dict):
        return []
    allowed = frozenset(allow)
    short = POD_FIELDS | SHORT_CONTAINER_FIELDS | TEMPLATE_METADATA_FIELDS | {"spec", "metadata"}
    found = list(_pod_fields(template, path, (short if not operator_fields else POD_FIELDS) | operator_fields, own_secrets))
    # The short form's main-container fields, checked as a container's.
    found += _container({k: template[k] for k in SHORT_CONTAINER_FIELDS if k in template}, path)
    found += _annotations(template.get("annotations"), f"{path}.annotations")
    if isinstance(template.get("metadata"), dict):
        meta = template["metadata"]
        found += _unknown(meta, TEMPLATE_METADATA_FIELDS, f"{path}.metadata")
        found += _annotations(meta.get("annotations"), f"{path}.metadata.annotations")
    if isinstance(template.get("spec"), dict):
        found += _pod_fields(template["spec"], f"{path}.spec", POD_FIELDS | operator_fields, own_secrets)
    return [(p, refusal(esc, what)) for esc, p, what in found if esc not in allowed]
