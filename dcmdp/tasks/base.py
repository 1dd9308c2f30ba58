"""What a verifiable task is: prompts with reference answers, and a reward for a response."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

Verifier = Callable[[str, str], float]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


class Task(Protocol):
    name: str
    max_new_tokens: int

    def sample(self, rng, n: int) -> list[Problem]:
        """``n`` training problems drawn with the given ``random.Random``."""

    def held_out(self) -> list[Problem]:
        """A fixed evaluation set, disjoint from what ``sample`` can draw."""

    def reward(self, response: str, answer: str) -> float:
        """Verifiable reward of a decoded response (EOS and padding stripped)."""


def exact_match(response: str, answer: str) -> float:
    return 1.0 if response.strip() == answer.strip() else 0.0


def numeric_match(response: str, answer: str) -> float:
    try:
        return 1.0 if abs(float(response.strip()) - float(answer.strip())) < 1e-9 else 0.0
    except ValueError:
        return 0.0


def contains_match(response: str, answer: str) -> float:
    return 1.0 if answer.strip() and answer.strip() in response else 0.0


BUILTIN_VERIFIERS: dict[str, Verifier] = {
    "exact": exact_match, "numeric": numeric_match, "contains": contains_match,
}


def resolve_verifier(name: str) -> Verifier:
    """A built-in verifier by name, or a Python 'module:function' taking (response, answer)."""
    if name in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[name]
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"spec.task.dataset.verifier: cannot import {name!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"spec.task.dataset.verifier: {name!r} is not callable")
    return fn
