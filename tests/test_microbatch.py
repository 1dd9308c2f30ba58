"""Micro-batch planning under a token budget: sorted by length, greedy, trimmed to the longest row."""

import pytest
import torch

from dcmdp_trainer.microbatch import MicroBatch, plan


def rows_of(mbs: list[MicroBatch]) -> list[tuple[list[int], int]]:
    return [(mb.rows.tolist(), mb.width) for mb in mbs]


def test_budget_zero_is_one_untrimmed_micro_batch_in_order():
    lengths = torch.tensor([3, 9, 5])
    assert rows_of(plan(lengths, torch.arange(3), 0, 12)) == [([0, 1, 2], 12)]


def test_rows_sorted_by_length_and_packed_under_the_budget():
    lengths = torch.tensor([3, 9, 5, 9, 4, 2])
    mbs = plan(lengths, torch.arange(6), 18, 10)
    # longest first, ties in batch order: 9,9 (2·9 = 18) | 5,4,3 (3·5 = 15; a 4th row: 4·5 = 20) | 2
    assert rows_of(mbs) == [([1, 3], 9), ([2, 4, 0], 5), ([5], 2)]
    assert all(mb.tokens <= 18 for mb in mbs)


def test_a_row_longer_than_the_budget_runs_alone():
    lengths = torch.tensor([4, 30, 4])
    assert rows_of(plan(lengths, torch.tensor([0, 1, 2]), 10, 30)) == [([1], 30), ([0, 2], 4)]


def test_plans_a_subset_of_rows_by_their_batch_indices():
    lengths = torch.tensor([7, 1, 6, 2])
    assert rows_of(plan(lengths, torch.tensor([2, 3]), 100, 7)) == [([2, 3], 6)]


def test_bad_budget_and_empty_rows_are_errors():
    with pytest.raises(ValueError, match="microBatchTokens"):
        plan(torch.tensor([1]), torch.arange(1), -1, 1)
    with pytest.raises(ValueError, match="no rows"):
        plan(torch.tensor([1]), torch.arange(0), 4, 1)
