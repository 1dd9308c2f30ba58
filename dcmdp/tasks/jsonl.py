"""A JSONL dataset task: one ``{"prompt": ..., "answer": ...}`` object per line, any verifier."""

from __future__ import annotations

import json
import random
from pathlib import Path

from dcmdp.tasks.base import Problem, Verifier


class JsonlTask:
    name = "jsonl"

    def __init__(self, path: str, verifier: Verifier, held_out_fraction: float = 0.1,
                 max_new_tokens: int = 32, held_out_size: int = 0, seed: int = 1234):
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"spec.task.dataset.path: no such file: {file}")
        problems: list[Problem] = []
        for lineno, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                problems.append(Problem(str(obj["prompt"]), str(obj["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"spec.task.dataset.path: {file}:{lineno}: each line must be a JSON object "
                    f"with 'prompt' and 'answer' ({type(exc).__name__}: {exc})"
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

    def reward(self, response: str, answer: str) -> float:
        return float(self._verifier(response, answer))
