"""A small async Kubernetes API client for the reconcile (get, create, apply, merge-patch, delete).

kopf keeps its own API client private, so the operator talks to the API server through this one,
built from the same :class:`kopf.ConnectionInfo` that kopf's login produced (see ``handlers.login``):
the same server, CA, client certificate or token. A service-account token is re-read from its file
when it changes (kubelet rotates it). One aiohttp session per event loop.

Every resource kind the operator touches is listed in :data:`RESOURCES`; ``rbac.RULES`` must grant
exactly the verbs used on them (``tests/test_operator_rbac.py`` checks both ways).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from typing import Any, Optional
from urllib.parse import quote

import aiohttp

from .config import FIELD_MANAGER

SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclasses.dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: Optional[str], name: Optional[str] = None, subresource: Optional[str] = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [root]
        if self.namespaced:
            if not namespace:
                raise ValueError(f"{self.kind} is namespaced: a namespace is needed")
            parts.append(f"namespaces/{quote(namespace, safe='')}")
        parts.append(self.plural)
        if name is not None:
            parts.append(quote(name, safe=""))
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


RUNS = Resource("dcmdp.io", "v1alpha1", "dcmdpruns", "DCMDPRun")
RESOURCES: dict[str, Resource] = {
    r.kind: r
    for r in (
        RUNS,
        Resource("", "v1", "secrets", "Secret"),
        Resource("", "v1", "configmaps", "ConfigMap"),
        Resource("", "v1", "services", "Service"),
        Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
        Resource("", "v1", "events", "Event"),
        Resource("batch", "v1", "jobs", "Job"),
        Resource("apps", "v1", "deployments", "Deployment"),
        Resource("scheduling.volcano.sh", "v1beta1", "podgroups", "PodGroup"),
    )
}


def resource_of(manifest: dict[str, Any]) -> Resource:
    try:
        res = RESOURCES[manifest["kind"]]
    except KeyError:
        raise ValueError(f"the operator does not manage objects of kind {manifest.get('kind')!r}") from None
    if res.api_version != manifest.get("apiVersion"):
        raise ValueError(f"{manifest['kind']}: apiVersion {manifest.get('apiVersion')!r} != {res.api_version!r}")
    return res


class APIError(Exception):
    def __init__(self, status: int, method: str, path: str, body: Any):
        self.status = status
        self.method = method
        self.path = path
        self.body = body
        reason = body.get("message") if isinstance(body, dict) else str(body)[:300]
        self.reason = f"HTTP {status}: {reason}"  # the API server's own words (they name the field)
        super().__init__(f"{method} {path}: HTTP {status}: {reason}")


class NotFound(APIError):
    pass


class Conflict(APIError):
    pass


class Client:
    """Async API client; configure it with :meth:`configure` (kopf's ConnectionInfo)."""

    def __init__(self) -> None:
        self._info: Any = None
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._stale: list[tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = []
        self._token_file: Optional[str] = None
        self._token_mtime: float = 0.0
        self._token: Optional[str] = None
        self.timeout = aiohttp.ClientTimeout(total=30)

    # ------------------------------------------------------------------------------ setup
    def configure(self, info: Any, token_file: Optional[str] = None) -> None:
        """Use ``info`` (a :class:`kopf.ConnectionInfo`) from now on. Old sessions are dropped."""
        self._info = info
        self._token_file = token_file
        self._token_mtime = 0.0
        self._token = None
        # Sessions made with the old credentials are closed by their own loop on its next call.
        self._stale.extend(self._sessions.items())
        self._sessions = {}

    @property
    def configured(self) -> bool:
        return self._info is not None

    def _session(self) -> aiohttp.ClientSession:
        if self._info is None:
            raise RuntimeError("the API client is not configured (no login yet)")
        loop = asyncio.get_running_loop()
        for item in [s for s in self._stale if s[0] is loop]:
            self._stale.remove(item)
            if not item[1].closed:
                loop.create_task(item[1].close())
        session = self._sessions.get(loop)
        if session is None or session.closed:
            info = self._info
            headers = dict(info.as_http_headers())
            headers.setdefault("User-Agent", f"{FIELD_MANAGER}")
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
                headers=headers,
                proxy=info.proxy_url,
                trust_env=info.trust_env,
                timeout=self.timeout,
            )
            self._sessions[loop] = session
        return session

    def _auth_header(self) -> dict[str, str]:
        if not self._token_file:
            return {}
        try:
            mtime = os.stat(self._token_file).st_mtime
            if mtime != self._token_mtime:
                with open(self._token_file, encoding="utf-8") as f:
                    self._token = f.read().strip()
                self._token_mtime = mtime
        except OSError:
            pass
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def close(self) -> None:
        """Close this loop's sessions (at operator shutdown)."""
        loop = asyncio.get_running_loop()
        mine = [s for lp, s in self._stale if lp is loop]
        self._stale = [(lp, s) for lp, s in self._stale if lp is not loop]
        session = self._sessions.pop(loop, None)
        for s in mine + ([session] if session is not None else []):
            if not s.closed:
                await s.close()

    # ---------------------------------------------------------------------------- requests
    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Optional[dict[str, str]] = None,
    ) -> Any:
        session = self._session()
        url = self._info.server.rstrip("/") + path
        headers = {"Accept": "application/json", **self._auth_header()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        async with session.request(method, url, data=data, headers=headers, params=params) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            if resp.status == 404:
                raise NotFound(resp.status, method, path, payload)
            if resp.status == 409:
                raise Conflict(resp.status, method, path, payload)
            if resp.status >= 400:
                raise APIError(resp.status, method, path, payload)
            return payload

    async def get(self, res: Resource, namespace: Optional[str], name: str) -> Optional[dict[str, Any]]:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", res.path(namespace, name))
        except NotFound:
            return None

    async def create(self, res: Resource, namespace: Optional[str], body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", res.path(namespace), body=body, params={"fieldManager": FIELD_MANAGER})

    async def apply(self, res: Resource, namespace: Optional[str], body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply (the operator owns the fields it sets; others' fields are kept)."""
        return await self.request(
            "PATCH",
            res.path(namespace, body["metadata"]["name"]),
            body=body,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
        )

    async def merge_patch(
        self, res: Resource, namespace: Optional[str], name: str, patch: dict[str, Any], subresource: Optional[str] = None
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            res.path(namespace, name, subresource),
            body=patch,
            content_type="application/merge-patch+json",
            params={"fieldManager": FIELD_MANAGER},
        )

    async def delete(self, res: Resource, namespace: Optional[str], name: str) -> bool:
        """Delete (background propagation: the garbage collector removes what it owned)."""
        try:
            await self.request(
                "DELETE", res.path(namespace, name), body={"propagationPolicy": "Background"}
            )
            return True
        except NotFound:
            return False


CLIENT = Client()
