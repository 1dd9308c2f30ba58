"""A Kubernetes API emulator for developing and testing the operator without a cluster.

KMock's ``KubernetesEmulator`` (``pip install kmock``; a test dependency, imported only here) keeps
objects in memory and serves get/list/watch/create/patch/delete. This subclass declares every kind
the operator uses and adds what the operator relies on from a real API server and KMock leaves out:

* ``metadata.uid``, ``creationTimestamp``, ``resourceVersion`` and ``generation`` (bumped when
  anything but metadata and status changes); ``generateName``;
* the status subresource: ``/status`` writes change only ``status``, main-resource writes never do;
* garbage collection: deleting an object deletes the objects it owns (background propagation);
* lists carry ``kind``/``apiVersion`` (so ``kubectl get`` can list);
* the CRD's admission for ``DCMDPRun`` (``dcmdp_testing.admission``, generated from the spec model):
  unknown fields and schema or CEL violations are rejected (HTTP 422, the field named), defaults
  are filled in on create and update, and ``/status`` writes must match the CRD's status schema;
* ``kubectl get dcmdprun`` tables with the CRD's printer columns; kubectl singular and short names;
* a bounded cost per request: KMock matches each request against its whole request history (fine
  for a short test, quadratic for an operator polling hundreds of runs), so the history is trimmed;
  :attr:`Emulator.log` keeps a compact record of every API request instead.

There are no controllers: no pods are started, a Job's or a Deployment's ``status`` changes only
when someone patches it (a test playing the Job controller, for instance). Start one with
``python scripts/emulator.py`` (prints a kubeconfig) or :class:`EmulatorThread` in tests.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import sys
import threading
import uuid
from typing import Any, Optional

import kmock
from kmock._internal import dicts as _kdicts  # KMock's own merge-patch (what its PATCH does)
from kmock._internal.k8s import KubernetesError

from dcmdp.crd import PRINTER_COLUMNS
from dcmdp.spec import API_GROUP, PLURAL
from dcmdp_testing.admission import admit, validate_status

RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", singular="namespace", shortnames={"ns"}, namespaced=False, verbs={"get", "list", "watch", "create", "delete"}),
    "v1/events": kmock.ResourceInfo(kind="Event", singular="event", shortnames={"ev"}, namespaced=True, verbs={"get", "list", "watch", "create", "patch"}),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", singular="secret", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", singular="configmap", shortnames={"cm"}, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/services": kmock.ResourceInfo(kind="Service", singular="service", shortnames={"svc"}, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    "v1/persistentvolumeclaims": kmock.ResourceInfo(kind="PersistentVolumeClaim", singular="persistentvolumeclaim", shortnames={"pvc"}, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    "v1/pods": kmock.ResourceInfo(kind="Pod", singular="pod", shortnames={"po"}, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    "batch/v1/jobs": kmock.ResourceInfo(kind="Job", singular="job", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    "apps/v1/deployments": kmock.ResourceInfo(kind="Deployment", singular="deployment", shortnames={"deploy"}, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status", "scale"}),
    "scheduling.volcano.sh/v1beta1/podgroups": kmock.ResourceInfo(kind="PodGroup", singular="podgroup", shortnames={"pg"}, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    f"{API_GROUP}/v1alpha1/{PLURAL}": kmock.ResourceInfo(
        kind="DCMDPRun", singular="dcmdprun", namespaced=True, shortnames={"dcr"}, categories={"all", "dcmdp"},
        verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"},
    ),
}

_ROOT_KEYS = frozenset({"apiVersion", "kind", "metadata", "status"})
RUNS = kmock.resource(f"{API_GROUP}/v1alpha1/{PLURAL}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch_between(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return copy.deepcopy(new)
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old:
            out[k] = copy.deepcopy(v)
        elif old[k] != v:
            out[k] = merge_patch_between(old[k], v)
    return out


def _invalid(kind: str, name: Any, errors: list[tuple[str, str]], group: str = "dcmdp.io") -> KubernetesError:
    causes = "; ".join(f"{path}: {msg}" for path, msg in errors)
    return KubernetesError(
        status=422, reason="Invalid", message=f'{kind}{"." + group if group else ""} "{name}" is invalid: {causes}',
        details={"causes": [{"field": path, "message": msg} for path, msg in errors]},
    )


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator with uids, generations, the status subresource, DCMDPRun admission,
    garbage collection and kubectl tables."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = info
        self._rv = itertools.count(1)
        self.log: list[dict[str, Any]] = []  # see _record
        self.record = True
        self.admission = True
        # Extra admission for other kinds, as a stricter API server or a webhook would refuse
        # objects: each rule maps (kind, object) to (field, message) errors, answered with a 422.
        self.rejections: list[Any] = []

    # ---------------------------------------------------------------------------- helpers
    def _record(self, request: kmock.Request) -> None:
        """One line per API request: method, verb, group, resource[/sub], namespace, name, user agent."""
        if request.resource is None or not request.resource.plural:
            return
        method = str(getattr(request.method, "value", request.method)).upper()
        if method == "GET":
            verb = "watch" if request.params.get("watch") in ("true", "1") else ("get" if request.name else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method.lower())
        name = request.name
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("metadata") or {}).get("name")
        self.log.append({
            "method": method, "verb": verb, "group": request.resource.group,
            "resource": request.resource.plural + (f"/{request.subresource}" if request.subresource else ""),
            "namespace": request.namespace, "name": name, "ua": request.headers.get("User-Agent", ""),
        })

    def _info(self, resource: Any) -> Optional[kmock.ResourceInfo]:
        for key, info in RESOURCES.items():
            if resource == kmock.resource(key):
                return info
        return None

    def _has_status(self, resource: Any) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    def _find(self, resource: Any, namespace: Optional[str], name: Optional[str]) -> Any:
        for (res, ns, nm), obj in self._objects.items():
            if res == resource and ns == namespace and nm == name and not obj.deleted:
                return obj
        return None

    def _admit(self, obj: dict[str, Any], name: Any) -> dict[str, Any]:
        """The CRD's admission for a DCMDPRun: the object as stored, or a 422."""
        if not self.admission:
            return obj
        admitted, errors = admit({k: v for k, v in obj.items() if k != "status"})
        if errors:
            raise _invalid("DCMDPRun", name, errors)
        assert admitted is not None
        admitted["metadata"] = obj.get("metadata") or {}
        if "status" in obj:
            admitted["status"] = obj["status"]
        return admitted

    def _check_status(self, status: Any, name: Any) -> None:
        if not self.admission:
            return
        errors = validate_status(status)
        if errors:
            raise _invalid("DCMDPRun", name, errors)

    # ----------------------------------------------------------------------------- writes
    def _on_create(self, request: kmock.Request, data: dict[str, Any]) -> None:
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        if self._find(request.resource, meta.get("namespace"), meta.get("name")) is not None:
            return  # KMock answers 409
        if self._has_status(request.resource):
            data.pop("status", None)
        info = self._info(request.resource)
        if info is not None:  # the API server always stores (and returns) these
            res = request.resource
            data.setdefault("apiVersion", f"{res.group}/{res.version}" if res.group else res.version)
            data.setdefault("kind", info.kind)
        if request.resource != RUNS and info is not None:
            errors = [e for rule in self.rejections for e in rule(info.kind, data)]
            if errors:
                raise _invalid(info.kind, meta.get("name"), errors, request.resource.group)
        if request.resource == RUNS:
            admitted = self._admit(data, meta.get("name"))
            if admitted is not data:
                data.clear()
                data.update(admitted)
            meta = data["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta["resourceVersion"] = str(next(self._rv))
        meta.pop("deletionTimestamp", None)

    def _on_update(self, request: kmock.Request, data: dict[str, Any], obj: Any) -> None:
        if request.subresource == "status":
            for k in list(data):
                if k != "status":
                    del data[k]
        elif self._has_status(request.resource):
            data.pop("status", None)
        old = copy.deepcopy(obj.raw)
        meta = data.setdefault("metadata", {})
        for k in ("uid", "creationTimestamp", "generation", "resourceVersion", "name", "namespace"):
            meta.pop(k, None)
        new = _kdicts.patch_dict(copy.deepcopy(old), data)
        if request.resource == RUNS:
            if request.subresource == "status":
                self._check_status(new.get("status") or {}, request.name)
            elif {k: v for k, v in new.items() if k not in _ROOT_KEYS} != {k: v for k, v in old.items() if k not in _ROOT_KEYS}:
                new = self._admit(dict(new), request.name)
                patch = merge_patch_between(old, new)
                data.clear()
                data.update(patch)
                meta = data.setdefault("metadata", {})
        before = {k: v for k, v in old.items() if k not in _ROOT_KEYS}
        after = {k: v for k, v in new.items() if k not in _ROOT_KEYS}
        if before != after:
            meta["generation"] = int(old.get("metadata", {}).get("generation") or 1) + 1
        meta["resourceVersion"] = str(next(self._rv))

    async def _handle(self, request: kmock.Request) -> Any:
        # KMock matches each request against its whole history: keep it short (the current
        # request is the last one), and the accumulated error log too.
        if len(self._requests) > 8:
            del self._requests[:-2]
            for payload in self._payloads:
                del payload._requests[:-2]
        if self._errors and len(self._errors[-1]) > 8:
            del self._errors[-1][:-2]
        if self.record:
            self._record(request)
        data = request.data
        gc: Optional[tuple[str, tuple[Any, Optional[str], str]]] = None
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            async with self._lock:
                if request.action == kmock.action.CREATE and isinstance(data, dict):
                    self._on_create(request, data)
                elif request.action == kmock.action.UPDATE and isinstance(data, dict):
                    obj = self._find(request.resource, request.namespace, request.name)
                    if obj is not None:
                        self._on_update(request, data, obj)
                if request.action in (kmock.action.UPDATE, kmock.action.DELETE):
                    obj = self._find(request.resource, request.namespace, request.name)
                    uid = (obj.raw.get("metadata") or {}).get("uid") if obj is not None else None
                    if uid:
                        gc = (uid, (request.resource, request.namespace, request.name))
        response = await super()._handle(request)
        if gc is not None:
            async with self._lock:
                gone = self._find(*gc[1]) is None
            if gone:
                await self._collect(gc[0])
        return response

    async def _collect(self, owner_uid: str) -> None:
        """Delete what ``owner_uid`` owned (then what those owned): background propagation."""
        pending = [owner_uid]
        while pending:
            uid = pending.pop()
            async with self._lock:
                owned = [
                    (res, obj)
                    for (res, _ns, _nm), obj in list(self._objects.items())
                    if not obj.deleted
                    and any(ref.get("uid") == uid for ref in (obj.raw.get("metadata") or {}).get("ownerReferences") or [])
                ]
                events = []
                for res, obj in owned:
                    raw = copy.deepcopy(obj.raw)
                    if (raw.get("metadata") or {}).get("finalizers"):
                        obj.patch({"metadata": {"deletionTimestamp": _now(), "resourceVersion": str(next(self._rv))}})
                        events.append((res, {"type": "MODIFIED", "object": obj.raw}))
                        continue
                    obj.delete()
                    events.append((res, {"type": "DELETED", "object": raw}))
                    if raw.get("metadata", {}).get("uid"):
                        pending.append(raw["metadata"]["uid"])
                for res, event in events:
                    await self._buses[res].put(event)

    # ------------------------------------------------------------------------------ reads
    async def _serve_version(self, request: kmock.Request) -> Any:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and str(payload.get("groupVersion", "")).startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]  # the core group is "v1", not "/v1"
        for item in payload.get("resources", []) if isinstance(payload, dict) else []:
            if "/" in item["name"]:  # subresources have no names of their own for kubectl
                item["shortNames"], item["categories"] = [], []
        return payload

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        info = self._info(request.resource)
        if isinstance(payload, dict) and info is not None:
            key = next(k for k in RESOURCES if request.resource == kmock.resource(k))
            payload = {"apiVersion": "/".join(key.split("/")[:-1]), "kind": f"{info.kind}List", **payload}
            payload["metadata"] = {"resourceVersion": str(next(self._rv))}
            if request.resource == RUNS and _wants_table(request):
                return _table(payload["items"])
        return payload

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        payload = await super()._serve_fetch(request)
        if request.resource == RUNS and _wants_table(request):
            return _table([payload])
        return payload


def _wants_table(request: kmock.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _json_path(obj: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _human_age(seconds: float) -> str:
    """Like kubectl's ages: 45s, 3m20s, 17m, 5h, 3d."""
    s = max(int(seconds), 0)
    if s < 120:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _table(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table with the CRD's printer columns (what ``kubectl get`` shows)."""
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "name", "priority": 0}]
    columns += [
        {"name": c["name"], "type": c["type"], "format": "", "description": c.get("description", ""),
         "priority": c.get("priority", 0)}
        for c in PRINTER_COLUMNS
    ]
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for c in PRINTER_COLUMNS:
            value = _json_path(obj, c["jsonPath"])
            if c["type"] == "date" and value:
                born = dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
                value = _human_age((dt.datetime.now(dt.timezone.utc) - born).total_seconds())
            cells.append(value)
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                "metadata": obj["metadata"]}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "columnDefinitions": columns, "rows": rows}


def kubeconfig(url: str, namespace: str = "default", token: str = "emulator") -> str:
    """A kubeconfig (YAML text) pointing at the emulator."""
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: emulator\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n"
        f"users:\n- name: emulator\n  user:\n    token: {token}\n"
        f"contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: {namespace}\n"
        "current-context: emulator\n"
    )


class EmulatorThread:
    """The emulator served on 127.0.0.1 from a thread of its own (for sync code: tests, scripts).

    ``with EmulatorThread() as emu: emu.url``; :meth:`call` runs a coroutine function on the
    emulator's loop with the emulator as argument (to read ``emulator.objects`` safely).
    """

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None):
        self.host = host
        self.port = port
        self.url = ""
        self.emulator: Optional[Emulator] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name="k8s-emulator", daemon=True)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to the starting thread
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emu, kmock.Server(emu, host=self.host, port=self.port) as server:
            self.emulator = emu
            self.port = server.port
            self.url = f"http://{self.host}:{server.port}"
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> "EmulatorThread":
        # kube-apiserver takes objects nested thousands of levels deep; so does the emulator
        # (KMock decodes, copies and patches them recursively).
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"the emulator did not start: {self._error!r}") from self._error
        if not self.url:
            raise RuntimeError("the emulator did not start within 30 s")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Any, timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(self.emulator), self._loop).result(timeout)

    def kubeconfig(self, namespace: str = "default") -> str:
        return kubeconfig(self.url, namespace)
