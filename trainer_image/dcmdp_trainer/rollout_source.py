"""Where a run's rollouts come from: the small interface :class:`~dcmdp_trainer.run_loop.RunLoop`
drives, with two implementations: ``LocalPools`` (``local.py``: one engine per pool in this
process) and ``Coordinator`` (``coordinator.py``: leases to remote rollout workers over gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from dcmdp.engine import Rollout, Sample
from dcmdp_trainer.session import StepPrompt


class Stopped(Exception):
    """The run was asked to stop (SIGTERM / Ctrl-C) before it finished."""


class RunFailed(RuntimeError):
    """The run cannot make progress (every submission rejected for one cause, or none accepted for
    ``rollout.stallTimeoutSeconds``): the message names the cause."""


@dataclass
class Batch:
    """A step's rollouts (every prompt's group, by prompt index then sample) and the source's
    figures for the step's metrics row (``time/sample_s`` and, remote, ``time/wait_s``,
    ``rollouts/dropped_stale``, ``leases/…``, ``throughput/tokens``: metrics.md)."""

    rollouts: list[Rollout]
    metrics: dict[str, float] = field(default_factory=dict)


class RolloutSource(Protocol):
    """What the run loop asks of a rollout source. Called from the loop's thread, in this order:
    ``start``; per step ``collect`` then ``published``; ``request_eval``/``eval_samples``/
    ``eval_greedy_samples`` around each evaluation; ``finish`` once every step is trained; ``close`` always."""

    def start(self) -> None:
        """The run begins at ``Session.step``: sampling may start."""

    def collect(self, step: int) -> Batch:
        """Every prompt's group of ``step`` (blocks until they are in). Raises :class:`Stopped`
        or :class:`RunFailed`."""

    def published(self) -> None:
        """The trainer's weights advanced to ``Session.version`` (a step was trained)."""

    def set_max_staleness(self, lag: int) -> None:
        """Adaptive staleness: rollouts of the steps sampled from now on may lag ``lag`` versions
        (a remote source bounds its leases by it; the in-process one samples at that lag)."""

    def request_eval(self, prompts: list[StepPrompt]) -> None:
        """An evaluation of the held-out ``prompts`` begins (a remote source hands it out now, so
        the workers sample while the trainer evaluates greedily)."""

    def eval_samples(self) -> dict[str, list[Sample]]:
        """Each pool's samples (one per held-out prompt) of the evaluation requested last, by pool
        in manifest order."""

    def eval_greedy_samples(self) -> dict[str, list[Sample]]:
        """The same evaluation decoded greedily (temperature 0) by each pool's engine as deployed:
        one sample per held-out prompt, by pool in manifest order."""

    def finish(self) -> None:
        """Every step is trained: no more work."""

    def close(self) -> None:
        """Release the source's resources (engines); called once, also after a failure."""
