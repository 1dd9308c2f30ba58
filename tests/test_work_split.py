"""Work splitting: a step's prompts shared between the pools by replicas, shares cut into work items."""

import pytest

from dcmdp_trainer.work_split import split_prompts, work_items


def test_shares_are_contiguous_and_proportional_to_replicas():
    prompts = list(range(10))
    assert split_prompts(prompts, {"bf16": 2, "int8": 1, "fp8": 2}) == {
        "bf16": [0, 1, 2, 3], "int8": [4, 5], "fp8": [6, 7, 8, 9]}  # round(10·2/5)=4, round(10/5)=2, the rest
    assert split_prompts(prompts, {"a": 1}) == {"a": prompts}


def test_the_last_pool_takes_what_rounding_left_and_empty_shares_are_dropped():
    assert split_prompts(list(range(7)), {"a": 1, "b": 1}) == {"a": [0, 1, 2, 3], "b": [4, 5, 6]}  # round(3.5)=4
    # a pool with no replicas gets nothing; a share that rounds to nothing is left out
    assert split_prompts([0, 1], {"a": 0, "b": 5, "c": 1}) == {"b": [0, 1]}
    assert split_prompts([0, 1, 2], {"a": 0}) == {}


class P:
    def __init__(self, index):
        self.index, self.ids = index, [index]


def test_work_items_cut_each_share_into_batches_with_their_own_seed():
    shares = {"bf16": [P(i) for i in range(5)], "int8": [P(5), P(6)]}
    items = work_items(3, shares, 2, seed=lambda step, pool, chunk: 1000 * step + 10 * len(pool) + chunk,
                       n=4, max_new_tokens=16)
    assert [(i.key, i.pool, i.step, i.indices, i.seed) for i in items] == [
        ("s3/bf16/0", "bf16", 3, [0, 1], 3040), ("s3/bf16/1", "bf16", 3, [2, 3], 3041),
        ("s3/bf16/2", "bf16", 3, [4], 3042), ("s3/int8/0", "int8", 3, [5, 6], 3040)]
    assert all(i.n == 4 and i.max_new_tokens == 16 and not i.is_eval and i.version is None for i in items)


def test_work_items_refuse_an_empty_batch():
    with pytest.raises(ValueError, match="batch must be >= 1"):
        work_items(0, {"a": [P(0)]}, 0, seed=lambda *a: 0, n=1, max_new_tokens=1)
