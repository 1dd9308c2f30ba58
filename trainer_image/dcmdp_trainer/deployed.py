"""log π_Q(θ) of the sampled tokens: the trainer's weights quantised as the int4 engine quantises them.

``constraint.mode: deployed-penalty`` (formula in ``dcmdp.losses``) needs, inside the training
step, the policy of the same weights after the engine's quantiser Q, differentiable in θ through
the straight-through estimator: every weight of ``dcmdp.int4.quantized_weight_names`` is replaced
by ``int4_ste(w, g)`` (value Q(w), gradient identity) for one teacher-forced forward pass, via
``torch.func.functional_call``, so the model's own parameters are never modified.

Which pools: the pool's engine must quantise with Q. ``int4`` pools use ``dcmdp.int4`` with the
pool's ``quantGroupSize``; an ``fp32`` pool's Q is the identity (π_Q = π_θ: its tokens add no
penalty). Any other precision (bf16, fp16, fp8, int8: their engines also round activations or use
another format) is refused at start with a ValueError naming the field and pool.
"""

from __future__ import annotations

from typing import Optional

import torch

from dcmdp.int4 import int4_ste, quantized_weight_names
from dcmdp.spec import RunSpec
from dcmdp_trainer.logprobs import sequence_logprobs


def deployed_group_size(spec: RunSpec, pools: list[str]) -> Optional[int]:
    """The int4 group size of the pools whose tokens the deployed penalty quantises (None: only
    fp32 pools, Q = identity). ValueError for a pool whose engine's quantiser is not reproduced
    here, or int4 pools with different group sizes."""
    sizes = set()
    for i, pool in enumerate(spec.rollout.pools):
        if pool.name not in pools or pool.replicas == 0:
            continue
        if pool.precision == "int4":
            sizes.add(pool.quant_group_size)
        elif pool.precision != "fp32":
            raise ValueError(f"spec.algorithm.constraint.mode: deployed-penalty reproduces the int4 engine's quantiser "
                             f"only; rollout.pools[{i}] ({pool.name!r}) has precision {pool.precision!r} (use int4 or "
                             "fp32 pools, or another constraint mode)")
    if len(sizes) > 1:
        raise ValueError("spec.rollout.pools[].quantGroupSize: deployed-penalty needs one group size across the int4 "
                         f"pools (got {sorted(sizes)})")
    if spec.trainer.gradient_checkpointing:
        raise ValueError("spec.trainer.gradientCheckpointing: not with constraint.mode deployed-penalty (the recomputed "
                         "layers would run with the unquantised weights)")
    if spec.trainer.deepspeed.enabled and spec.trainer.deepspeed.zero_stage == 3:
        raise ValueError("spec.trainer.deepspeed.zeroStage: 3 partitions the weights the deployed penalty quantises; "
                         "use zeroStage <= 2 with constraint.mode deployed-penalty")
    return sizes.pop() if sizes else None


class _TokenLogprobs(torch.nn.Module):
    """``sequence_logprobs`` as a module's forward, so ``functional_call`` can swap its weights."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, attn, pos, temperature: float) -> torch.Tensor:
        return sequence_logprobs(self.model, ids, attn, pos, temperature)


def deployed_logprobs(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                      temperature: float, group_size: Optional[int]) -> torch.Tensor:
    """[B, L−1] fp32 log π_Q(θ)(ids[:, 1:]): ``sequence_logprobs`` with every quantised weight replaced
    by its int4 straight-through version (``group_size`` None: the model's own weights)."""
    lm = getattr(model, "module", model)
    wrapper = _TokenLogprobs(lm)
    if group_size is None:
        return wrapper(ids, attn, pos, temperature)
    params = dict(lm.named_parameters())
    swapped = {f"model.{n}": int4_ste(params[n], group_size) for n in quantized_weight_names(lm)}
    return torch.func.functional_call(wrapper, swapped, (ids, attn, pos, temperature))
