"""The weight server's stream slots and stall watchdog."""

from __future__ import annotations

import time

from dcmdp_trainer.stream_guard import Slots, StallWatchdog


def test_slots_are_taken_without_waiting():
    s = Slots(2)
    assert s.take() and s.take() and not s.take()
    s.give()
    assert s.take() and s.used == 2


def test_the_watchdog_cancels_a_stream_without_progress():
    cancelled = []
    dog = StallWatchdog(0.3, tick_s=0.05)
    slow = dog.watch("slow", lambda: cancelled.append("slow"))
    busy = dog.watch("busy", lambda: cancelled.append("busy"))
    for _ in range(10):
        time.sleep(0.1)
        dog.progress(busy)
    dog.done(busy)
    dog.close()
    assert cancelled == ["slow"] and dog.cancelled == 1
    dog.done(slow)
