"""GRPO's clipped surrogate, the discrepancy penalties and the passive corrections (TIS/MIS/IcePop).

All functions take per-token tensors of shape [B, T] (float32 or float64) with a response mask of
the same shape (bool, or 0/1 of any dtype). Notation: π_θ the trainer's current probability, π_old
the trainer's probability at the start of the step (detached), p_inf the rollout engine's.

* Group advantages (GRPO):  Â_i = (r_i − mean_g r) / (std_g r + ε), shared by all tokens of i;
  std_g is the population std (``population``), the unbiased one (``unbiased``, verl/TRL), or
  omitted (``none``: Â_i = r_i − mean_g r, Dr. GRPO). A group of one sample gets Â = 0.
* Clipped surrogate, with ρ_t = exp(clamp(log π_θ − log π_old, −K, K)) and separate clip bounds:
      ℓ_t = − w_t · min(ρ_t Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_t)
  where w_t is the (detached) importance weight of the correction in use (1 for plain GRPO).
  Dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", verl ``clip_ratio_c``):
  for Â_t < 0, ℓ_t ← min(ℓ_t, −c Â_t)  (the loss of a negative-advantage token is capped at c|Â|).
* Loss aggregation of ℓ_t over a mini-batch of N sequences (m the mask counted, see ``aggregate``):
      token-mean:            Σ_i Σ_t m ℓ / Σ_i Σ_t m                     (DAPO; dcmdp's default)
      seq-mean-token-mean:   (1/N) Σ_i (Σ_t m ℓ / Σ_t m)                 (DeepSeekMath's GRPO)
      seq-mean-token-sum:    (1/(N K)) Σ_i Σ_t m ℓ                       (Dr. GRPO with K = max length)
* Corrections, with the train/inference log-ratio ℓr_t = log π_old,t − log p_inf,t (detached) at a
  level: ``token`` ℓr_t; ``sequence`` Σ_t ℓr_t (the product of the ratios); ``geometric``
  (1/|y|) Σ_t ℓr_t (their geometric mean) — the last two shared by every token of the sequence;
  r = exp(ℓr):
      tis:     w = min(r, C)
      mis:     w = r · 1[L ≤ r ≤ C]                 (dropped outside; L = 0 keeps every small r)
      icepop:  w = r · 1[a ≤ r ≤ b]                 (masked outside [a, b])
  computed in log space (bounds compared with log C, log L, log a, log b), so no finite log-prob
  can overflow: a kept weight is at most C (or b), and exp is only taken of a bounded exponent.
* DC-GRPO primal forms (λ_t is the multiplier of the pool that generated token t):
      penalty:            L = L_pg + mean_t λ_t |π_θ,t − p_inf,t|        (the paper; differentiable)
      squared-penalty:    L = L_pg + mean_t λ_t (π_θ,t − p_inf,t)²       (smooth at 0)
      k3-penalty:         L = L_pg + mean_t λ_t (q_t − 1 − log q_t),  log q_t = clamp(log π_θ,t − log p_inf,t, −K, K)
                          (k3 estimate of KL(p_inf ‖ π_θ) on engine samples)
      hinge-penalty:      L = L_pg + mean_t λ_t max(0, |π_θ,t − p_inf,t| − c_t)
                          (a per-token tolerance: only tokens whose own discrepancy exceeds c are
                          pulled back; the |·| penalty pushes every token with a gradient of the
                          same size, however small its discrepancy)
      advantage-shaping:  Â_t ← Â_t − λ_t δ_t  (δ_t detached), then the ordinary L_pg
      deployed-penalty:   L = L_pg + mean_t λ_t |π_θ,t − π_Q(θ),t|                       (ours)
                          π_Q(θ),t: the sampled token's probability under the *same* weights
                          quantised as the engine quantises them (Q = ``dcmdp.int4``), evaluated
                          with the straight-through estimator ∂Q(w)/∂w = I (``int4_ste``), so
                            ∂/∂θ |π_θ − π_Q(θ)| = sign(π_θ − π_Q(θ)) · (∇π(θ) − ∇π(w)|_{w = Q(θ)}).
                          The paper's penalty pulls π_θ toward the recorded engine probability p_inf
                          (a constant); this one moves θ so that the deployed, quantised policy and
                          the trainer's agree: quantisation-aware training (Jacob et al. 2018; STE:
                          Bengio et al. 2013) with the multiplier λ of δ̄ ≤ c as its weight.
* Optional KL to a reference policy (k3):  β · mean_t (π_ref/π_θ − 1 − log(π_ref/π_θ)), the
  log-ratio clamped to ±K.

K is the log-ratio clamp (``algorithm.logRatioClamp``, 20 as in verl): exp(K) is finite in float32
(it overflows above ~88), so values and gradients stay finite for any finite log-probabilities; the
clamp passes no gradient beyond ±K. Masks are applied with ``torch.where`` before any product or
reduction, so a NaN or inf in a masked (prompt, padding, dropped) position never reaches the loss or
its gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, get_args

import torch

from dcmdp.spec import AdvantageStd, CorrectionLevel, LossAggregation

LOG_RATIO_CLAMP = 20.0  # default K (verl's bound); exp(K) ≈ 4.9e8
ADVANTAGE_STD: tuple[str, ...] = get_args(AdvantageStd)
AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)
CORRECTION_LEVELS: tuple[str, ...] = get_args(CorrectionLevel)


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where the mask is set, 0 elsewhere (a NaN or inf outside the mask does not propagate)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denominator: Optional[float] = None) -> torch.Tensor:
    """Σ_{mask} x / max(1, |mask|): a 0-d tensor of x's dtype; x outside the mask is ignored (even NaN).

    ``denominator`` replaces |mask| (a micro-batch passes its mini-batch's token count, so the
    micro-batches' values and gradients sum to the mini-batch's mean)."""
    if denominator is not None:
        return masked(x, mask).sum() / max(float(denominator), 1.0)
    return masked(x, mask).sum() / mask.bool().sum().clamp(min=1).to(x.dtype)


def group_advantages(rewards: torch.Tensor, group_sizes: Sequence[int], eps: float = 1e-6,
                     std: str = "population") -> torch.Tensor:
    """Â_i = (r_i − mean_g r) / (std_g r + ε) for rewards [N] laid out group by group (sizes may differ).

    ``std``: ``population`` (divide by G; dcmdp's default), ``unbiased`` (by G − 1; verl, TRL) or
    ``none`` (no division: Dr. GRPO, Liu et al. 2025). A group of one sample gets 0 with every choice
    (verl gives r/(1 + ε)). Computed in float64, returned in the rewards' dtype. ValueError on an
    unknown ``std``.
    """
    if std not in ADVANTAGE_STD:
        raise ValueError(f"advantageStd must be one of {ADVANTAGE_STD}, got {std!r}")
    out, start = [], 0
    for g in group_sizes:
        r = rewards[start:start + g].double()
        centred = r - r.mean()
        if std == "none" or g < 2:
            a = centred
        else:
            a = centred / (r.std(unbiased=std == "unbiased") + eps)
        out.append(a.to(rewards.dtype))
        start += g
    return torch.cat(out) if out else rewards.new_zeros(0)


class Correction(NamedTuple):
    """Detached per-token importance weights and the tokens a correction keeps ([B, T] each).

    ``weight`` is finite, ≥ 0, and 0 wherever ``keep`` is False; ``keep`` is False outside the
    response mask and where mis/icepop drop the token.
    """

    weight: torch.Tensor
    keep: torch.Tensor


def correction_log_ratio(logp_old: torch.Tensor, logp_inf: torch.Tensor, mask: torch.Tensor,
                         level: str = "token") -> torch.Tensor:
    """log r of the chosen level at every token ([B, T], float64, 0 outside the mask).

    ``token``: log π_old,t − log p_inf,t; ``sequence``: its sum over the sequence's tokens;
    ``geometric``: its mean over them. Float64, so no sum of finite float32 inputs overflows.
    """
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"correctionLevel must be one of {CORRECTION_LEVELS}, got {level!r}")
    m = mask.bool()
    lr = masked(logp_old.detach().double() - masked(logp_inf.detach().double(), m), m)
    if level == "token":
        return lr
    seq = lr.sum(-1, keepdim=True)
    if level == "geometric":
        seq = seq / m.sum(-1, keepdim=True).clamp(min=1)
    return masked(seq.expand_as(lr), m)


def importance_weights(logp_old: torch.Tensor, logp_inf: torch.Tensor, corrections: Sequence[str], *,
                       cap: float = 2.0, low: float = 0.5, high: float = 5.0, mis_low: float = 0.0,
                       level: str = "token", mask: Optional[torch.Tensor] = None) -> Correction:
    """Weights w and kept tokens of the passive corrections (w = 1 where none applies), in log space.

    Inputs [B, T] log-probabilities (any finite values; ``mask`` [B, T], default all tokens);
    ``cap`` = C of tis/mis, ``mis_low`` = L of mis (0 = no lower bound; verl rejects below 1/C),
    ``low``/``high`` = [a, b] of icepop, ``level`` as in ``correction_log_ratio``. Returns weights in
    logp_old's dtype. ValueError on an unknown correction or level.
    """
    m = torch.ones_like(logp_old, dtype=torch.bool) if mask is None else mask.bool()
    lr = correction_log_ratio(logp_old, logp_inf, m, level)
    log_w = torch.zeros_like(lr)
    keep = m.clone()
    for c in corrections:
        if c == "tis":
            log_w = log_w + lr.clamp(max=math.log(cap))
        elif c == "mis":
            keep &= lr <= math.log(cap)
            if mis_low > 0:
                keep &= lr >= math.log(mis_low)
            log_w = log_w + lr
        elif c == "icepop":
            keep &= (lr >= math.log(low)) & (lr <= math.log(high))
            log_w = log_w + lr
        else:
            raise ValueError(f"unknown correction {c!r}")
    # the exponent is bounded above where kept (each term ≤ log C or log b): exp cannot overflow
    w = masked(masked(log_w, keep).exp(), keep)
    return Correction(w.to(logp_old.dtype), keep)


def aggregation_denominator(mask: torch.Tensor, aggregation: str = "token-mean") -> float:
    """The denominator of ``aggregate`` for a mini-batch's mask [B, T]: its token count (token-mean)
    or its number of sequences with at least one counted token (seq-mean-*); at least 1.

    Computed once over the whole mini-batch, so splitting it into micro-batches (each passing this
    value to ``aggregate``) sums to the same loss.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"lossAggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    m = mask.bool()
    n = m.sum() if aggregation == "token-mean" else m.any(-1).sum()
    return float(max(int(n), 1))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean",
              denominator: Optional[float] = None, constant: float = 1.0) -> torch.Tensor:
    """Reduce a per-token loss [B, T] over the counted tokens ``mask`` to a 0-d tensor.

    token-mean: Σ m ℓ / D;  seq-mean-token-mean: Σ_i (Σ_t m ℓ / Σ_t m) / D;
    seq-mean-token-sum: Σ m ℓ / (K D), K = ``constant``; D = ``denominator``, by default
    ``aggregation_denominator(mask, aggregation)`` of these rows (pass the mini-batch's when these
    rows are one micro-batch of it). Values outside the mask are ignored, even NaN.
    """
    d = aggregation_denominator(mask, aggregation) if denominator is None else denominator
    m = mask.bool()
    x = masked(per_token, m)
    if aggregation == "seq-mean-token-mean":
        num = (x.sum(-1) / m.sum(-1).clamp(min=1).to(x.dtype)).sum()
    elif aggregation == "seq-mean-token-sum":
        num = x.sum() / constant
    else:
        num = x.sum()
    return num / d


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_low: float, clip_high: float, weights: Optional[torch.Tensor] = None, *,
                      dual_clip: Optional[float] = None, log_ratio_clamp: float = LOG_RATIO_CLAMP,
                      aggregation: str = "token-mean", denominator: Optional[float] = None,
                      constant: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level PPO-clip loss with separate low/high bounds; returns (loss, diagnostics).

    ``mask`` [B, T] marks the tokens counted by ``aggregate`` (the response tokens, or only those a
    correction kept); ``weights`` [B, T] the corrections' w_t; ``dual_clip`` the c of dual-clip
    (None = off); ``log_ratio_clamp`` K. Diagnostics: ``clip_frac``, the fraction of counted tokens
    whose ratio was clipped (dual-clipped tokens included).
    """
    m = mask.bool()
    log_ratio = masked(logp - masked(logp_old, m), m).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = log_ratio.exp()
    adv = masked(advantages, m)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -dual_clip * adv), per_token)
    if weights is not None:
        per_token = per_token * masked(weights, m)
    with torch.no_grad():
        was_clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        info = {"clip_frac": float(was_clipped[m].float().mean()) if m.any() else 0.0}
    return aggregate(per_token, m, aggregation, denominator, constant), info


def constraint_penalty(logp: torch.Tensor, logp_inf: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor,
                       mode: str = "penalty", tolerance: Optional[torch.Tensor] = None, *,
                       log_ratio_clamp: float = LOG_RATIO_CLAMP, denominator: Optional[float] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ-weighted penalty loss, unweighted penalty) for the penalty forms; token means (0-d tensors).

    ``tolerance`` (c_t per token, broadcastable) is used by ``hinge-penalty`` only (None = 0);
    ``log_ratio_clamp`` bounds log q of ``k3-penalty``; ``denominator`` as in ``masked_mean``.
    ValueError for any other mode.
    """
    m = mask.bool()
    lp, li = masked(logp, m), masked(logp_inf, m)
    p, q_inf = lp.exp(), li.exp()
    if mode == "penalty":
        per_token = (p - q_inf).abs()
    elif mode == "hinge-penalty":
        c = torch.zeros_like(p) if tolerance is None else tolerance.to(p.dtype)
        per_token = torch.relu((p - q_inf).abs() - masked(c.expand_as(p), m))
    elif mode == "squared-penalty":
        per_token = (p - q_inf).pow(2)
    elif mode == "k3-penalty":
        log_q = (lp - li).clamp(-log_ratio_clamp, log_ratio_clamp)
        per_token = log_q.exp() - 1 - log_q
    else:
        raise ValueError(f"not a penalty mode: {mode!r}")
    return masked_mean(masked(lam, m) * per_token, m, denominator), masked_mean(per_token.detach(), m, denominator)


def deployed_penalty(logp: torch.Tensor, logp_deployed: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor, *,
                     denominator: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ-weighted, unweighted) mean_t |π_θ,t − π_Q(θ),t| over the masked tokens (0-d tensors).

    ``logp`` [B, T]: log π_θ of the sampled tokens; ``logp_deployed`` [B, T]: log π_Q(θ) of the same
    tokens under the quantised weights, *not* detached (the gradient flows into both; with
    ``dcmdp.int4.int4_ste`` weights it is the straight-through gradient); ``lam`` λ_t [B, T];
    ``denominator`` as in ``masked_mean``. The unweighted value is detached (a diagnostic:
    ``constraint/penalty``, the trainer–deployed gap on this batch).
    """
    m = mask.bool()
    gap = (masked(logp, m).exp() - masked(logp_deployed, m).exp()).abs()
    return masked_mean(masked(lam, m) * gap, m, denominator), masked_mean(gap.detach(), m, denominator)


def shape_advantages(advantages: torch.Tensor, delta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Â_t ← Â_t − λ_t δ_t with δ_t detached."""
    return advantages - lam * delta.detach()


def reference_kl(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, *,
                 log_ratio_clamp: float = LOG_RATIO_CLAMP, denominator: Optional[float] = None) -> torch.Tensor:
    """k3 estimate of KL(π_θ ‖ π_ref) on the batch's tokens (token mean, log-ratio clamped to ±K)."""
    m = mask.bool()
    log_r = masked(masked(logp_ref, m) - logp, m).clamp(-log_ratio_clamp, log_ratio_clamp)
    return masked_mean(log_r.exp() - 1 - log_r, m, denominator)
