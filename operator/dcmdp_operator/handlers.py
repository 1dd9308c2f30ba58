"""kopf handlers for ``DCMDPRun`` (``kopf run -m dcmdp_operator.handlers`` or ``dcmdp-operator``).

Thin on purpose: each handler calls :func:`reconcile.reconcile` (read → build → apply → status) and
posts Events for what changed. Triggers: create, resume (operator start), a change of ``spec``, and
a per-run daemon that polls the trainer every ``DCMDP_POLL_SECONDS`` and deletes a finished run
after ``ttlSecondsAfterFinished``. Reconciles of one run never overlap (a per-run lock).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import os
import sys
from typing import Any

import kopf

from dcmdp.spec import API_GROUP, PLURAL

from . import kube, metrics, reconcile, status
from .config import CONFIG

VERSION = "v1alpha1"
RESOURCE = (API_GROUP, VERSION, PLURAL)


# kube-apiserver stores objects nested far deeper than Python's default recursion limit (1000)
# lets kopf decode, copy and diff them; a run with a template a few thousand levels deep must reach
# the handler (the spec model refuses it there, with a status and an Event).
RECURSION_LIMIT = 20_000
sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # One operator replica (the chart runs one): no peering objects, hence no RBAC for them.
    settings.peering.standalone = True
    # No watching of CRDs and namespaces: the operator needs only its own resource (least RBAC).
    settings.scanning.disabled = True
    # kopf's bookkeeping in annotations of the run (never in spec; status is the operator's own).
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    # Handler errors are retried with a backoff (the reconcile is idempotent).
    settings.execution.default_backoff = 5


@kopf.on.login()
def login(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> kopf.ConnectionInfo:
    """In a pod: the service account. Elsewhere: $KUBECONFIG / ~/.kube/config, read at call time;
    kubeconfigs with exec/auth-provider plugins go through the kubernetes client library."""
    info = kopf.login_with_service_account(settings=settings, logger=logger)
    token_file = kube.SA_TOKEN_PATH if info is not None else None
    if info is None:
        info = kopf.login_with_kubeconfig(settings=settings, logger=logger)
        if info is not None and not (info.token or info.certificate_path or info.certificate_data or info.username):
            info = kopf.login_via_client(settings=settings, logger=logger) or info
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig: cannot reach the Kubernetes API")
    kube.CLIENT.configure(info, token_file=token_file)
    return info


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    await kube.CLIENT.close()


def _lock(memo: kopf.Memo) -> asyncio.Lock:
    lock = memo.get("dcmdp_lock")
    if lock is None:
        lock = memo["dcmdp_lock"] = asyncio.Lock()
    return lock


async def _reconcile(body: kopf.Body, memo: kopf.Memo, trigger: str) -> reconcile.Result:
    async with _lock(memo):
        raw = copy.deepcopy(dict(body))
        result = await reconcile.reconcile(
            raw, client=kube.CLIENT, config=CONFIG, previous=memo.get("dcmdp_status"), trigger=trigger
        )
        memo["dcmdp_status"] = result.status
        ready = next((c for c in result.status.get("conditions") or [] if c.get("type") == "Ready"), {})
        memo["dcmdp_failures"] = memo.get("dcmdp_failures", 0) + 1 if ready.get("reason") in reconcile.ERROR_REASONS else 0
    key = f"{raw['metadata'].get('namespace')}/{raw['metadata']['name']}"
    metrics.BOOK.set(key, result.status["phase"])
    for kind, reason, message in result.events:
        (kopf.warn if kind == "Warning" else kopf.info)(body, reason=reason, message=message)
    return result


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile_run(body: kopf.Body, memo: kopf.Memo, reason: str, logger: logging.Logger, **_: Any) -> None:
    result = await _reconcile(body, memo, trigger=str(reason))
    for kind, name, action in result.writes:
        logger.info(f"{action} {kind} {name}")


MAX_BACKOFF_SECONDS = 300.0


def backoff(poll_seconds: float, failures: int) -> float:
    """Seconds to the next reconcile: the poll period, doubled for each reconcile in a row that
    ended in an error (a refused child, a failed reconcile), at most :data:`MAX_BACKOFF_SECONDS`
    (or the poll period, when that is longer)."""
    if failures <= 0:
        return poll_seconds
    return max(poll_seconds, min(poll_seconds * 2.0 ** min(failures, 32), MAX_BACKOFF_SECONDS))


@kopf.daemon(*RESOURCE, cancellation_backoff=2.0, cancellation_timeout=10.0)
async def poll(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Every poll period: re-apply the children, read the trainer, update the status; delete the
    run ``ttlSecondsAfterFinished`` after it finished."""
    key = f"{body.metadata.get('namespace')}/{body.metadata.get('name')}"
    delay = CONFIG.poll_seconds
    try:
        while not stopped:
            await stopped.wait(delay)
            if stopped:
                break
            result = await _reconcile(body, memo, trigger="poll")
            delay = backoff(CONFIG.poll_seconds, memo.get("dcmdp_failures", 0))
            left = status.is_due_for_deletion(result.run, result.status, dt.datetime.now(dt.timezone.utc))
            if left is not None and left <= 0:
                logger.info(f"ttlSecondsAfterFinished has passed since {result.status['completionTime']}: deleting")
                kopf.info(body, reason="Expired", message="ttlSecondsAfterFinished has passed: deleting the run")
                await kube.CLIENT.delete(kube.RUNS, body.metadata.get("namespace"), body.metadata["name"])
                break
            if left is not None:
                delay = min(delay, max(left, 0.05))
    finally:
        metrics.BOOK.forget(key)


# `kopf run -m dcmdp_operator.handlers` sets no metrics port: opt in with the environment.
if os.environ.get("DCMDP_METRICS_PORT"):
    metrics.serve(int(os.environ["DCMDP_METRICS_PORT"]))
