"""Faults in a real rollout worker, injected from outside its code.

* :func:`sample_delay` ``(seconds)``: every ``generate`` of the worker's engine returns
  ``seconds`` later, so each lease is held that much longer (a slow worker).

In a test it is a context manager (in place before the worker builds its engine). As a process::

    python -m dcmdp_testing.worker_faults [--sample-delay S] -- WORKER_ARGS

runs ``python -m dcmdp_rollout WORKER_ARGS`` with the fault in place.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

from dcmdp_rollout import worker
from dcmdp_testing.faults import patched, run_module


@contextmanager
def sample_delay(seconds: float) -> Iterator[None]:
    real = worker.make_engine

    def make_engine(*args, **kwargs):
        engine = real(*args, **kwargs)
        generate = engine.generate

        def slow_generate(*gargs, **gkwargs):
            samples = generate(*gargs, **gkwargs)
            time.sleep(seconds)
            return samples

        engine.generate = slow_generate
        return engine

    with patched(worker, "make_engine", make_engine):
        yield


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dcmdp_testing.worker_faults",
                                 description="run dcmdp_rollout with faults in its worker")
    ap.add_argument("--sample-delay", type=float, default=0.0, metavar="S", help="seconds added to each generate")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the worker's arguments")
    ns = ap.parse_args(argv)
    with ExitStack() as faults:
        if ns.sample_delay:
            faults.enter_context(sample_delay(ns.sample_delay))
        run_module("dcmdp_rollout", ns.args)


if __name__ == "__main__":
    main()
