"""What a verifiable task is: prompts with reference answers, and a reward for a response."""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from dcmdp.tasks import math_answer

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


# A decimal number as written in text: sign, thousands separators, decimals, exponent ("-1,234.5e3").
NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands commas dropped), or None when there is none."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(response: str, answer: str) -> float:
    """1.0 when the *last* number of the response equals the last number of the answer (|Δ| < 1e-9),
    so chain-of-thought answers ("… so 6 × 7 = 42") score on their final number."""
    got, want = last_number(response), last_number(answer)
    return 1.0 if got is not None and want is not None and abs(got - want) < 1e-9 else 0.0


def contains_match(response: str, answer: str) -> float:
    return 1.0 if answer.strip() and answer.strip() in response else 0.0


def math_match(response: str, answer: str) -> float:
    """The ``math`` verifier: :func:`dcmdp.tasks.math_answer.math_match`."""
    return math_answer.math_match(response, answer)


BUILTIN_VERIFIERS: dict[str, Verifier] = {
    "exact": exact_match, "numeric": numeric_match, "contains": contains_match, "math": math_match,
}


class RewardError(ValueError):
    """A verifier returned something that is not a finite number (NaN, inf, None, a string…)."""


def check_reward(value: Any, verifier: str, prompt: str) -> float:
    """``value`` as a float, or :class:`RewardError` naming the verifier and the prompt.

    Accepted: bool, int and float (and numpy scalars) that are finite. Anything else would train on
    a NaN loss or crash later with an unrelated message."""
    try:
        ok = not isinstance(value, (str, bytes)) and math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        short = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise RewardError(f"verifier {verifier!r} returned {value!r} (a finite number is required) "
                          f"for prompt {short!r}")
    return float(value)


def resolve_verifier(name: str) -> Verifier:
    """A built-in verifier by name, or a Python 'module:function' taking (response, answer).

    The contract of a user verifier: ``fn(response: str, answer: str) -> float``, where ``response``
    is the decoded response (EOS and special tokens stripped) and ``answer`` the dataset's reference;
    it returns a finite number (1.0 / 0.0 for right / wrong is usual) and is deterministic and
    thread-safe (the trainer may call it from several threads). The checks here (it imports, is a
    plain function, binds ``(response, answer)``) are about mistakes, not safety: the function runs
    with the trainer's rights (docs/kubernetes.md, security model)."""
    if name in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[name]
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"spec.task.dataset.verifier: cannot import {name!r}: {exc}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the module failed at import: a syntax error, a raise, an exit
        raise ValueError(f"spec.task.dataset.verifier: importing {module!r} failed: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not callable(fn):
        raise ValueError(f"spec.task.dataset.verifier: {name!r} is not callable")
    if inspect.isclass(fn) or inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn) \
            or inspect.isasyncgenfunction(fn):
        raise ValueError(f"spec.task.dataset.verifier: {name!r} must be a function returning a number, "
                         "not a class, a generator or a coroutine function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or extension callable: nothing to inspect
        return fn
    try:
        signature.bind("response", "answer")
    except TypeError:
        raise ValueError(f"spec.task.dataset.verifier: {name!r} must take (response, answer), "
                         f"its signature is {name.partition(':')[2]}{signature}") from None
    return fn
