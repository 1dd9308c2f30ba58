"""Built-in verifiable tasks and JSONL datasets, built from ``spec.task``."""

from __future__ import annotations

from dcmdp.spec import TaskSpec
from dcmdp.tasks.arithmetic import Addition, Comparison, Sorting
from dcmdp.tasks.base import Problem, Task, resolve_verifier
from dcmdp.tasks.jsonl import JsonlTask

__all__ = ["Problem", "Task", "build_task"]


def build_task(spec: TaskSpec) -> Task:
    common = dict(held_out_size=spec.held_out, max_new_tokens=spec.max_new_tokens)
    if spec.name == "addition":
        return Addition(digits=spec.digits, **common)
    if spec.name == "comparison":
        return Comparison(digits=spec.digits, **common)
    if spec.name == "sorting":
        return Sorting(items=spec.items, **common)
    assert spec.dataset is not None  # enforced by the spec model
    return JsonlTask(spec.dataset.path, resolve_verifier(spec.dataset.verifier),
                     spec.dataset.held_out_fraction, max_new_tokens=spec.max_new_tokens or 32,
                     held_out_size=spec.held_out)
