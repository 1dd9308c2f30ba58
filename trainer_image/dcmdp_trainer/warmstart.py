"""Supervised warm start on the task's reference answers, so RL starts from a non-trivial policy.

Teacher-forced cross-entropy on ``prompt → answer<eos>`` (loss on the answer tokens only), AdamW,
a few hundred steps on the tiny built-in models. Skipped for ``warmStart.steps: 0``.
"""

from __future__ import annotations

import random

import torch

from dcmdp.spec import WarmStartSpec
from dcmdp.tasks import Task
from dcmdp.tasks.prompt import PromptFormat, encode


def prompt_ids(tokenizer, prompt: str, fmt: PromptFormat = PromptFormat()) -> list[int]:
    """The prompt's token ids as every engine sees them (see :mod:`dcmdp.tasks.prompt`)."""
    return fmt.ids(tokenizer, prompt)


def warm_start(model, tokenizer, task: Task, spec: WarmStartSpec, seed: int = 0, *, steps: int,
               fmt: PromptFormat = PromptFormat()) -> dict[str, float]:
    """``steps`` supervised steps (the resolved ``warmStart.steps``; 0 = none)."""
    if steps == 0:
        return {"warmstart/steps": 0}
    rng = random.Random(seed ^ 0x5EED)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    model.train()
    loss_val = float("nan")
    for _ in range(steps):
        problems = task.sample(rng, spec.batch_size)
        seqs, starts = [], []
        for p in problems:
            pi = prompt_ids(tokenizer, p.prompt, fmt)
            seqs.append(pi + encode(tokenizer, p.answer) + [tokenizer.eos_token_id])
            starts.append(len(pi))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            off = width - len(s)
            ids[i, off:] = torch.tensor(s)
            attn[i, off:] = 1
            labels[i, off + st:] = torch.tensor(s[st:])
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = float(loss.detach())
    model.eval()
    return {"warmstart/steps": steps, "warmstart/loss": loss_val}
