"""Autoregressive sampling from a Hugging Face causal LM, recording log p of each sampled token.

Used by the HF rollout engine (at the pool's precision) and by the trainer's greedy evaluation.
The recorded log-probability is that of the *sampling* distribution: softmax((logits + ε)/T),
where ε is the optional Gaussian logit noise that emulates a worse engine. With T = 0 (greedy) the
log-probability of the argmax under softmax(logits + ε) is recorded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class Generated:
    responses: list[list[int]]  # response tokens, EOS included when sampled
    logprobs: list[list[float]]  # one per response token
    finish_reasons: list[str]  # "stop" | "length"


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def _cache_kwarg(model) -> str:
    """transformers ≥ 5.2x names the KV cache ``cache``; older releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, n: int, max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, noise: float = 0.0, generator: torch.Generator | None = None) -> Generated:
    """``n`` samples per prompt (prompt-major order) with a KV cache and left padding."""
    seqs = [p for p in prompts for _ in range(n)]
    device = next(model.parameters()).device  # sampling runs where the model is
    ids, mask = left_pad(seqs, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    batch = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    past, logits = _cache_of(out), out.logits[:, -1, :].float()
    cache_kw = _cache_kwarg(model)
    next_pos = positions[:, -1:] + 1
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        if noise > 0:
            logits = logits + noise * torch.randn(logits.shape, generator=generator, device=device)
        if temperature > 0:
            logp_all = torch.log_softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
        else:
            logp_all = torch.log_softmax(logits, dim=-1)
            tok = logp_all.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens[:, t] = tok
        logps[:, t] = logp_all.gather(-1, tok[:, None]).squeeze(-1).masked_fill(done, 0.0)
        newly = (~done) & (tok == eos_id)
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        done |= newly
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True, **{cache_kw: past})
        past, logits = _cache_of(out), out.logits[:, -1, :].float()
        next_pos = next_pos + 1
    responses, logprobs, reasons = [], [], []
    for i in range(batch):
        k = int(lengths[i])
        responses.append(tokens[i, :k].tolist())
        logprobs.append(logps[i, :k].tolist())
        reasons.append("stop" if bool(done[i]) else "length")
    return Generated(responses, logprobs, reasons)
