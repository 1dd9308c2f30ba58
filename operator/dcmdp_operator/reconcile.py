"""One reconcile of one run, top to bottom: read → build → apply → observe → status.

The handlers (``handlers.py``) only call :func:`reconcile`; everything it decides is in pure
functions: :mod:`spec_changes` (what the run may take), :mod:`children` (the manifests),
:mod:`apply` (create or patch), :mod:`status` (phase and conditions).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import time
from typing import Any, Optional

from dcmdp.spec import API_VERSION, KIND, DCMDPRun, SpecError, parse_run

from . import apply, children, kube, metrics, podtemplate, spec_changes, status, trainer_client
from .config import OperatorConfig


# HTTP answers that refuse a child for good (the same object would be refused again): bad request,
# forbidden (RBAC, a quota, a webhook), invalid (422).
REFUSED = frozenset({400, 403, 422})
# Ready reasons that mean "the operator cannot carry this out": retried with a back-off.
ERROR_REASONS = frozenset({"InvalidSpec", "ChildConflict", "ChildRejected", "ReconcileError"})


@dataclasses.dataclass
class Result:
    status: dict[str, Any]
    previous: dict[str, Any]
    events: list[tuple[str, str, str]]
    run: Optional[DCMDPRun]
    writes: list[tuple[str, str, str]]  # (kind, name, action) of the children created or patched


def _parse(body: dict[str, Any], config: OperatorConfig) -> DCMDPRun:
    meta = body.get("metadata") or {}
    return parse_run(
        {
            "apiVersion": body.get("apiVersion", API_VERSION),
            "kind": body.get("kind", KIND),
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": copy.deepcopy(body.get("spec") or {}),
        },
        source=f"DCMDPRun {meta.get('namespace')}/{meta.get('name')}",
        allow_escalations=config.allow_escalations,
    )


def _set(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if v is not None}


async def _patch_status(
    client: kube.Client, meta: dict[str, Any], new: dict[str, Any], previous: Optional[dict[str, Any]] = None
) -> None:
    """Write the status (a merge patch of /status), unless it is what is already there."""
    if previous is not None and _set(new) == _set(previous):
        return
    await client.merge_patch(kube.RUNS, meta["namespace"], meta["name"], {"status": new}, subresource="status")


async def _trainer_status(
    client: kube.Client, run: DCMDPRun, name: str, ns: str, token: str, config: OperatorConfig
) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """The trainer's GetStatus, over TLS when ``spec.tls`` names a Secret (its CA read each time,
    so a renewed certificate is picked up; a Secret without it is reported, never plaintext)."""
    target = config.trainer_target(name, ns)
    tls = run.spec.tls
    if not tls.secret_name:
        return await trainer_client.get_status(target, token, config.grpc_timeout_seconds)
    secret = await client.get(kube.RESOURCES["Secret"], ns, tls.secret_name)
    ca = children.read_secret_key(secret, tls.ca_key)
    if ca is None:
        return None, f"spec.tls: Secret {tls.secret_name} has no key {tls.ca_key!r}" + ("" if secret else " (no such Secret)")
    return await trainer_client.get_status(
        target, token, config.grpc_timeout_seconds, tls_ca=ca, server_name=children.server_name(run, name)
    )


async def reconcile(
    body: dict[str, Any],
    *,
    client: kube.Client,
    config: OperatorConfig,
    previous: Optional[dict[str, Any]] = None,
    trigger: str = "poll",
    now: Optional[dt.datetime] = None,
) -> Result:
    """Bring the run's children to the desired state and write its status once.

    ``previous``: the last status this operator wrote (fresher than ``body`` right after a write);
    defaults to ``body['status']``.
    """
    t0 = time.perf_counter()
    meta = body["metadata"]
    name, ns = meta["name"], meta["namespace"]
    generation = meta.get("generation")
    previous = copy.deepcopy(previous if previous is not None else (body.get("status") or {}))
    now_ = now or dt.datetime.now(dt.timezone.utc)
    obs = status.Observed()
    writes: list[tuple[str, str, str]] = []

    def finish(run: Optional[DCMDPRun]) -> Result:
        new = status.compute(run, obs, previous, generation, now_)
        return Result(new, previous, status.transitions(previous, new), run, writes)

    run: Optional[DCMDPRun] = None
    try:
        try:
            run = _parse(body, config)
        except SpecError as exc:
            obs.error = ("InvalidSpec", "; ".join(f"{p}: {m}" for p, m in exc.errors))
            result = finish(None)
            await _patch_status(client, meta, result.status)
            return result

        # 1. read what fixes the run's identity: its token and the spec its children were built from
        secret, configmap = await asyncio.gather(
            client.get(kube.RESOURCES["Secret"], ns, children.secret_name(name)),
            client.get(kube.RESOURCES["ConfigMap"], ns, children.configmap_name(name)),
        )
        effective, obs.refused = spec_changes.reconcile_spec(
            children.read_accepted(configmap), run, config.allow_escalations
        )
        token = children.read_token(secret) or children.new_token()

        # 2. build the desired children (pure)
        try:
            desired = children.build(effective, meta, token=token, config=config, phase=previous.get("phase"))
        except (children.BuildError, podtemplate.TemplateError) as exc:
            obs.error = ("InvalidSpec", str(exc))
            result = finish(effective)
            await _patch_status(client, meta, result.status)
            return result

        # 3. apply them (create or patch, idempotent), all at once. A run without its Secret and
        #    ConfigMap is new: its children are created without reading first (a 409 falls back
        #    to read-and-patch, so this stays idempotent).
        fresh = secret is None and configmap is None
        known = {"Secret": secret, "ConfigMap": configmap}
        outcomes = await asyncio.gather(
            *(
                apply.apply(client, d, known.get(d["kind"]), known=fresh or d["kind"] in known)
                for d in desired
            ),
            return_exceptions=True,
        )
        for d, outcome in zip(desired, outcomes):
            if isinstance(outcome, apply.ChildConflict):
                obs.error = ("ChildConflict", str(outcome))
                continue
            if isinstance(outcome, kube.APIError) and outcome.status in REFUSED:
                # The API server (or an admission webhook) refuses the child: retrying the same
                # object cannot help. The others are still applied; the run says why.
                obs.error = ("ChildRejected", f"the API server refused {d['kind']} {d['metadata']['name']}: {outcome.reason}")
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            obj, action = outcome
            if action != "unchanged":
                writes.append((d["kind"], d["metadata"]["name"], action))
                metrics.CHILD_WRITES.labels(d["kind"], action).inc()
            if d["kind"] == "Job":
                obs.job = obj
            elif d["kind"] == "Deployment":
                obs.deployments[d["metadata"]["labels"][children.POOL_LABEL]] = obj

        # 4. the trainer's own view, when it has pods to answer
        job_status = (obs.job or {}).get("status") or {}
        if not effective.spec.suspend and (int(job_status.get("active") or 0) or int(job_status.get("ready") or 0)):
            obs.trainer, obs.trainer_error = await _trainer_status(client, effective, name, ns, token, config)

        # 5. status, written once (and not at all when nothing changed)
        result = finish(effective)
        await _patch_status(client, meta, result.status, previous)
        metrics.RECONCILES.labels(trigger, "ok").inc()
        return result
    except Exception as exc:
        # Any other failure (the API server unreachable, a bug, a template nested too deep for
        # Python's recursion limit...) is reported on the run, then retried with a back-off
        # (handlers.py). The status write itself may fail too: then only the Event and log remain.
        metrics.RECONCILES.labels(trigger, "error").inc()
        metrics.ERRORS.labels(type(exc).__name__).inc()
        obs.error = ("ReconcileError", f"{type(exc).__name__}: {str(exc)[:1000]}")
        result = finish(run)
        try:
            await _patch_status(client, meta, result.status, previous)
        except Exception as write_exc:  # noqa: BLE001 - reported with the original error
            result.events.append(("Warning", "StatusWriteFailed", f"{type(write_exc).__name__}: {write_exc}"))
        return result
    finally:
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)
