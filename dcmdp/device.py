"""The torch device a component runs on, from a spec field ``auto | cpu | cuda``."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """A device the spec asks for is not present here."""


def resolve_device(name: str, field: str, local_rank: int = 0) -> torch.device:
    """``auto`` → cuda:<local_rank> when CUDA is present, else cpu; ``cuda`` → cuda:<local_rank>.

    Raises DeviceError naming ``field`` (e.g. ``spec.trainer.device``) when cuda is asked for and
    none is present, or ``local_rank`` has no GPU of its own.
    """
    # optional and heavy (the ml extra): the core imports without it
    if name == "cpu":
        return torch.device("cpu")
    present = torch.cuda.is_available()
    if name == "auto" and not present:
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise DeviceError(f"{field}: {name!r} is not one of auto, cpu, cuda")
    if not present:
        raise DeviceError(f"{field}: cuda was asked for, but torch sees no CUDA device here "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use {field}: cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"{field}: local rank {local_rank} needs a GPU of its own, but only {count} are visible")
    return torch.device("cuda", local_rank)
