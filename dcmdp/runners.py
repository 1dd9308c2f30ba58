"""The local runners, found by name through the ``dcmdp.runners`` entry points (``inprocess``:
trainer and engines in one process; ``processes``: trainer and rollout workers as processes talking
gRPC), and the CLI's tools of the trainer package (``dcmdp.tools``: ``export``), so the core never
imports the trainer or the rollout packages."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable


def installed() -> set[str]:
    """The names of the runners installed (``dcmdp[trainer,rollout]`` installs both)."""
    return {ep.name for ep in entry_points(group="dcmdp.runners")}


def runner(name: str) -> Callable[..., dict[str, Any]]:
    """The runner ``name``: ``fn(run, out_dir, *, steps=None, resume=False, on_step=None,
    on_eval=None, threads=0) -> summary``. Exits with a clear message when it is not installed."""
    found = {ep.name: ep for ep in entry_points(group="dcmdp.runners")}
    if name not in found:
        raise SystemExit(f"error: runner {name!r} is not installed (install dcmdp[trainer,rollout])")
    return found[name].load()


def tool(name: str) -> Callable[..., Any]:
    """The tool ``name`` of the ``dcmdp.tools`` entry points (``export``:
    :func:`dcmdp_trainer.export.export_run`). Exits with a clear message when it is not installed."""
    found = {ep.name: ep for ep in entry_points(group="dcmdp.tools")}
    if name not in found:
        raise SystemExit(f"error: {name!r} needs the trainer package (install dcmdp[trainer])")
    return found[name].load()
