"""argparse types shared by the command lines (``dcmdp run``, ``dcmdp sweep``).

A bad value makes argparse exit 2 naming the option: ``argument --threads: must be >= 0 (got -3)``.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

MAX_THREADS = 4096


def at_least(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """The argparse type of a whole number >= ``minimum`` (and <= ``maximum`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {value})")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum} (got {value})")
        return value

    parse.__name__ = f"whole number >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    return parse


def port(allow_off: bool = False) -> Callable[[str], int]:
    """The argparse type of a TCP port: 0 (any free port) to 65535, or -1 (off) with ``allow_off``."""
    return at_least(-1 if allow_off else 0, 65535)


def threads() -> Callable[[str], int]:
    """The argparse type of a torch thread count: 0 (the default) to 4096."""
    return at_least(0, MAX_THREADS)


def positive_seconds(text: str) -> float:
    """The argparse type of a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0 (got {text})")
    return value
