"""A stand-in process group for tests of who runs a group's teardown."""

from __future__ import annotations

import threading
import time


class SlowToDestroy:
    """A stand-in group whose abort returns at once and whose destructor blocks: a gloo group with
    an operation waiting on a dead peer (its destructor waits for that operation's timeout)."""

    destroyed_in: list[str] = []

    def abort(self) -> None:
        pass

    def __del__(self) -> None:
        SlowToDestroy.destroyed_in.append(threading.current_thread().name)
        time.sleep(1.0)
