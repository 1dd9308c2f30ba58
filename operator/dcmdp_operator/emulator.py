"""A Kubernetes API emulator for developing and testing the operator without a cluster.

KMock's ``KubernetesEmulator`` (``pip install kmock``; a test dependency, imported only here) keeps
objects in memory and serves get/list/watch/create/patch/delete. This subclass declares every kind
the operator uses and adds what the operator relies on from a real API server and KMock leaves out:

* ``metadata.uid``, ``creationTimestamp``, ``resourceVersion`` and ``generation`` (bumped when
  anything but metadata and status changes); ``generateName``;
* the status subresource: ``/status`` writes change only ``status``, main-resource writes never do;
* garbage collection: deleting an object deletes the objects it owns (background propagation);
* lists carry ``kind``/``apiVersion`` (so ``kubectl get`` can list);
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
import threading
import uuid
from typing import Any, Optional

import kmock
from kmock._internal import dicts as _kdicts  # KMock's own merge-patch (what its PATCH does)

from dcmdp.spec import API_GROUP, PLURAL

RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"get", "list", "watch", "create", "delete"}),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"get", "list", "watch", "create", "patch"}),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    "v1/persistentvolumeclaims": kmock.ResourceInfo(kind="PersistentVolumeClaim", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    "v1/pods": kmock.ResourceInfo(kind="Pod", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    "batch/v1/jobs": kmock.ResourceInfo(kind="Job", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    "apps/v1/deployments": kmock.ResourceInfo(kind="Deployment", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status", "scale"}),
    "scheduling.volcano.sh/v1beta1/podgroups": kmock.ResourceInfo(kind="PodGroup", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"}),
    f"{API_GROUP}/v1alpha1/{PLURAL}": kmock.ResourceInfo(
        kind="DCMDPRun", singular="dcmdprun", namespaced=True, shortnames={"dcr"}, categories={"all", "dcmdp"},
        verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"},
    ),
}

_ROOT_KEYS = frozenset({"apiVersion", "kind", "metadata", "status"})


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator with uids, generations, the status subresource and garbage collection."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = info
        self._rv = itertools.count(1)
        self.log: list[dict[str, Any]] = []  # see _record
        self.record = True

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

    def _has_status(self, resource: Any) -> bool:
        for key, info in RESOURCES.items():
            if resource == kmock.resource(key):
                return "status" in info.subresources
        return False

    def _find(self, resource: Any, namespace: Optional[str], name: Optional[str]) -> Any:
        for (res, ns, nm), obj in self._objects.items():
            if res == resource and ns == namespace and nm == name and not obj.deleted:
                return obj
        return None

    async def _handle(self, request: kmock.Request) -> Any:
        if len(self._requests) > 8:  # the current request is the last one: keep it
            del self._requests[:-2]
            for payload in self._payloads:
                del payload._requests[:-2]
        if self.record:
            self._record(request)
        data = request.data
        gc_uid: Optional[str] = None
        gc_key: Optional[tuple[Any, Optional[str], str]] = None
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            async with self._lock:
                if request.action == kmock.action.CREATE and isinstance(data, dict):
                    meta = data.setdefault("metadata", {})
                    if not meta.get("name") and meta.get("generateName"):
                        meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                    if request.namespace and not meta.get("namespace"):
                        meta["namespace"] = request.namespace
                    if self._find(request.resource, meta.get("namespace"), meta.get("name")) is None:
                        if self._has_status(request.resource):
                            data.pop("status", None)
                        meta["uid"] = str(uuid.uuid4())
                        meta["creationTimestamp"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                        meta["generation"] = 1
                        meta["resourceVersion"] = str(next(self._rv))
                        meta.pop("deletionTimestamp", None)
                elif request.action == kmock.action.UPDATE and isinstance(data, dict):
                    obj = self._find(request.resource, request.namespace, request.name)
                    if obj is not None:
                        if request.subresource == "status":
                            for k in list(data):
                                if k not in ("status", "metadata"):
                                    del data[k]
                            data["metadata"] = {}
                        elif self._has_status(request.resource):
                            data.pop("status", None)
                        old = copy.deepcopy(obj.raw)
                        meta = data.setdefault("metadata", {})
                        for k in ("uid", "creationTimestamp", "generation", "resourceVersion"):
                            meta.pop(k, None)
                        new = _kdicts.patch_dict(copy.deepcopy(old), data)
                        before = {k: v for k, v in old.items() if k not in _ROOT_KEYS}
                        after = {k: v for k, v in new.items() if k not in _ROOT_KEYS}
                        if before != after:
                            meta["generation"] = int(old.get("metadata", {}).get("generation") or 1) + 1
                        meta["resourceVersion"] = str(next(self._rv))
                if request.action in (kmock.action.UPDATE, kmock.action.DELETE):
                    obj = self._find(request.resource, request.namespace, request.name)
                    if obj is not None:
                        gc_uid = (obj.raw.get("metadata") or {}).get("uid")
                        gc_key = (request.resource, request.namespace, request.name)
        response = await super()._handle(request)
        if gc_uid and gc_key is not None:
            async with self._lock:
                gone = self._find(*gc_key) is None
            if gone:
                await self._collect(gc_uid)
        return response

    async def _collect(self, owner_uid: str) -> None:
        """Delete what ``owner_uid`` owned (then what those owned)."""
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
                        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                        obj.patch({"metadata": {"deletionTimestamp": now, "resourceVersion": str(next(self._rv))}})
                        events.append((res, {"type": "MODIFIED", "object": obj.raw}))
                        continue
                    obj.delete()
                    events.append((res, {"type": "DELETED", "object": raw}))
                    if raw.get("metadata", {}).get("uid"):
                        pending.append(raw["metadata"]["uid"])
                for res, event in events:
                    await self._buses[res].put(event)

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        if isinstance(payload, dict) and request.resource is not None:
            for key, info in RESOURCES.items():
                if request.resource == kmock.resource(key):
                    payload = {
                        "apiVersion": "/".join(key.split("/")[:-1]),
                        "kind": f"{info.kind}List",
                        **payload,
                    }
                    payload["metadata"] = {"resourceVersion": str(next(self._rv))}
                    break
        return payload


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
