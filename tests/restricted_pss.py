"""An offline checker of the Kubernetes ``restricted`` Pod Security Standard (v1.33), test tooling.

No API server runs here, so this replays the checks Pod Security Admission makes on a pod
template under ``pod-security.kubernetes.io/enforce: restricted`` (the *baseline* checks, then
the *restricted* ones), after https://kubernetes.io/docs/concepts/security/pod-security-standards/.
:func:`check` returns the failures as ``(field path, reason)`` pairs, empty when the pod passes.
"""

from __future__ import annotations

from typing import Any, Iterator

# restricted: the only volume types allowed
VOLUME_TYPES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"})
# baseline: capabilities a container may add; restricted: only NET_BIND_SERVICE, after drop ALL
BASELINE_CAPS = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"})
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in CONTAINER_LISTS:
        for i, c in enumerate(spec.get(key) or []):
            yield f"spec.{key}[{i}]", c


def check(template: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``restricted`` violations of a PodTemplateSpec (``{metadata, spec}``)."""
    spec = template.get("spec") or {}
    psc = spec.get("securityContext") or {}
    out: list[tuple[str, str]] = []
    # ---- baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append((f"spec.{key}", "host namespaces"))
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append(("spec.securityContext.windowsOptions.hostProcess", "HostProcess"))
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            out.append(("spec.securityContext.sysctls", f"unsafe sysctl {s.get('name')}"))
    for i, v in enumerate(spec.get("volumes") or []):
        kinds = set(v) - {"name"}
        if "hostPath" in kinds:
            out.append((f"spec.volumes[{i}].hostPath", "hostPath volume"))
        bad = kinds - VOLUME_TYPES
        if bad:
            out.append((f"spec.volumes[{i}]", f"volume type {sorted(bad)[0]} not allowed"))
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsUser") == 0:
        out.append(("spec.securityContext.runAsUser", "runAsUser 0"))
    if pod_seccomp == "Unconfined":
        out.append(("spec.securityContext.seccompProfile.type", "Unconfined"))
    for path, c in _containers(spec):
        sc = c.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        if sc.get("privileged"):
            out.append((f"{path}.securityContext.privileged", "privileged"))
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append((f"{path}.securityContext.windowsOptions.hostProcess", "HostProcess"))
        for j, p in enumerate(c.get("ports") or []):
            if p.get("hostPort"):
                out.append((f"{path}.ports[{j}].hostPort", "hostPort"))
        if sc.get("procMount") not in (None, "Default"):
            out.append((f"{path}.securityContext.procMount", "procMount"))
        if set(caps.get("add") or []) - BASELINE_CAPS:
            out.append((f"{path}.securityContext.capabilities.add", "capability beyond baseline"))
        # ---- restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append((f"{path}.securityContext.allowPrivilegeEscalation", "must be false"))
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is not True and not pod_nonroot):
            out.append((f"{path}.securityContext.runAsNonRoot", "must be true (pod or container)"))
        if sc.get("runAsUser") == 0:
            out.append((f"{path}.securityContext.runAsUser", "runAsUser 0"))
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append((f"{path}.securityContext.seccompProfile.type", "must be RuntimeDefault or Localhost"))
        if "ALL" not in (caps.get("drop") or []):
            out.append((f"{path}.securityContext.capabilities.drop", "must drop ALL"))
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append((f"{path}.securityContext.capabilities.add", "only NET_BIND_SERVICE"))
    return out
