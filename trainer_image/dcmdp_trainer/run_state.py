"""What the run loop knows of its run, for the status: written by :class:`~dcmdp_trainer.run_loop.RunLoop`,
read (as a consistent copy) by the status snapshot from the gRPC threads."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RunState:
    """The run's progress. ``step`` counts the steps whose metrics row every sink (metrics.jsonl,
    Prometheus) holds: what ``GetStatus`` reports (``Session.step`` runs ahead of it while a
    trained step is published and logged). A figure not known yet is None (``eval_accuracy``
    before the first evaluation)."""

    total_steps: int
    step: int = 0
    checkpoint_step: int = 0
    phase: str = "Initializing"  # Initializing | Running | Succeeded | Failed
    message: str = ""
    finished: bool = False
    eval_accuracy: Optional[float] = None
    last_row: dict[str, Any] = field(default_factory=dict)  # the last recorded step's metrics row
    lag_by_pool: dict[str, float] = field(default_factory=dict)  # mean version lag of the last step's rollouts
    updated: float = field(default_factory=time.time)  # wall clock (s) of the last change
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def update(self, **values: Any) -> None:
        """Set fields (names of this class) at once and stamp ``updated``; AttributeError for an
        unknown name."""
        with self.lock:
            for name, value in values.items():
                if name not in self.__dataclass_fields__ or name == "lock":
                    raise AttributeError(f"RunState has no field {name!r}")
                setattr(self, name, value)
            self.updated = time.time()

    def copy(self) -> "RunState":
        """A consistent copy (its own lock, its own row and lag dicts)."""
        with self.lock:
            return dataclasses.replace(self, last_row=dict(self.last_row), lag_by_pool=dict(self.lag_by_pool),
                                       lock=threading.Lock())
