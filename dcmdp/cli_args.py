"""argparse types shared by the command lines (``dcmdp run``, ``dcmdp sweep``).

A bad value makes argparse exit 2 naming the option: ``argument --threads: must be >= 0 (got -3)``.
"""

from __future__ import annotations

import argparse
from typing import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """The argparse type of a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {value})")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse
