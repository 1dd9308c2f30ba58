"""The trainer's ranks: ``world = spec.trainer.replicas × gpusPerReplica``, one rank per GPU.

Each trainer replica (a pod of the indexed Job, or the local machine for ``dcmdp run``) starts
``gpusPerReplica`` ranks the way ``torchrun`` does: the operator's pods run
:func:`torchrun_command` (``torch.distributed.run`` with its static rendezvous at pod 0's stable
hostname), which gives each rank torch.distributed's environment contract: ``RANK`` (global),
``LOCAL_RANK`` (its GPU in the pod), ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``. Global rank 0 serves gRPC and publishes weights; the others train with it
(``trainer_image/dcmdp_trainer/distributed.py``). Pure functions of the spec: the operator uses
them without torch.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from dcmdp.spec import TrainerSpec

GPU_RESOURCE = "nvidia.com/gpu"
CONTAINER = "trainer"  # the trainer's main container (operator/dcmdp_operator/children.py)
TORCHRUN = ("torchrun",)  # console script of the torch wheel; tests use (python, "-m", "torch.distributed.run")


def template_gpus(overlay: dict[str, Any], container: str = CONTAINER) -> Optional[int]:
    """The ``nvidia.com/gpu`` limit of ``container`` in a pod template overlay, or None.

    ``overlay``: :meth:`dcmdp.spec.PodTemplate.overlay`, short form (``resources`` at the top) or
    full form (``spec.containers[name == container].resources``). A limit that is not a whole
    number of GPUs (the API server refuses those) counts as none.
    """
    def get(obj: Any, key: str) -> Any:  # (a field of the wrong shape counts as absent)
        return obj.get(key) if isinstance(obj, dict) else None

    resources = get(overlay, "resources")
    for c in get(get(overlay, "spec"), "containers") or []:
        if get(c, "name") == container and get(c, "resources") is not None:
            resources = c["resources"]
    limit = get(get(resources, "limits"), GPU_RESOURCE)
    if limit is None or not re.fullmatch(r"[0-9]+", str(limit).strip()):
        return None
    return int(str(limit).strip()) or None


def gpus_per_replica(trainer: TrainerSpec) -> int:
    """Ranks per trainer replica: ``gpusPerReplica``, else the template's ``nvidia.com/gpu`` limit, else 1."""
    if trainer.gpus_per_replica is not None:
        return trainer.gpus_per_replica
    return template_gpus(trainer.template.overlay()) or 1


GPUS_FIELD = "spec.trainer.gpusPerReplica"


def gpus_mismatch(trainer: TrainerSpec) -> Optional[str]:
    """Why ``gpusPerReplica`` and the template's ``nvidia.com/gpu`` limit disagree, or None.

    One rank per GPU: more ranks than the pod's GPUs fail on device selection (and each Job restart
    counts against ``failurePolicy.maxRestarts``), fewer leave GPUs idle. Checked by ``dcmdp
    validate``/``run`` (:mod:`dcmdp.preflight`) and the operator before anything is created; not a
    CRD rule because the limit may be written in the template's short or full form, as int or string.
    """
    gpus = template_gpus(trainer.template.overlay())
    if trainer.gpus_per_replica is None or gpus is None or gpus == trainer.gpus_per_replica:
        return None
    return (f"{trainer.gpus_per_replica} ranks per pod but the trainer template's {GPU_RESOURCE} limit is "
            f"{gpus}: one rank per GPU, make them equal (or leave gpusPerReplica out to take the limit)")


def world_size(trainer: TrainerSpec) -> int:
    """Ranks of the run: ``replicas × gpus_per_replica``."""
    return trainer.replicas * gpus_per_replica(trainer)


def torchrun_command(trainer: TrainerSpec, *, node_rank: str, master_addr: str, master_port: int,
                     args: Sequence[str], launcher: Sequence[str] = TORCHRUN,
                     module: str = "dcmdp_trainer") -> list[str]:
    """The command of one replica: ``torchrun`` starting its ``gpus_per_replica`` ranks of ``module``
    (``python -m dcmdp_trainer ARGS``, each with torchrun's environment).

    ``node_rank``: this replica's index (the operator passes ``$(NODE_RANK)``, which the kubelet
    expands from the pod's Job completion index); ``master_addr:master_port``: where replica 0's
    agent keeps the rendezvous store (torchrun's static rendezvous; the ranks' process group
    meets there too). ``--max-restarts 0``: a failed rank fails its pod, and the Job restarts it
    (counted against ``failurePolicy.maxRestarts``); every rank resumes from the checkpoint.
    """
    return [
        *launcher,
        "--nnodes", str(trainer.replicas),
        "--nproc-per-node", str(gpus_per_replica(trainer)),
        "--node-rank", node_rank,
        "--master-addr", master_addr,
        "--master-port", str(master_port),
        "--max-restarts", "0",
        "--module", module,
        *args,
    ]
