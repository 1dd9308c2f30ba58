"""The desired children of a ``DCMDPRun``: pure builders, spec in, manifests out. No I/O.

A run owns (ownerReferences, controller=true, blockOwnerDeletion=true; Kubernetes' garbage
collector deletes them with the run):

* ``<run>-token``        Secret: the per-run gRPC token (``token``), mounted in every pod as a file;
* ``<run>-config``       ConfigMap: the resolved run manifest (``run.yaml``), mounted in the trainer;
* ``<run>-trainer``      indexed Job (``replicas`` pods, restartPolicy Never: each pod failure is
                         one restart, counted against ``failurePolicy.maxRestarts``); with more
                         than one rank in all (``replicas × gpusPerReplica``, dcmdp.ranks) each
                         pod runs ``torchrun`` for its ``gpusPerReplica`` ranks, rendezvousing
                         at pod 0 (``<run>-trainer-0.<run>-trainer:29500``);
* ``<run>-trainer``      headless Service (gRPC 50051, metrics 9090); pod 0 answers at
                         ``<run>-trainer-0.<run>-trainer:50051``;
* ``<run>-rollout-<pool>`` one Deployment per rollout pool;
* ``<run>-checkpoints``  PVC, when ``checkpoint.pvc.enabled`` (an emptyDir otherwise);
* ``<run>``              Volcano PodGroup, when ``scheduling.gang: volcano``.

``spec.suspend`` (and a finished run, for the pools) scales everything to zero: the Job is
suspended (its pods are deleted, not failed: no restart is counted) and the Deployments go to 0
replicas. The trainer always runs with ``--resume``: it continues from the newest checkpoint in
``/checkpoints`` when there is one, so resuming after a suspend or a pod failure loses at most
``checkpoint.everySteps`` steps.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any, Optional


from dcmdp import names, podsecurity, ranks, yamlfile
from dcmdp.spec import API_VERSION, KIND, DCMDPRun, PoolSpec, dump_run
from dcmdp.status import TERMINAL_PHASES

from . import podtemplate
from .config import FIELD_MANAGER, GRPC_PORT, METRICS_PORT, OperatorConfig

TOKEN_KEY = "token"
CONFIG_KEY = "run.yaml"
TOKEN_DIR = "/var/run/dcmdp"
CONFIG_DIR = "/etc/dcmdp"
CHECKPOINT_DIR = "/checkpoints"
MASTER_PORT = 29500  # torchrun's rendezvous store and the trainer ranks' process group, on pod 0
JOB_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

# label keys
RUN_LABEL = "dcmdp.io/run"
ROLE_LABEL = "dcmdp.io/role"
POOL_LABEL = "dcmdp.io/pool"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"

# The images' user (trainer_image/Dockerfile, inference_image/Dockerfile: `USER 10001:10001`).
RUN_AS_USER = 10001
TMP_DIR = "/tmp"
# Pods that meet the `restricted` Pod Security Standard. The user's template may tighten these
# but not loosen them (dcmdp.podsecurity): the overlay is merged over them, then checked.
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    # Volumes (the checkpoint PVC) are group-writable by the pod's user.
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


# Pod fields the operator sets itself (after the user's overlay, which may not set them).
OPERATOR_POD_FIELDS = frozenset({"restartPolicy", "subdomain"})


class BuildError(ValueError):
    """The run cannot be turned into children (e.g. a name too long); ``path`` names the field."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


# --------------------------------------------------------------------------------------- names
def secret_name(run: str) -> str:
    return f"{run}-token"


def configmap_name(run: str) -> str:
    return f"{run}-config"


trainer_name = names.trainer_name
pool_name = names.pool_name


def pvc_name(run: str) -> str:
    return f"{run}-checkpoints"


def podgroup_name(run: str) -> str:
    return run


def trainer_host(run: str) -> str:
    """Pod 0 of the indexed Job, through the headless Service (same namespace)."""
    return f"{names.trainer_hostname(run, 0)}.{trainer_name(run)}"


def new_token() -> str:
    """A fresh per-run token (256 bits). Called once per run: the Secret keeps it for good."""
    return secrets.token_urlsafe(32)


def read_secret_key(secret: Optional[dict[str, Any]], key: str) -> Optional[bytes]:
    """The bytes under ``key`` of a Secret as read from the API server (None when absent or unreadable)."""
    if not secret:
        return None
    raw = (secret.get("data") or {}).get(key)
    if raw:
        try:
            return base64.b64decode(raw, validate=True) or None
        except ValueError:
            return None
    text = (secret.get("stringData") or {}).get(key)
    return text.encode() if isinstance(text, str) and text else None


def read_token(secret: Optional[dict[str, Any]]) -> Optional[str]:
    """The token stored in an existing Secret (None when absent or unreadable)."""
    raw = read_secret_key(secret, TOKEN_KEY)
    try:
        return raw.decode() if raw else None
    except UnicodeDecodeError:
        return None


def read_accepted(configmap: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The run manifest the children were last built from (the ConfigMap's ``run.yaml``)."""
    if not configmap:
        return None
    text = (configmap.get("data") or {}).get(CONFIG_KEY)
    if not text:
        return None
    try:
        docs = yamlfile.loads(text)
    except yamlfile.YAMLFileError:
        return None
    data = docs[0] if len(docs) == 1 else None
    return data if isinstance(data, dict) else None


# -------------------------------------------------------------------------------------- labels
def labels(run: str, role: str, pool: Optional[str] = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "dcmdp",
        "app.kubernetes.io/instance": run,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        RUN_LABEL: run,
        ROLE_LABEL: role,
    }
    if pool is not None:
        out[POOL_LABEL] = pool
    return out


def selector(run: str, role: str, pool: Optional[str] = None) -> dict[str, str]:
    out = {RUN_LABEL: run, ROLE_LABEL: role}
    if pool is not None:
        out[POOL_LABEL] = pool
    return out


def owner_reference(meta: dict[str, Any]) -> dict[str, Any]:
    uid = meta.get("uid")
    if not uid:
        raise BuildError("metadata.uid", "the run has no uid (not read from the API server?)")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, meta: dict[str, Any], lbls: dict[str, str]) -> dict[str, Any]:
    err = names.child_name_error(name)
    if err:
        raise BuildError("metadata.name", f"child name: {err}: use a shorter run (or pool) name")
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": dict(lbls),
        "ownerReferences": [owner_reference(meta)],
    }


# ------------------------------------------------------------------------------------ children
def build(
    run: DCMDPRun,
    meta: dict[str, Any],
    *,
    token: str,
    config: OperatorConfig,
    phase: Optional[str] = None,
) -> list[dict[str, Any]]:
    """All the desired children of ``run``, in creation order.

    ``meta``: the run's metadata (name, namespace, uid). ``token``: the run's token (the existing
    one when the Secret exists). ``phase``: the run's current phase (a finished run keeps its
    trainer Job for its record but scales its pools to zero).
    """
    if not token:
        raise BuildError("token", "a run needs a token")
    name = meta["name"]
    spec = run.spec
    # The model checks these too; `meta` is the object's own (the model saw the same name).
    host_error = names.trainer_hostname_error(name, spec.trainer.replicas)
    if host_error:
        raise BuildError("metadata.name", host_error)
    finished = phase in TERMINAL_PHASES
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _metadata(secret_name(name), meta, labels(name, "token")),
            "type": "Opaque",
            "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(configmap_name(name), meta, labels(name, "config")),
            "data": {CONFIG_KEY: yamlfile.dumps(run_config(run, meta), sort_keys=True)},
        },
    ]
    if spec.checkpoint.pvc.enabled:
        out.append(_pvc(run, meta))
    if spec.scheduling.gang == "volcano":
        out.append(_podgroup(run, meta))
    out.append(_service(run, meta))
    out.append(_trainer_job(run, meta, config, phase))
    for pool in spec.rollout.pools:
        out.append(_pool_deployment(run, meta, pool, config, scaled_down=spec.suspend or finished))
    return out


def run_config(run: DCMDPRun, meta: dict[str, Any]) -> dict[str, Any]:
    """The resolved manifest the trainer reads (name and namespace only in its metadata)."""
    data = dump_run(run)
    data["metadata"] = {"name": meta["name"], "namespace": meta["namespace"]}
    data.pop("status", None)
    return data


def total_pods(run: DCMDPRun) -> int:
    return run.spec.trainer.replicas + sum(p.replicas for p in run.spec.rollout.pools)


def _pvc(run: DCMDPRun, meta: dict[str, Any]) -> dict[str, Any]:
    pvc = run.spec.checkpoint.pvc
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(pvc_name(meta["name"]), meta, labels(meta["name"], "checkpoints")),
        "spec": {
            # Several trainer pods (on several nodes) share the checkpoint folder.
            "accessModes": ["ReadWriteOnce" if run.spec.trainer.replicas == 1 else "ReadWriteMany"],
            "resources": {"requests": {"storage": pvc.size}},
        },
    }
    if pvc.storage_class_name:
        body["spec"]["storageClassName"] = pvc.storage_class_name
    return body


def _podgroup(run: DCMDPRun, meta: dict[str, Any]) -> dict[str, Any]:
    sched = run.spec.scheduling
    spec: dict[str, Any] = {"minMember": total_pods(run)}
    if sched.queue_name:
        spec["queue"] = sched.queue_name
    if sched.priority_class_name:
        spec["priorityClassName"] = sched.priority_class_name
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": _metadata(podgroup_name(meta["name"]), meta, labels(meta["name"], "gang")),
        "spec": spec,
    }


def _service(run: DCMDPRun, meta: dict[str, Any]) -> dict[str, Any]:
    name = meta["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(trainer_name(name), meta, labels(name, "trainer")),
        "spec": {
            "clusterIP": "None",
            # Pod DNS records exist before readiness: the trainer ranks rendezvous through them.
            "publishNotReadyAddresses": True,
            "selector": selector(name, "trainer"),
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def _scheduling(run: DCMDPRun, name: str, pod: dict[str, Any]) -> None:
    """Gang scheduling and priority on a pod template (in place)."""
    sched = run.spec.scheduling
    if sched.priority_class_name:
        pod["spec"]["priorityClassName"] = sched.priority_class_name
    if sched.gang == "volcano":
        pod["spec"]["schedulerName"] = "volcano"
        pod["metadata"].setdefault("annotations", {})[VOLCANO_GROUP_ANNOTATION] = podgroup_name(name)
    elif sched.gang == "kueue":
        pod["metadata"]["labels"][KUEUE_QUEUE_LABEL] = sched.queue_name


TMP_VOLUME: dict[str, Any] = {"name": "tmp", "emptyDir": {}}
TMP_MOUNT: dict[str, Any] = {"name": "tmp", "mountPath": TMP_DIR}
HOME_ENV: dict[str, Any] = {"name": "HOME", "value": TMP_DIR}


def _token_volume(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    volume = {
        "name": "dcmdp-token",
        "secret": {"secretName": secret_name(name), "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}]},
    }
    mount = {"name": "dcmdp-token", "mountPath": TOKEN_DIR, "readOnly": True}
    return volume, mount


TLS_DIR = "/etc/dcmdp/tls"
TLS_VOLUME = "dcmdp-tls"


def server_name(run: DCMDPRun, name: str) -> str:
    """The name the trainer's certificate must carry (``spec.tls.serverName``, else pod 0's)."""
    return run.spec.tls.server_name or trainer_host(name)


def _with_tls(run: DCMDPRun, name: str, required: dict[str, Any], role: str) -> None:
    """``spec.tls``: the trainer serves with the Secret's key pair; a worker verifies it against the
    Secret's CA (in place, on the ``required`` parts of a pod)."""
    tls = run.spec.tls
    if not tls.secret_name:
        return
    if role == "trainer":
        items = [{"key": k, "path": k} for k in ("tls.crt", "tls.key")]
        args = ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    else:
        items = [{"key": tls.ca_key, "path": "ca.crt"}]
        args = ["--tls-ca", f"{TLS_DIR}/ca.crt", "--server-name", server_name(run, name)]
    required["command"] = [*required["command"], *args]
    required["volumes"] = [*required["volumes"], {"name": TLS_VOLUME, "secret": {"secretName": tls.secret_name, "items": items}}]
    required["volumeMounts"] = [*required["volumeMounts"], {"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True}]


def own_secrets(run: DCMDPRun, name: str) -> frozenset[str]:
    """The Secrets the operator itself mounts in a run's pods."""
    return frozenset({secret_name(name)} | ({run.spec.tls.secret_name} if run.spec.tls.secret_name else set()))


def _base_pod(lbls: dict[str, str], container: str, image: str, config: OperatorConfig) -> dict[str, Any]:
    """The pod before the user's overlay: restricted security, no service-account token, a
    writable ``/tmp`` (emptyDir; the root filesystem is read-only; ``HOME`` points there)."""
    return {
        "metadata": {"labels": dict(lbls)},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": dict(POD_SECURITY_CONTEXT),
            "containers": [{"name": container, "image": image, "imagePullPolicy": config.image_pull_policy}],
        },
    }


def _secure(pod: dict[str, Any], path: str, config: OperatorConfig, mounted_secrets: frozenset[str]) -> None:
    """After the overlay: every container (the user's sidecars too) gets the restricted security
    context under its own, and the merged pod is checked for escalations (in place)."""
    for key in podsecurity.CONTAINER_LISTS:
        for c in pod["spec"].get(key) or []:
            own = c.get("securityContext") or {}
            sc = c["securityContext"] = podtemplate.merge(CONTAINER_SECURITY_CONTEXT, own)
            if "capabilities" not in config.allow_escalations:
                drop = sc["capabilities"].get("drop") or []
                sc["capabilities"]["drop"] = drop if "ALL" in drop else [*drop, "ALL"]
            # What the admin allowed must still make a valid pod: the API server refuses
            # privileged with allowPrivilegeEscalation false, the kubelet uid 0 with runAsNonRoot.
            if own.get("privileged") is True and "allowPrivilegeEscalation" not in own:
                del sc["allowPrivilegeEscalation"]
            if own.get("runAsUser") == 0 and "runAsNonRoot" not in own:
                del sc["runAsNonRoot"]
    pod_sc = pod["spec"]["securityContext"]
    if pod_sc.get("runAsUser") == 0 and pod_sc.get("runAsNonRoot") is True:
        pod_sc.pop("runAsNonRoot")
        for key in podsecurity.CONTAINER_LISTS:
            for c in pod["spec"].get(key) or []:
                if "runAsUser" not in c["securityContext"]:
                    c["securityContext"].pop("runAsNonRoot", None)
    # The final pod: the operator's own fields and the Secrets it mounts are its, the rest is the
    # user's and must be on the allow-list (or allowed by the admin).
    found = podsecurity.violations(
        pod["spec"], path, config.allow_escalations, own_secrets=mounted_secrets, operator_fields=OPERATOR_POD_FIELDS
    ) + podsecurity.violations({"annotations": pod["metadata"].get("annotations")}, path, config.allow_escalations)
    if found:
        raise BuildError(*found[0])


def _enforce(pod: dict[str, Any], container_name: str, required: dict[str, Any], lbls: dict[str, str]) -> None:
    """After the user's overlay: put back what the run needs to work (in place)."""
    pod["metadata"]["labels"].update(lbls)
    main = next(c for c in pod["spec"]["containers"] if c["name"] == container_name)
    for key in ("image", "command", "ports"):
        if key in required:
            main[key] = required[key]
    for key in ("env", "volumeMounts"):
        main[key] = podtemplate.merge(main.get(key, []), required[key], key)
    pod["spec"]["volumes"] = podtemplate.merge(pod["spec"].get("volumes", []), required["volumes"], "volumes")
    pod["spec"].update(required.get("pod", {}))


def _trainer_job(run: DCMDPRun, meta: dict[str, Any], config: OperatorConfig, phase: Optional[str]) -> dict[str, Any]:
    name = meta["name"]
    spec = run.spec
    trainer = spec.trainer
    lbls = labels(name, "trainer")
    image = trainer.image or config.trainer_image
    token_volume, token_mount = _token_volume(name)
    if spec.checkpoint.pvc.enabled:
        ckpt_volume = {"name": "checkpoints", "persistentVolumeClaim": {"claimName": pvc_name(name)}}
    else:
        ckpt_volume = {"name": "checkpoints", "emptyDir": {}}
    args = ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "--port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
            "--out", CHECKPOINT_DIR, "--resume"]
    rank_env: list[dict[str, Any]] = []
    command = ["dcmdp-trainer", *args]
    mismatch = ranks.gpus_mismatch(trainer)
    if mismatch:
        raise BuildError(ranks.GPUS_FIELD, mismatch)
    if ranks.world_size(trainer) > 1:
        # one rank per GPU, torchrun's way; the pods rendezvous at pod 0 through the headless Service
        command = ranks.torchrun_command(trainer, node_rank="$(NODE_RANK)", master_addr=trainer_host(name),
                                         master_port=MASTER_PORT, args=args)
        rank_env = [{"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": JOB_INDEX_FIELD}}}]
    required = {
        "image": image,
        "command": command,
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": [
            {"name": "DCMDP_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_KEY}"},
            {"name": "DCMDP_RUN_NAME", "value": name},
            {"name": "DCMDP_ROLE", "value": "trainer"},
            *rank_env,
            HOME_ENV,
        ],
        "volumeMounts": [
            token_mount,
            TMP_MOUNT,
            {"name": "dcmdp-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
        ],
        "volumes": [
            token_volume,
            TMP_VOLUME,
            {
                "name": "dcmdp-config",
                "configMap": {"name": configmap_name(name), "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]},
            },
            ckpt_volume,
        ],
        # The pod's hostname `<job>-<index>` becomes resolvable through the headless Service.
        "pod": {"restartPolicy": "Never", "subdomain": trainer_name(name)},
    }
    _with_tls(run, name, required, "trainer")
    pod = _base_pod(lbls, "trainer", image, config)
    pod = podtemplate.apply_overlay(pod, trainer.template.overlay(), "trainer", "spec.trainer.template")
    _enforce(pod, "trainer", required, lbls)
    _secure(pod, "spec.trainer.template", config, own_secrets(run, name))
    _scheduling(run, name, pod)

    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": trainer.replicas,
        "parallelism": trainer.replicas,
        # Each pod failure is one restart; one more than maxRestarts fails the Job (and the run).
        "backoffLimit": spec.failure_policy.max_restarts,
        "template": pod,
    }
    job_meta = _metadata(trainer_name(name), meta, lbls)
    if spec.scheduling.gang == "kueue":
        # Kueue admits a Job by unsuspending it: the operator creates it suspended and touches
        # `suspend` afterwards only for the user's own suspend / resume (see docs/operator.md).
        job_meta["labels"][KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name
        if spec.suspend:
            job_spec["suspend"] = True
        elif phase == "Suspended":
            job_spec["suspend"] = False  # the user resumed: Kueue re-admits (or re-suspends) it
    else:
        job_spec["suspend"] = bool(spec.suspend)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": job_spec}


def for_creation(manifest: dict[str, Any]) -> dict[str, Any]:
    """A child as it is first created: a Job queued in Kueue starts suspended (Kueue's rule; Kueue
    unsuspends it on admission, so later patches leave ``suspend`` alone)."""
    if manifest["kind"] == "Job" and KUEUE_QUEUE_LABEL in manifest["metadata"]["labels"]:
        if "suspend" not in manifest["spec"]:
            manifest = {**manifest, "spec": {**manifest["spec"], "suspend": True}}
    return manifest


def _pool_deployment(
    run: DCMDPRun, meta: dict[str, Any], pool: PoolSpec, config: OperatorConfig, *, scaled_down: bool
) -> dict[str, Any]:
    name = meta["name"]
    lbls = labels(name, "rollout", pool.name)
    image = pool.image or config.rollout_image
    token_volume, token_mount = _token_volume(name)
    index = next(i for i, p in enumerate(run.spec.rollout.pools) if p.name == pool.name)
    required = {
        "image": image,
        "command": [
            "dcmdp-rollout",
            "--trainer", f"{trainer_host(name)}:{GRPC_PORT}",
            "--pool", pool.name,
            "--token-file", f"{TOKEN_DIR}/{TOKEN_KEY}",
        ],
        "env": [
            {"name": "DCMDP_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_KEY}"},
            {"name": "DCMDP_RUN_NAME", "value": name},
            {"name": "DCMDP_ROLE", "value": "rollout"},
            {"name": "DCMDP_POOL", "value": pool.name},
            {"name": "DCMDP_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            HOME_ENV,
        ],
        "volumeMounts": [token_mount, TMP_MOUNT],
        "volumes": [token_volume, TMP_VOLUME],
    }
    _with_tls(run, name, required, "rollout")
    pod = _base_pod(lbls, "rollout", image, config)
    path = f"spec.rollout.pools[{index}].template"
    pod = podtemplate.apply_overlay(pod, pool.template.overlay(), "rollout", path)
    _enforce(pod, "rollout", required, lbls)
    _secure(pod, path, config, own_secrets(run, name))
    _scheduling(run, name, pod)
    dep_meta = _metadata(pool_name(name, pool.name), meta, lbls)
    if run.spec.scheduling.gang == "kueue":
        dep_meta["labels"][KUEUE_QUEUE_LABEL] = run.spec.scheduling.queue_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": dep_meta,
        "spec": {
            "replicas": 0 if scaled_down else pool.replicas,
            "selector": {"matchLabels": selector(name, "rollout", pool.name)},
            "template": pod,
        },
    }
