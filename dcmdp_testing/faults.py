"""What the fault wrappers share: a fault that strikes a set number of times, a patch that undoes
itself, and running a real entry point after the faults are in.

Faults are injected from outside the production code: each wrapper (``trainer_faults``,
``worker_faults``) replaces one real function of the trainer or the worker with one that calls it
and then damages, breaks or delays what it did. The production packages carry no test hook.
"""

from __future__ import annotations

import runpy
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence


class Fault:
    """Strikes the first ``times`` times it is asked (:meth:`strike`), then never; ``struck`` counts."""

    def __init__(self, times: int):
        if times < 0:
            raise ValueError(f"times must be >= 0 (got {times})")
        self.times = times
        self.struck = 0
        self._lock = threading.Lock()

    def strike(self) -> bool:
        with self._lock:
            if self.struck < self.times:
                self.struck += 1
                return True
            return False


@contextmanager
def patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """``owner.name`` is ``replacement`` inside the block, the original again after it."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_module(module: str, args: Sequence[str]) -> None:
    """Run ``python -m module args`` in this process (the faults already installed): its
    ``sys.exit`` ends the process as it would have."""
    args = list(args)
    if args[:1] == ["--"]:
        args = args[1:]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
