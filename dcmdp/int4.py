"""4-bit weight-only quantisation: round-to-nearest, group-wise, asymmetric (AWQ/GPTQ-class RTN).

A Linear weight W [out, in] is cut along its input dimension into groups of g consecutive
weights (g = ``group_size`` clipped to ``in``; a last, shorter group when g does not divide
``in``). Each group G gets its own scale and zero point (unsigned 4-bit codes 0..15), over a
range that always holds 0 (as GPTQ's quantiser takes it, so 0 is exactly representable):

    lo = min(min G, 0),   hi = max(max G, 0),   s = (hi − lo) / 15,   z = round(−lo / s)  (∈ 0..15)
    q = clamp(round(w / s) + z, 0, 15),     ŵ = (q − z) · s

``round`` is round-half-to-even (``torch.round``). An all-zero group (s = 0) is kept exactly. This
is the baseline "RTN w4 g128, zero point" of GPTQ (Frantar et al. 2023) and AWQ (Lin et al. 2024)
without their calibration: activations stay in the engine's float dtype, only the weights carry
the rounding error.

Which weights: every ``torch.nn.Linear`` of the decoder (attention and MLP projections); the
embedding and the LM head stay at full precision, as AWQ/GPTQ deployments keep them
(``quantized_weight_names``).

``int4_ste`` is the straight-through estimator of the quantiser (Bengio et al. 2013; QAT as in
Jacob et al. 2018): its value is ŵ, its gradient with respect to w is the identity,

    ŵ_STE = w + (Q(w) − w).detach(),      ∂ŵ_STE/∂w = I,

so a loss evaluated with quantised weights trains the full-precision ones.
"""

from __future__ import annotations

import torch

INT4_LEVELS = 15  # unsigned 4-bit codes 0..15
DEFAULT_GROUP_SIZE = 128


def _groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """W [out, in] → [out, n_groups, g] (the last group padded by repeating its last weight, which
    changes neither its min nor its max) and the padding added."""
    if w.dim() != 2:
        raise ValueError(f"int4: a Linear weight [out, in] is expected, got shape {tuple(w.shape)}")
    if group_size < 1:
        raise ValueError(f"int4: groupSize must be >= 1, got {group_size}")
    g = min(group_size, w.shape[1])
    pad = (-w.shape[1]) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.reshape(w.shape[0], -1, g), pad


def int4_quantize(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [out, in] uint8 in 0..15, scales [out, n_groups], zero points [out, n_groups] uint8).

    ``w`` [out, in] floating point (computed in float32, or float64 for a float64 ``w``);
    ``group_size`` ≥ 1, clipped to ``in``. ValueError on another shape or a group size < 1.
    """
    work = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    groups, pad = _groups(work, group_size)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = (hi - lo) / INT4_LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe).clamp(0, INT4_LEVELS)
    codes = (torch.round(groups / safe[..., None]) + zero[..., None]).clamp(0, INT4_LEVELS)
    codes = codes.reshape(w.shape[0], -1)[:, :w.shape[1]]
    return codes.to(torch.uint8), scale, zero.to(torch.uint8)


def int4_roundtrip(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """ŵ = (q − z)·s: the weight the int4 engine computes with, same shape and dtype as ``w``."""
    codes, scale, zero = int4_quantize(w, group_size)
    out_dim, in_dim = w.shape
    g = min(group_size, in_dim)
    s = scale.repeat_interleave(g, dim=1)[:, :in_dim]
    z = zero.to(s.dtype).repeat_interleave(g, dim=1)[:, :in_dim]
    deq = (codes.to(s.dtype) - z) * s
    constant = (scale == 0).repeat_interleave(g, dim=1)[:, :in_dim]  # all-zero groups, kept exactly
    return torch.where(constant, w.detach().to(s.dtype), deq).to(w.dtype)


def int4_ste(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """ŵ with a straight-through gradient: value ``int4_roundtrip(w)``, ∂/∂w = identity."""
    return w + (int4_roundtrip(w, group_size) - w).detach()


def quantized_weight_names(model: torch.nn.Module) -> list[str]:
    """Parameter names of the weights an int4 engine quantises: every Linear's weight except the
    LM head (``model.get_output_embeddings()``) and any weight shared with it or the embedding."""
    skip: set[int] = set()
    for get in ("get_output_embeddings", "get_input_embeddings"):
        mod = getattr(model, get, lambda: None)()
        if mod is not None:
            skip.add(id(mod.weight))
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) not in skip:
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def int4_roundtrip_model_(model: torch.nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Replace, in place, every weight of ``quantized_weight_names(model)`` by its int4 round trip."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in quantized_weight_names(model):
            w = params[name]
            w.copy_(int4_roundtrip(w, group_size))
