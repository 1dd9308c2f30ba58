"""What the trainer accepts from a rollout engine: a plausibility check of sampled responses.

A submission is rejected, with the reason, when any response

* is empty (it would count as zero tokens in δ̄ and lower λ without evidence);
* has a token id outside ``0 .. vocab_size - 1``, where ``vocab_size`` is the rows of the model's
  embedding (not ``len(tokenizer)``: real checkpoints pad the embedding);
* is longer than the lease's ``max_new_tokens``, or has a logprob count different from its tokens;
* has a logprob that is not finite, is > 0 (a probability above 1), or is below
  :data:`LOGPROB_FLOOR`. A token sampled at log p < −50 (p < 2e-22) is not a real draw: it is a
  sentinel standing for −inf (−9999) or a broken engine, and exp(log π − log p_inf) of it would
  overflow the importance weights;

or when the submission's timing fields (``sampling_s``, ``tokens``) are not finite or negative.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

LOGPROB_FLOOR = -50.0


class Problem(NamedTuple):
    """Why a submission is implausible: ``cause`` is a fixed key (for counting and for telling one
    failure mode from another), ``detail`` the human-readable line with the offending value."""

    cause: str
    detail: str

    def __str__(self) -> str:
        return self.detail


def check_response(response_ids: Sequence[int], logprobs: Sequence[float], *, vocab_size: int,
                   max_new_tokens: int) -> Optional[Problem]:
    """None when the response is plausible, else its :class:`Problem`."""
    if not response_ids:
        return Problem("empty_response", "empty response (no tokens)")
    if len(logprobs) != len(response_ids):
        return Problem("logprob_count", f"{len(logprobs)} logprobs for {len(response_ids)} tokens")
    if len(response_ids) > max_new_tokens:
        return Problem("too_long", f"{len(response_ids)} tokens > max_new_tokens {max_new_tokens}")
    bad_id = next((t for t in response_ids if not 0 <= t < vocab_size), None)
    if bad_id is not None:
        return Problem("token_id", f"token id {bad_id} outside the model's vocabulary (0..{vocab_size - 1})")
    for lp in logprobs:
        if not math.isfinite(lp):
            return Problem("logprob_not_finite", f"logprob {lp} is not finite")
        if lp > 0:
            return Problem("logprob_positive", f"logprob {lp} > 0 (a probability above 1)")
        if lp < LOGPROB_FLOOR:
            return Problem("logprob_floor", f"logprob {lp} below the floor {LOGPROB_FLOOR} "
                                            "(a sentinel for -inf, or a broken engine)")
    return None


def check_timing(sampling_s: float, tokens: float) -> Optional[Problem]:
    """None when the submission's timing fields are finite and >= 0, else the :class:`Problem`."""
    for name, value in (("sampling_seconds", sampling_s), ("generated_tokens", tokens)):
        if not math.isfinite(value) or value < 0:
            return Problem("timing", f"{name} {value} is not a finite number >= 0")
    return None
