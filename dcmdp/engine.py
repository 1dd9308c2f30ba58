"""The rollout-engine contract shared by the trainer, the workers and the local runner.

An engine samples responses with the per-token log-probability of each sampled token *as the
engine computed it* (``log p_inf``). It is built from a local Hugging Face model folder (config,
tokenizer, initial weights) and then takes weight updates as a state dict keyed like the
trainer's ``model.state_dict()``.

Engines live outside the core (``dcmdp_rollout.engines``) and are found by name through the
``dcmdp.engines`` entry-point group, so the core and the trainer never import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is only needed by whoever calls load_weights
    import torch


@dataclass
class Sample:
    """One sampled response to one prompt."""

    prompt_index: int
    response_ids: list[int]
    logprobs: list[float]  # log p_inf(y_t), one per response token
    finish_reason: str = "stop"  # "stop" (EOS sampled) | "length"


@dataclass
class Rollout:
    """A sample as the trainer sees it: with its prompt, reward, origin and weight version."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    reward: float
    pool: str
    version: int
    worker_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingParams:
    n: int  # samples per prompt (the GRPO group size)
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    seed: int = 0


@runtime_checkable
class RolloutEngine(Protocol):
    """What a rollout worker needs from an inference engine."""

    name: str
    precision: str

    def load_weights(self, state_dict: Mapping[str, "torch.Tensor"], version: int) -> None:
        """Replace the weights (cast to the engine's precision) and remember ``version``."""

    def generate(self, prompts: list[list[int]], indices: list[int], params: SamplingParams) -> list[Sample]:
        """``params.n`` samples per prompt, grouped by prompt in input order."""

    def close(self) -> None:
        """Release processes and memory."""


class EngineError(RuntimeError):
    """The engine cannot run as asked (e.g. fp8 on a CPU): the message says why."""


def engine_class(name: str) -> type:
    """The engine class registered under ``name`` in the ``dcmdp.engines`` entry points."""
    found = {ep.name: ep for ep in entry_points(group="dcmdp.engines")}
    if name not in found:
        raise EngineError(
            f"unknown rollout engine {name!r} (installed: {', '.join(sorted(found)) or 'none'}); "
            "install the rollout extra: pip install 'dcmdp[rollout]'"
        )
    return found[name].load()


def make_engine(name: str, model_dir: str, precision: str, *, noise: float = 0.0,
                seed: int = 0, options: Optional[dict[str, Any]] = None) -> RolloutEngine:
    """Build the named engine from a local model folder."""
    cls = engine_class(name)
    return cls(model_dir, precision=precision, noise=noise, seed=seed, **(options or {}))
