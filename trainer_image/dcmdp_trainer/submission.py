"""Submission validation: whether a batch of samples may be trained on.

A remote worker's submission for a work item is *malformed* (rejected, its item leased again) when
it names another pool than the lease's, a weight version never published (< 0 or > the newest),
a response that fails :func:`dcmdp.sample_check.check_response` (empty, wrong logprob count, a
token id outside the vocabulary, an implausible log-probability, too long), a count other than
``n`` samples for each of the item's prompts (or samples for other prompts), or non-finite timing
fields (:func:`dcmdp.sample_check.check_timing`). An in-process engine has no one to retry: an
implausible sample stops the run (:func:`require_plausible`). Either way nothing implausible is
ever trained on.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from dcmdp.engine import Sample
from dcmdp.sample_check import Problem, check_response, check_timing
from dcmdp_trainer.leases import WorkItem

# prompt indices a rejection message lists at most
LISTED_PROMPTS = 8


def listed(indices: Iterable[int]) -> str:
    """``[0, 1, ...]`` sorted, with at most :data:`LISTED_PROMPTS` entries and the count of the rest."""
    indices = sorted(indices)
    head = ", ".join(str(i) for i in indices[:LISTED_PROMPTS])
    more = len(indices) - LISTED_PROMPTS
    return f"[{head}{f', ... ({more} more)' if more > 0 else ''}] ({len(indices)} prompts)"


def check_submission(item: WorkItem, pool: str, version: int, newest: int, samples: Sequence[Sample], *,
                     vocab_size: int, sampling_s: float, tokens: float) -> Optional[Problem]:
    """None when ``samples`` (submitted by a worker of ``pool``, sampled with weight ``version``;
    the newest published version is ``newest``) complete ``item``, else the first :class:`Problem`
    found: cause ``malformed`` for a wrong pool, version or count, the cause of
    :func:`check_response` (detail prefixed with the prompt index) for an implausible response,
    ``timing`` for a non-finite or negative ``sampling_s`` (seconds) or ``tokens``."""
    if pool != item.pool:
        return Problem("malformed", f"lease belongs to pool {item.pool!r}, submitted as {pool!r}")
    if version < 0 or version > newest:
        return Problem("malformed", f"weight version {version} was never published (newest {newest})")
    counts: dict[int, int] = {}
    for s in samples:
        counts[s.prompt_index] = counts.get(s.prompt_index, 0) + 1
        problem = check_response(s.response_ids, s.logprobs, vocab_size=vocab_size,
                                 max_new_tokens=item.max_new_tokens)
        if problem:
            return Problem(problem.cause, f"prompt {s.prompt_index}: {problem.detail}")
    want = {i: item.n for i in item.indices}
    if counts != want:
        wrong = sorted(i for i in want.keys() | counts.keys() if counts.get(i, 0) != want.get(i, 0))
        return Problem("malformed", f"expected {item.n} samples for each of the lease's {len(want)} prompts; wrong "
                                    f"count for prompts {listed(wrong)}, e.g. prompt {wrong[0]}: "
                                    f"{counts.get(wrong[0], 0)}")
    return check_timing(sampling_s, tokens)


def require_plausible(samples: list[Sample], pool: str, *, vocab_size: int, max_new_tokens: int) -> list[Sample]:
    """``samples`` unchanged, or ``RuntimeError`` naming ``pool`` and the first implausible one."""
    for s in samples:
        problem = check_response(s.response_ids, s.logprobs, vocab_size=vocab_size, max_new_tokens=max_new_tokens)
        if problem:
            raise RuntimeError(f"rollout pool {pool!r}: implausible sample for prompt {s.prompt_index} "
                               f"({problem.cause}): {problem.detail}")
    return samples
