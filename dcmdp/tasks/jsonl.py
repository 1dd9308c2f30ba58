"""A JSONL dataset task: one ``{"prompt": ..., "answer": ...}`` object per line, any verifier."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from dcmdp.tasks.base import Problem, Verifier


class JsonlTask:
    name = "jsonl"

    def __init__(self, path: str, verifier: Verifier, held_out_fraction: float = 0.1,
                 max_new_tokens: int = 32, held_out_size: int = 0, seed: int = 1234):
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"spec.task.dataset.path: no such file: {file}")
        if not file.is_file():
            raise ValueError(f"spec.task.dataset.path: {file} is not a regular file")
        try:
            text = file.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark is accepted
        except UnicodeDecodeError as exc:
            line = file.read_bytes()[:exc.start].count(b"\n") + 1
            raise ValueError(f"spec.task.dataset.path: {file}:{line}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        problems: list[Problem] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                problems.append(_problem(json.loads(line)))
            except (ValueError, KeyError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                raise ValueError(
                    f"spec.task.dataset.path: {file}:{lineno}: each line must be a JSON object with a "
                    f"non-empty string 'prompt' and a string or number 'answer' ({type(exc).__name__}: "
                    f"{str(exc)[:200]})"
                ) from None
        if len(problems) < 2:
            raise ValueError(f"spec.task.dataset.path: {file} holds {len(problems)} problems; need >= 2")
        order = list(range(len(problems)))
        random.Random(seed).shuffle(order)
        n_held = max(1, int(round(len(problems) * held_out_fraction)))
        if held_out_size:
            n_held = min(n_held, held_out_size)
        self._held = [problems[i] for i in order[:n_held]]
        self._train = [problems[i] for i in order[n_held:]]
        self._verifier = verifier
        self.max_new_tokens = max_new_tokens

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return [rng.choice(self._train) for _ in range(n)]

    def held_out(self) -> list[Problem]:
        return list(self._held)

    def problems(self) -> list[Problem]:
        """Every problem, training ones first (for checks such as lengths)."""
        return self._train + self._held

    def drop(self, unwanted: Callable[[Problem], bool]) -> list[Problem]:
        """Remove the problems ``unwanted`` selects from both splits; returns them. ``ValueError``
        when either split would be left empty."""
        gone = [p for p in self.problems() if unwanted(p)]
        train = [p for p in self._train if not unwanted(p)]
        held = [p for p in self._held if not unwanted(p)]
        if not train or not held:
            raise ValueError(f"spec.task.dataset.path: {len(gone)} of {len(self.problems())} problems are "
                             f"too long; none would be left to {'train on' if not train else 'evaluate'}")
        self._train, self._held = train, held
        return gone

    def reward(self, response: str, answer: str) -> Any:
        """The verifier's value as returned (the trainer checks it is a finite number)."""
        return self._verifier(response, answer)


def _problem(obj: Any) -> Problem:
    """One dataset line as a problem. Raises TypeError/ValueError/KeyError when it is not an object
    with a non-empty string ``prompt`` and a string or number ``answer`` (a null would become the
    text "None" and be trained on)."""
    if not isinstance(obj, dict):
        raise TypeError(f"a {type(obj).__name__}, not an object")
    prompt, answer = obj["prompt"], obj["answer"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"'prompt' is {prompt!r:.40}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"'answer' is {answer!r:.40}")
    return Problem(prompt, str(answer))
