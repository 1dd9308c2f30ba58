"""GRPO's clipped surrogate, the discrepancy penalties and the passive corrections (TIS/MIS/IcePop).

All functions take per-token tensors of shape [B, T] with a response mask; losses are token means
over the masked tokens of the mini-batch. A micro-batch of a mini-batch passes the mini-batch's
``denominator`` (its masked-token count): Σ over micro-batches of Σ_t x_t / denominator is then the
mini-batch's token mean, and so is the sum of their gradients (gradient accumulation). Notation: π_θ the trainer's current probability,
π_old the trainer's probability at the start of the step (detached), p_inf the rollout engine's.

* Group advantages (GRPO):  Â_i = (r_i − mean_g r) / (std_g r + ε), shared by all tokens of i.
* Clipped surrogate, with ρ_t = π_θ / π_old and separate clip bounds:
      L_pg = − mean_t  w_t · min(ρ_t Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_t)
  where w_t is the (detached) importance weight of the correction in use (1 for plain GRPO).
* Corrections, with the train/inference ratio  r_t = π_old,t / p_inf,t  (detached):
      tis:     w_t = min(r_t, C)
      mis:     w_t = r_t · 1[r_t ≤ C]                 (tokens above the cap dropped)
      icepop:  w_t = r_t · 1[a ≤ r_t ≤ b]             (tokens outside [a, b] masked)
* DC-GRPO primal forms (λ_t is the multiplier of the pool that generated token t):
      penalty:            L = L_pg + mean_t λ_t |π_θ,t − p_inf,t|        (the paper; differentiable)
      squared-penalty:    L = L_pg + mean_t λ_t (π_θ,t − p_inf,t)²       (smooth at 0)
      k3-penalty:         L = L_pg + mean_t λ_t (q_t − 1 − log q_t),  q_t = π_θ,t / p_inf,t
                          (k3 estimate of KL(p_inf ‖ π_θ) on engine samples)
      hinge-penalty:      L = L_pg + mean_t λ_t max(0, |π_θ,t − p_inf,t| − c_t)
                          (a per-token tolerance: only tokens whose own discrepancy exceeds c are
                          pulled back; the |·| penalty pushes every token with a gradient of the
                          same size, however small its discrepancy)
      advantage-shaping:  Â_t ← Â_t − λ_t δ_t  (δ_t detached), then the ordinary L_pg
* Optional KL to a reference policy (k3):  β · mean_t (π_ref/π_θ − 1 − log(π_ref/π_θ)).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denominator: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """Σ x·m / Σ m, or Σ x·m / denominator when given (a micro-batch's share of a mini-batch's mean)."""
    m = mask.to(x.dtype)
    if denominator is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum() / max(float(denominator), 1.0)


def group_advantages(rewards: torch.Tensor, group_sizes: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """(r − group mean) / (group std + ε) for rewards laid out group by group (sizes may differ)."""
    out, start = [], 0
    for g in group_sizes:
        r = rewards[start:start + g].double()
        out.append(((r - r.mean()) / (r.std(unbiased=False) + eps)).to(rewards.dtype))
        start += g
    return torch.cat(out) if out else rewards.new_zeros(0)


def importance_weights(logp_old: torch.Tensor, logp_inf: torch.Tensor, corrections: Sequence[str], *,
                       cap: float = 2.0, low: float = 0.5, high: float = 5.0) -> torch.Tensor:
    """Detached per-token weights w_t of the passive corrections (1 where none applies)."""
    ratio = (logp_old - logp_inf).exp().detach()
    w = torch.ones_like(ratio)
    for c in corrections:
        if c == "tis":
            w = w * ratio.clamp(max=cap)
        elif c == "mis":
            w = w * ratio * (ratio <= cap)
        elif c == "icepop":
            w = w * ratio * ((ratio >= low) & (ratio <= high))
        else:
            raise ValueError(f"unknown correction {c!r}")
    return w


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_low: float, clip_high: float, weights: Optional[torch.Tensor] = None,
                      denominator: Optional[torch.Tensor | float] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level PPO-clip loss with separate low/high bounds; returns (loss, diagnostics).

    ``info["clip_frac"]``: the clipped fraction of this call's masked tokens."""
    ratio = (logp - logp_old).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    with torch.no_grad():
        m = mask.bool()
        was_clipped = ((ratio < 1 - clip_low) & (advantages < 0)) | ((ratio > 1 + clip_high) & (advantages > 0))
        info = {"clip_frac": float(was_clipped[m].float().mean()) if m.any() else 0.0}
    return masked_mean(per_token, mask, denominator), info


def constraint_penalty(logp: torch.Tensor, logp_inf: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor,
                       mode: str = "penalty", tolerance: Optional[torch.Tensor] = None,
                       denominator: Optional[torch.Tensor | float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ-weighted penalty loss, unweighted penalty) for the penalty forms; token means.

    ``tolerance`` (c_t per token, broadcastable) is used by ``hinge-penalty`` only (None = 0).
    """
    p, q_inf = logp.exp(), logp_inf.exp()
    if mode == "penalty":
        per_token = (p - q_inf).abs()
    elif mode == "hinge-penalty":
        c = torch.zeros_like(p) if tolerance is None else tolerance.to(p.dtype)
        per_token = torch.relu((p - q_inf).abs() - c)
    elif mode == "squared-penalty":
        per_token = (p - q_inf).pow(2)
    elif mode == "k3-penalty":
        log_q = logp - logp_inf
        per_token = log_q.exp() - 1 - log_q
    else:
        raise ValueError(f"not a penalty mode: {mode!r}")
    return masked_mean(lam * per_token, mask, denominator), masked_mean(per_token.detach(), mask, denominator)


def shape_advantages(advantages: torch.Tensor, delta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Â_t ← Â_t − λ_t δ_t with δ_t detached."""
    return advantages - lam * delta.detach()


def reference_kl(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                 denominator: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """k3 estimate of KL(π_θ ‖ π_ref) on the batch's tokens."""
    log_r = logp_ref - logp
    return masked_mean(log_r.exp() - 1 - log_r, mask, denominator)
