"""Selective log-softmax over sequence chunks equals the full-vocabulary log_softmax, gradients included."""

import torch

from dcmdp.models.tiny import build_model
from dcmdp_trainer.logprobs import sequence_logprobs
from runs import tiny_run


def full_vocab(model, ids, attn, pos):
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_chunked_logprobs_and_gradients_match_the_full_log_softmax():
    model, tok = build_model(tiny_run().spec.model, seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    ref = full_vocab(model, ids, attn, pos)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    vocab = model.get_output_embeddings().weight.shape[0]
    got = sequence_logprobs(model, ids, attn, pos, 0.7, chunk_elements=3 * vocab * 4)  # chunks of 4 positions
    assert got.shape == (3, 10) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-6)
    got.sum().backward()
    for p, want in zip(model.parameters(), ref_grads):
        assert torch.allclose(p.grad, want, atol=1e-6, rtol=1e-5)
