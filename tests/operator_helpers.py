"""Helpers for the operator tests: a small sync API client for the emulator, a real gRPC trainer
status server (``GetStatus`` from ``dcmdp.proto``, token-checked), and ``wait_for``."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from typing import Any, Callable, Optional

import grpc

from dcmdp.proto import dcmdp_pb2, dcmdp_pb2_grpc

PATHS = {
    "DCMDPRun": "/apis/dcmdp.io/v1alpha1/namespaces/{ns}/dcmdpruns",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "PersistentVolumeClaim": "/api/v1/namespaces/{ns}/persistentvolumeclaims",
    "Event": "/api/v1/namespaces/{ns}/events",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "PodGroup": "/apis/scheduling.volcano.sh/v1beta1/namespaces/{ns}/podgroups",
}
CHILD_KINDS = [k for k in PATHS if k not in ("DCMDPRun", "Event")]


class Kube:
    """Sync JSON client for the emulator (what a user's kubectl would do)."""

    def __init__(self, url: str):
        self.url = url

    def _req(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, method=method, data=data, headers={"Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise AssertionError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None

    def get(self, kind: str, ns: str, name: str) -> Optional[dict[str, Any]]:
        return self._req("GET", PATHS[kind].format(ns=ns) + f"/{name}")

    def list(self, kind: str, ns: str) -> list[dict[str, Any]]:
        return (self._req("GET", PATHS[kind].format(ns=ns)) or {}).get("items", [])

    def create(self, kind: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._req("POST", PATHS[kind].format(ns=ns), body)

    def patch(self, kind: str, ns: str, name: str, patch: dict[str, Any], sub: str = "") -> dict[str, Any]:
        path = PATHS[kind].format(ns=ns) + f"/{name}" + (f"/{sub}" if sub else "")
        return self._req("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, kind: str, ns: str, name: str) -> Any:
        return self._req("DELETE", PATHS[kind].format(ns=ns) + f"/{name}")

    def children(self, ns: str, run: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every object of a child kind labelled with the run."""
        out = {}
        for kind in CHILD_KINDS:
            for obj in self.list(kind, ns):
                if (obj["metadata"].get("labels") or {}).get("dcmdp.io/run") == run:
                    out[(kind, obj["metadata"]["name"])] = obj
        return out


def wait_for(fn: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``fn`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (KeyError, TypeError, IndexError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


class FakeTrainer(dcmdp_pb2_grpc.TrainerServicer):
    """A real gRPC server answering ``GetStatus`` for each run by its token (others: UNIMPLEMENTED).

    ``statuses[token]`` is a dict of ``dcmdp_pb2.Status`` fields (``pools``: list of dicts).
    A wrong or missing token gets UNAUTHENTICATED, as the real trainer does.
    """

    def __init__(self, tls: Optional[tuple[bytes, bytes]] = None) -> None:
        """``tls``: (certificate, key) in PEM, to serve over TLS only."""
        self.statuses: dict[str, dict[str, Any]] = {}
        self.delay = 0.0  # seconds before answering (a slow trainer)
        self.calls = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        dcmdp_pb2_grpc.add_TrainerServicer_to_server(self, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)

    def GetStatus(self, request: dcmdp_pb2.StatusRequest, context: grpc.ServicerContext) -> dcmdp_pb2.Status:
        if self.delay:
            time.sleep(self.delay)
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        with self._lock:
            self.calls += 1
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            st = self.statuses.get(token) if token else None
            if st is None:
                self.rejected += 1
        if st is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong run token")
        fields = dict(st)
        pools = [dcmdp_pb2.PoolStatus(**p) for p in fields.pop("pools", [])]
        return dcmdp_pb2.Status(pools=pools, **fields)

    def __enter__(self) -> "FakeTrainer":
        self.server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop(grace=None).wait(5)


def api_requests(emu: Any, user_agents: tuple[str, ...] = ("kopf/", "dcmdp-operator")) -> list[dict[str, Any]]:
    """The Kubernetes API requests the emulator received from the operator (by User-Agent):
    method, verb, group, resource (``plural[/subresource]``), namespace, name."""

    async def collect(e: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in e.log if r["ua"].startswith(user_agents)]

    return emu.call(collect)
