"""Keeping weight streams and long polls from starving the trainer's other RPCs.

The gRPC server runs every call on one thread pool. A weight stream holds its thread while its
reader reads (a reader that never reads holds it until gRPC's flow control gives up, i.e. never),
and a long-polling ``AcquireLease`` holds its thread up to the poll time. So each kind gets a
fixed share of the pool (:class:`Slots`, never waited for: a call over the share is answered at
once) and a stream that hands no chunk to gRPC for ``stall_s`` seconds is cancelled
(:class:`StallWatchdog`), which frees its thread and its one bucket buffer. What is left of the
pool always serves ``GetStatus``, ``Register``, ``SubmitRollouts`` and short lease calls.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable


class Slots:
    """A counter of ``limit`` slots taken without waiting: ``take()`` is False when all are in use."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.used -= 1


class StallWatchdog:
    """Cancels a stream that made no progress for ``stall_s`` seconds (checked every ``tick_s``)."""

    def __init__(self, stall_s: float, tick_s: float = 0.5, on_stall: Callable[[str], None] = lambda what: None):
        self.stall_s, self.tick_s = stall_s, tick_s
        self.on_stall = on_stall
        self._streams: dict[int, tuple[str, Callable[[], None], float]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.cancelled = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="stall-watchdog", daemon=True).start()

    def watch(self, what: str, cancel: Callable[[], None]) -> int:
        key = next(self._ids)
        with self._lock:
            self._streams[key] = (what, cancel, time.monotonic())
        return key

    def progress(self, key: int) -> None:
        with self._lock:
            if key in self._streams:
                what, cancel, _ = self._streams[key]
                self._streams[key] = (what, cancel, time.monotonic())

    def done(self, key: int) -> None:
        with self._lock:
            self._streams.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            with self._lock:
                stalled = [(k, v) for k, v in self._streams.items() if now - v[2] > self.stall_s]
                for k, _ in stalled:
                    del self._streams[k]
            for _, (what, cancel, _) in stalled:
                self.cancelled += 1
                self.on_stall(what)
                cancel()

    def close(self) -> None:
        self._stop.set()
