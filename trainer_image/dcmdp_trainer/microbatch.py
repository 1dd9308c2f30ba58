"""Micro-batches: rows of a left-padded batch grouped under a token budget, sorted by length.

A pass over ``rows`` (π_old, the reference, a sampled version, or one mini-batch's forward and
backward) runs as micro-batches whose padded size stays within ``spec.trainer.microBatchTokens``:

    cost(micro-batch) = |rows| · max_{i ∈ rows} len_i        (tokens, padding included)

Rows are sorted by length (longest first, ties in batch order) and packed greedily, so rows of
similar length share a micro-batch and padding stays small. Each micro-batch is trimmed to its own
longest row: the batch is left-padded, so its last ``max len_i`` columns hold every real token and
position ids stay those of the full batch. A single row longer than the budget runs alone (a
sequence is never split). Budget 0 = one micro-batch of all rows in their order (no trimming:
exactly the unbounded pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    rows: torch.Tensor  # [n] long: batch row indices
    width: int  # columns kept: the last ``width`` of the padded batch
    idle: bool = False  # a pass that only keeps a ZeRO-3 rank in step with the others (loss 0, not counted)

    @property
    def tokens(self) -> int:
        """Padded tokens of the micro-batch (its cost under the budget)."""
        return int(self.rows.numel()) * self.width


def plan(lengths: torch.Tensor, rows: torch.Tensor, budget: int, full_width: int) -> list[MicroBatch]:
    """Micro-batches of ``rows`` (indices into ``lengths``, [N] long of real tokens per row).

    Raises ValueError for a negative budget or an empty ``rows``.
    """
    if budget < 0:
        raise ValueError(f"microBatchTokens must be >= 0, got {budget}")
    if rows.numel() == 0:
        raise ValueError("no rows to plan")
    if budget == 0:
        return [MicroBatch(rows, full_width)]
    lens = lengths[rows]
    order = sorted(range(rows.numel()), key=lambda i: (-int(lens[i]), i))
    out: list[MicroBatch] = []
    current: list[int] = []
    width = 0
    for i in order:
        n = int(lens[i])
        w = max(width, n)
        if current and (len(current) + 1) * w > budget:
            out.append(MicroBatch(rows[torch.tensor(current)], width))
            current, w = [], n
        current.append(i)
        width = w
    out.append(MicroBatch(rows[torch.tensor(current)], width))
    return out
