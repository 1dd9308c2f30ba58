"""Work splitting: a step's prompts shared between the rollout pools, and a pool's share cut into
work items.

A step's ``promptsPerStep`` prompts go to the pools with replicas in proportion to their replicas,
as contiguous shares in the manifest's pool order: pool i of k gets ``round(P · r_i / Σr)`` prompts,
the last one what is left (so the shares always add up to P). A pool's share is then cut into
work items of ``batch`` prompts (``rollout.batchPrompts``, default ``miniBatchSize``), each with its
own sampling seed ``Session.sampling_seed(step, pool, chunk)``: the unit a remote worker leases.
The in-process source samples a pool's whole share at once.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from dcmdp_trainer.leases import WorkItem

P = TypeVar("P")


def split_prompts(prompts: Sequence[P], weights: dict[str, int]) -> dict[str, list[P]]:
    """Contiguous shares of ``prompts``, proportional to ``weights`` (pool → replicas).

    Pools of weight ≤ 0 and pools whose share rounds to nothing are left out; the shares keep the
    order of ``prompts`` and of ``weights`` and together hold every prompt once (when any weight
    is > 0; with none, the result is empty)."""
    active = {k: w for k, w in weights.items() if w > 0}
    total = sum(active.values())
    out, start, names = {}, 0, list(active)
    for i, name in enumerate(names):
        share = len(prompts) - start if i == len(names) - 1 else round(len(prompts) * active[name] / total)
        out[name] = list(prompts[start:start + share])
        start += share
    return {k: v for k, v in out.items() if v}


def work_items(step: int, shares: dict[str, list], batch: int, *, seed: Callable[[int, str, int], int],
               n: int, max_new_tokens: int) -> list[WorkItem]:
    """The work items of ``step``: each pool's share in chunks of ``batch`` prompts (the last one
    may be shorter), keyed ``s{step}/{pool}/{chunk}``, sampled with ``seed(step, pool, chunk)``,
    ``n`` samples per prompt of at most ``max_new_tokens`` tokens. Raises ValueError when
    ``batch`` < 1."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1 prompt per work item (got {batch})")
    items = []
    for pool, share in shares.items():
        for c, start in enumerate(range(0, len(share), batch)):
            items.append(WorkItem(f"s{step}/{pool}/{c}", pool, step, share[start:start + batch],
                                  seed=seed(step, pool, c), n=n, max_new_tokens=max_new_tokens))
    return items
