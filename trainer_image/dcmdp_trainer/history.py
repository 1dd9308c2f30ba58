"""The weight history: which older weight versions the publisher keeps, and in which forms.

The newest version is served from the snapshot the trainer hands over (the Session's fp32 host
copy, shared: never copied). When a newer one is published, each older version ``v`` is kept only
in the wire dtypes a worker may still fetch it in (:func:`wanted`):

- a pool with ``lag`` L samples version ``newest − L``, so its wire dtype needs
  ``newest − L ≤ v`` (the versions that are, or will become, its lagged version);
- a version still named by a lease or a queued evaluation item (a worker may not have fetched it
  yet, or may resume a broken stream of it) is *pinned* in its pool's wire dtype.

Everything else is dropped. A kept version is held in the cheapest *forms* that serve its wire
dtypes (:func:`forms_for`): its fp32 snapshot when an fp32 pool needs it, or when it is kept both
in bf16 and in fp16 (2 + 2 bytes a parameter: as much as fp32, which serves both); otherwise one
16-bit copy per wire dtype (2 bytes a parameter instead of 4). A version whose fp32 snapshot the
trainer keeps anyway (the Session's history for ``discrepancyReference: sampled``) is served from
that snapshot: nothing is held twice. Bytes of the history, P parameters, K kept older versions:
at most ``Σ_v bytes(forms_for(wanted(v)))·P ≤ 4·P·K`` (docs/runtime.md, "Trainer memory").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

import torch

from dcmdp.precision import wire_dtype

if TYPE_CHECKING:
    from dcmdp.spec import PoolSpec

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per floating-point parameter of each wire dtype


def wanted(newest: int, versions: Iterable[int], lags: Mapping[str, int],
           pins: Iterable[tuple[int, str]] = ()) -> dict[int, set[str]]:
    """The wire dtypes each older version may still be fetched in (versions needing none are absent).

    ``lags``: wire dtype → the largest ``lag`` of the pools receiving that dtype; ``pins``:
    (version, wire dtype) pairs still named by leases or queued work. Versions ≥ ``newest`` are
    not older and are left out."""
    out: dict[int, set[str]] = {}
    pinned: dict[int, set[str]] = {}
    for v, d in pins:
        pinned.setdefault(v, set()).add(d)
    for v in versions:
        if v >= newest:
            continue
        need = {d for d, lag in lags.items() if newest - lag <= v} | pinned.get(v, set())
        if need:
            out[v] = need
    return out


def pool_lags(pools: Iterable["PoolSpec"]) -> dict[str, int]:
    """Wire dtype → the largest ``lag`` of the pools receiving it (the publisher's lag windows)."""
    lags: dict[str, int] = {}
    for p in pools:
        d = wire_dtype(p.precision)
        lags[d] = max(lags.get(d, 0), p.lag)
    return lags


def forms_for(dtypes: Iterable[str]) -> tuple[str, ...]:
    """The cheapest forms that serve every dtype of ``dtypes``: ``("fp32",)`` when fp32 is among
    them or the 16-bit copies would take as many bytes, else the 16-bit dtypes themselves."""
    need = sorted(set(dtypes))
    unknown = [d for d in need if d not in BYTES]
    if unknown:
        raise ValueError(f"wire dtype must be one of {', '.join(BYTES)} (got {unknown[0]!r})")
    if "fp32" in need or sum(BYTES[d] for d in need) >= BYTES["fp32"]:
        return ("fp32",)
    return tuple(need)


def narrow(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """A host copy of ``state`` with floating-point tensors cast to the 16-bit ``dtype`` (the
    rounding a worker of that dtype receives: the wire stream of the copy equals that of ``state``);
    other tensors are shared, not copied."""
    target = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return {k: v.detach().to("cpu", target, copy=True) if v.is_floating_point() else v for k, v in state.items()}
