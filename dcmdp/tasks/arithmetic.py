"""Built-in arithmetic tasks with exact-match reward: addition, comparison, sorting.

The held-out set is a fixed, seeded sample; training draws skip held-out prompts, so evaluation
measures generalisation rather than memorisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dcmdp.tasks.base import Problem, exact_match


@dataclass
class _Generated:
    name: str
    held_out_size: int = 256
    max_new_tokens: int = 0  # 0 = the task's own need (answer length + EOS)
    seed: int = 1234
    _held: list[Problem] = field(default_factory=list, init=False, repr=False)
    _held_prompts: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.max_new_tokens = self.max_new_tokens or self._answer_tokens() + 1
        rng = random.Random(self.seed)
        seen: dict[str, Problem] = {}
        tries = 0
        while len(seen) < self.held_out_size and tries < 100 * self.held_out_size:
            p = self._make(rng)
            seen.setdefault(p.prompt, p)
            tries += 1
        self._held = list(seen.values())
        self._held_prompts = set(seen)

    def _make(self, rng: random.Random) -> Problem:  # pragma: no cover - abstract
        raise NotImplementedError

    def _answer_tokens(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            p = self._make(rng)
            if p.prompt not in self._held_prompts:
                out.append(p)
        return out

    def held_out(self) -> list[Problem]:
        return list(self._held)

    def reward(self, response: str, answer: str) -> float:
        return exact_match(response, answer)


@dataclass
class Addition(_Generated):
    """``07+45=`` → ``052``: zero-padded, fixed-width operands and sum (digits align, so it learns)."""

    digits: int = 2
    name: str = "addition"

    def _answer_tokens(self) -> int:
        return self.digits + 1  # the sum may carry one digit

    def _make(self, rng: random.Random) -> Problem:
        hi = 10**self.digits - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        d = self.digits
        return Problem(f"{a:0{d}d}+{b:0{d}d}=", f"{a + b:0{d + 1}d}")


@dataclass
class Comparison(_Generated):
    """``07?45=`` → ``<``, ``>`` or ``=`` (zero-padded operands)."""

    digits: int = 2
    name: str = "comparison"

    def _answer_tokens(self) -> int:
        return 1

    def _make(self, rng: random.Random) -> Problem:
        hi = 10**self.digits - 1
        a = rng.randint(0, hi)
        b = a if rng.random() < 0.1 else rng.randint(0, hi)
        d = self.digits
        return Problem(f"{a:0{d}d}?{b:0{d}d}=", "<" if a < b else ">" if a > b else "=")


@dataclass
class Sorting(_Generated):
    """``3142:`` → ``1234``: sort ``items`` digits."""

    items: int = 4
    name: str = "sorting"

    def _answer_tokens(self) -> int:
        return self.items

    def _make(self, rng: random.Random) -> Problem:
        xs = [rng.randint(0, 9) for _ in range(self.items)]
        return Problem("".join(map(str, xs)) + ":", "".join(map(str, sorted(xs))))
