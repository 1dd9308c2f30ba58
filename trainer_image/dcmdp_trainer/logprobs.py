"""log π(y_t) of the sampled tokens without the whole micro-batch's full-vocabulary fp32 logits.

The decoder's hidden states h [B, L, H] are computed once; the LM head and the log-softmax run
over sequence chunks of at most ``LOGIT_CHUNK_ELEMENTS`` logits each (selective log-softmax):

    log π(y_t) = z_t[y_t] / T − logsumexp(z_t / T),   z_t = W h_t  (fp32)

With gradients, each chunk runs under activation checkpointing, so only h is kept for backward
and each chunk's logits are recomputed there: peak logit memory is one chunk, not B × L × V.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# logits per chunk (fp32: 4 bytes each) → 64 MiB of logits, plus the same again for the softmax
LOGIT_CHUNK_ELEMENTS = 1 << 24


def _selective(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 for a float64 model)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets[..., None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, temperature: float,
                      chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> torch.Tensor:
    """[B, L−1] fp32 log-probs of ``ids[:, 1:]`` given the prefix (teacher-forced; fp64 for a float64 model).

    ``model``: a Hugging Face causal LM (``get_decoder()``, ``get_output_embeddings()``) or a
    wrapper whose ``module`` is one (DeepSpeed's engine). ids/attn/pos: [B, L] long.
    """
    lm = getattr(model, "module", model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    hidden, targets = hidden[:, :-1, :], ids[:, 1:]
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3 partitions hold a slice
    step = max(1, chunk_elements // max(1, ids.shape[0] * vocab))
    parts = []
    for s in range(0, targets.shape[1], step):
        h, y = hidden[:, s:s + step], targets[:, s:s + step]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_selective, head, h, y, temperature, use_reentrant=False))
        else:
            parts.append(_selective(head, h, y, temperature))
    return torch.cat(parts, dim=1) if parts else hidden.new_zeros(ids.shape[0], 0, dtype=torch.float32)
