"""Checkpoints: weights, optimiser, multipliers/controller state, step, RNG and weight history.

Each checkpoint is two files in ``OUT/checkpoints``: ``step-NNNNNNNN.pt`` (``torch.save`` of the
state) and ``step-NNNNNNNN.json``, its record ``{"step", "file", "bytes", "sha256"}``. Both are
written to temporary names, flushed with ``fsync``, renamed into place (the data first, the record
second), and the folder is ``fsync``-ed, so a crash at any point leaves either a complete pair or a
checkpoint without its record, which counts as broken. The newest ``keep`` are kept.

Loading verifies the record (size, sha256) and then unpickles with ``weights_only=True`` (tensors,
containers and numbers only: a checkpoint file cannot run code). :func:`load_latest` tries the
checkpoints newest first and falls back to the newest intact one, logging a warning that names each
broken one and why; when none is intact it raises :class:`CheckpointError` listing them all.

Resuming from one continues the same λ sequence bit for bit, because every random draw of a step
is seeded from (seed, step) and the rest of the state is in the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("dcmdp.trainer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (missing record, wrong size or sha256, unreadable), or
    no intact checkpoint at all; the message names the file(s) and the cause."""


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def record_path(path: Path) -> Path:
    """``step-NNNNNNNN.pt`` → ``step-NNNNNNNN.json`` (its size and sha256)."""
    return path.with_suffix(".json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` (data, then its record; each fsync-ed, renamed into place)
    and delete all but the newest ``keep``. Returns the ``.pt`` path. Raises OSError as the file
    system does (full disk, read-only folder)."""
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(state, step=step, rng={"torch": torch.get_rng_state(), "python": random.getstate()})
    path = folder / f"step-{step:08d}.pt"
    record = record_path(path)
    tmp, tmp_record = path.with_suffix(".pt.tmp"), record.with_suffix(".json.tmp")
    torch.save(state, tmp)
    _fsync_file(tmp)
    meta = {"step": step, "file": path.name, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    with tmp_record.open("w") as fh:
        json.dump(meta, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    os.replace(tmp_record, record)
    _fsync_dir(folder)
    for old in candidates(out)[keep:]:
        old.unlink(missing_ok=True)
        record_path(old).unlink(missing_ok=True)
    for stray in folder.glob("step-*.tmp"):  # left by a process killed mid-write
        stray.unlink(missing_ok=True)
    return path


def candidates(out: Path) -> list[Path]:
    """Every checkpoint file in ``out``, newest first (intact or not)."""
    return sorted(checkpoint_dir(out).glob("step-*.pt"), reverse=True)


def latest(out: Path) -> Optional[Path]:
    """The newest checkpoint file (not verified; :func:`load_latest` verifies), or None."""
    found = candidates(out)
    return found[0] if found else None


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` matches its record (size and sha256)."""
    record = record_path(path)
    try:
        meta = json.loads(record.read_text())
        expected_bytes, expected_sha = int(meta["bytes"]), str(meta["sha256"])
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: no record {record.name} (written incompletely)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path.name}: unreadable record {record.name} ({exc})") from None
    size = path.stat().st_size
    if size != expected_bytes:
        raise CheckpointError(f"{path.name}: {size} bytes, its record says {expected_bytes} (truncated?)")
    if sha256_file(path) != expected_sha:
        raise CheckpointError(f"{path.name}: sha256 differs from its record (corrupted)")


def read(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """The verified state of one checkpoint (tensors, containers and numbers only); does not
    touch the RNGs. ``mmap``: tensors stay in the file, read when used (an exporter that needs the
    weights only never reads the optimizer state into memory). Raises :class:`CheckpointError`."""
    verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # pickle/zip errors of every kind: the file is not a usable checkpoint
        raise CheckpointError(f"{path.name}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not {"step", "rng", "learner"} <= state.keys():
        raise CheckpointError(f"{path.name}: not a dcmdp checkpoint (keys step, rng, learner missing)")
    for name, t in state["learner"].get("model", {}).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path.name}: non-finite values in weight {name}")
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])


def load(path: Path) -> dict[str, Any]:
    """:func:`read` one checkpoint and restore the RNG states it holds."""
    state = read(path)
    restore_rng(state)
    return state


def load_latest(out: Path, *, restore: bool = True, mmap: bool = False) -> tuple[Path, dict[str, Any]]:
    """The newest intact checkpoint and its state (RNGs restored unless ``restore`` is False;
    ``mmap`` as in :func:`read`). Each broken newer one is skipped with a warning naming it and the
    cause. Raises FileNotFoundError when there is no checkpoint, :class:`CheckpointError` (listing
    every one) when none is intact."""
    found = candidates(out)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(out)}")
    broken = []
    for path in found:
        try:
            state = read(path, mmap=mmap)
            if restore:
                restore_rng(state)
        except CheckpointError as exc:
            broken.append(str(exc))
            log.warning("broken checkpoint skipped", extra={"fields": {"checkpoint": str(path), "cause": str(exc)}})
            continue
        return path, state
    raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(out)}: " + "; ".join(broken))
