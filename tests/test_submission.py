"""Submission validation: what makes a worker's samples malformed, and the in-process check."""

import math

import pytest

from dcmdp.engine import Sample
from dcmdp_trainer.leases import WorkItem
from dcmdp_trainer.submission import check_submission, listed, require_plausible


class P:
    def __init__(self, index):
        self.index, self.ids = index, [1, 2]


ITEM = WorkItem("s0/bf16/0", "bf16", 0, [P(4), P(5)], seed=1, n=2, max_new_tokens=4)


def good():
    return [Sample(i, [7, 8], [-0.5, -1.5]) for i in (4, 5) for _ in range(2)]


def check(samples, pool="bf16", version=1, newest=2, sampling_s=0.5, tokens=8.0):
    return check_submission(ITEM, pool, version, newest, samples, vocab_size=16, sampling_s=sampling_s, tokens=tokens)


def test_a_complete_plausible_submission_passes():
    assert check(good()) is None


def test_wrong_pool_and_unpublished_versions_are_malformed():
    assert check(good(), pool="int8") == ("malformed", "lease belongs to pool 'bf16', submitted as 'int8'")
    assert check(good(), version=3) == ("malformed", "weight version 3 was never published (newest 2)")
    assert check(good(), version=-1) == ("malformed", "weight version -1 was never published (newest 2)")


def test_counts_must_be_n_per_prompt_of_the_item():
    samples = good()[:3] + [Sample(9, [7], [-1.0])]
    assert check(samples) == ("malformed", "expected 2 samples for each of the lease's 2 prompts; wrong count for "
                                           "prompts [5, 9] (2 prompts), e.g. prompt 5: 1")


def test_an_implausible_response_names_its_cause_and_prompt():
    samples = good()
    samples[2] = Sample(5, [7, 99], [-0.5, -1.0])  # id 99 outside a vocabulary of 16
    assert check(samples) == ("token_id", "prompt 5: token id 99 outside the model's vocabulary (0..15)")
    samples[2] = Sample(5, [], [])
    assert check(samples) == ("empty_response", "prompt 5: empty response (no tokens)")


def test_timing_fields_must_be_finite_and_non_negative():
    assert check(good(), sampling_s=math.nan) == ("timing", "sampling_seconds nan is not a finite number >= 0")
    assert check(good(), tokens=-1.0) == ("timing", "generated_tokens -1.0 is not a finite number >= 0")


def test_listed_caps_the_prompt_indices():
    assert listed([3, 1, 2]) == "[1, 2, 3] (3 prompts)"
    assert listed(range(10)) == "[0, 1, 2, 3, 4, 5, 6, 7, ... (2 more)] (10 prompts)"


def test_require_plausible_stops_the_in_process_run_naming_the_pool():
    samples = good()
    assert require_plausible(samples, "bf16", vocab_size=16, max_new_tokens=4) is samples
    with pytest.raises(RuntimeError, match=r"rollout pool 'int8': implausible sample for prompt 4 \(empty_response\)"):
        require_plausible([Sample(4, [], [])], "int8", vocab_size=16, max_new_tokens=4)
