"""Checkpoints: weights, optimiser, multipliers/controller state, step, RNG and weight history.

Written atomically (temporary file, then rename) as ``OUT/checkpoints/step-NNNNNNNN.pt``; the
newest ``keep`` are kept. Resuming from one continues the same λ sequence bit for bit, because
every random draw of a step is seeded from (seed, step) and the rest of the state is in the file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import torch


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save(out: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(state, step=step, rng={"torch": torch.get_rng_state(), "python": random.getstate()})
    path = folder / f"step-{step:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest(out: Path) -> Optional[Path]:
    found = sorted(checkpoint_dir(out).glob("step-*.pt"))
    return found[-1] if found else None


def load(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state
