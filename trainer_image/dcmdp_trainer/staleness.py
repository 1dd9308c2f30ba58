"""The staleness rule: which weight version a pool samples with, which steps may be sampled now,
and which submissions are too old to train on.

A rollout sampled with weight version u and trained in step s (at version s) lags s − u versions.
Pool p may lag at most ``bound(p) = max(maxStaleness, p.lag)`` versions. With newest published
version V, pool p samples with ``version(p) = max(oldest kept, V − p.lag)``; the prompts of step s
are leased to p only while ``s − version(p) ≤ bound(p)``, and the trainer queues the steps up to
``min(total − 1, V + maxStaleness)``. So with ``maxStaleness: 0`` the run is strictly on-policy
(step s+1's prompts go out once version s+1 is published) and with ``maxStaleness: 1`` the workers
sample step s+1 while the trainer trains step s. A submission of step s sampled with version u is
stale when ``s − u > bound(p)``: dropped, counted (``rollouts/dropped_stale``), its prompts leased
again. Evaluation items carry a fixed version and are never stale.

**Adaptive staleness** (``algorithm.adaptiveStaleness``, dc-grpo): the lag allowed in step k follows
the multiplier, with ``maxStaleness`` = K_max as the ceiling (:func:`adaptive_lag`):

    lag_k = clip(⌊K_max · (1 − λ_k / λ_max) + ½⌋, 0, K_max),   λ_k = max over the pools of λ_p

so the loss-side penalty acts first and the lag falls only as λ nears λ_max: K_max while the
constraint is slack (λ = 0), none once λ is pinned at λ_max. A proportional law, not bang-bang (a
rule switching between K_max and 0 oscillated here). The run loop applies lag_k as ``maxStaleness``
of the next step (``with_max_staleness``); the in-process runner, where staleness is forced, samples
at that lag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional


def adaptive_lag(lam: float, lam_max: float, ceiling: int) -> int:
    """lag = clip(⌊K_max·(1 − λ/λmax) + ½⌋, 0, K_max) (K_max = ``ceiling`` ≥ 0; λmax = 0: K_max).
    Half-way values round up (λ/λmax = 0.5, K_max = 3 → 2). ValueError on a negative ceiling or a
    non-finite λ."""
    if ceiling < 0:
        raise ValueError(f"algorithm.maxStaleness (the adaptive ceiling) must be >= 0 (got {ceiling})")
    if not math.isfinite(lam):
        raise ValueError(f"adaptive staleness: the multiplier is not finite ({lam})")
    if lam_max <= 0:
        return ceiling
    return min(max(math.floor(ceiling * (1.0 - lam / lam_max) + 0.5), 0), ceiling)


@dataclass(frozen=True)
class Staleness:
    """The rule for one run: ``max_staleness`` (``algorithm.maxStaleness``, ≥ 0) and each pool's
    ``lag`` (``rollout.pools[].lag``, ≥ 0), in weight versions."""

    max_staleness: int
    lags: dict[str, int]

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"algorithm.maxStaleness must be >= 0 (got {self.max_staleness})")
        for pool, lag in self.lags.items():
            if lag < 0:
                raise ValueError(f"rollout.pools[{pool}].lag must be >= 0 (got {lag})")

    def bound(self, pool: str) -> int:
        """The most versions a rollout of ``pool`` may lag: max(maxStaleness, lag)."""
        return max(self.max_staleness, self.lags[pool])

    def pool_version(self, pool: str, newest: int, oldest_kept: Optional[int] = None) -> int:
        """The version ``pool`` samples with: ``lag`` versions behind ``newest``, never older than
        the oldest version still kept (``oldest_kept``; None = ``newest``)."""
        oldest = newest if oldest_kept is None else oldest_kept
        return max(oldest, newest - self.lags[pool])

    def may_sample(self, pool: str, step: int, version: int) -> bool:
        """Whether ``step``'s prompts may be sampled by ``pool`` with ``version``."""
        return step - version <= self.bound(pool)

    def is_stale(self, pool: str, step: int, version: int) -> bool:
        """Whether a submission of ``step`` sampled with ``version`` is too old to train on."""
        return not self.may_sample(pool, step, version)

    def with_max_staleness(self, max_staleness: int) -> "Staleness":
        """The same rule with another ``maxStaleness`` (adaptive staleness sets it each step)."""
        return replace(self, max_staleness=max_staleness)

    def last_step(self, newest: int, total_steps: int) -> int:
        """The last step whose prompts may be queued while ``newest`` is the newest version."""
        return min(total_steps - 1, newest + self.max_staleness)
