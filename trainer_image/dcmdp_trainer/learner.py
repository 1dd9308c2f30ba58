"""One DC-GRPO training step on a batch of rollouts: the loop a reader finishes in one sitting.

    1. teacher-forced log π_old of every response token (no grad, weights before the update)
    2. δ_t = |π_old,t − p_inf,t|, the step's δ̄ overall and per pool, λ_t of each token's pool
    3. group-normalised advantages (advantage-shaping: Â_t − λ_t δ_t)
    4. promptsPerStep / miniBatchSize mini-batch updates of the clipped surrogate
       (+ the λ-weighted penalty, + the passive corrections' weights, + optional reference KL)
    5. the dual step on every multiplier with the step's δ̄ (dcmdp.constraint)

Every forward runs as micro-batches under ``spec.trainer.microBatchTokens`` (dcmdp_trainer.microbatch);
a mini-batch's micro-batches accumulate gradients with the mini-batch's token count as the loss
denominator, so the update is the mini-batch's whatever the budget. Log-probs come from the
selective log-softmax of dcmdp_trainer.logprobs. Model, batch and optimizer state live on
``spec.trainer.device``.

All formulas live in ``dcmdp.constraint`` and ``dcmdp.losses``; this module only arranges them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from dcmdp import losses
from dcmdp.constraint import ConstraintSet, discrepancy_stats, token_discrepancy
from dcmdp.device import resolve_device
from dcmdp.engine import Rollout
from dcmdp.generation import Generated, sample
from dcmdp.spec import DCMDPRun
from dcmdp_trainer import microbatch
from dcmdp_trainer.deployed import deployed_group_size, deployed_logprobs
from dcmdp_trainer.logprobs import sequence_logprobs


@dataclass
class Batch:
    """Rollouts laid out as padded tensors; token tensors are aligned with next-token targets."""

    ids: torch.Tensor  # [N, L] left-padded prompt+response
    attn: torch.Tensor  # [N, L]
    pos: torch.Tensor  # [N, L]
    mask: torch.Tensor  # [N, L-1] 1 where the target is a response token
    logp_inf: torch.Tensor  # [N, L-1]
    rewards: torch.Tensor  # [N]
    pool: torch.Tensor  # [N] index into pool names
    version: torch.Tensor  # [N] weight version each rollout was sampled with
    groups: list[int]  # number of sequences of each group, in order

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def to(self, device: torch.device) -> "Batch":
        move = {k: getattr(self, k).to(device) for k in ("ids", "attn", "pos", "mask", "logp_inf", "rewards", "pool",
                                                          "version")}
        return Batch(**move, groups=self.groups)


def collate(rollouts: list[Rollout], pools: list[str], pad_id: int) -> Batch:
    """Group rollouts by prompt (group-major) and pad them on the left, as they were sampled."""
    by_prompt: dict[int, list[Rollout]] = {}
    for r in rollouts:
        by_prompt.setdefault(r.prompt_index, []).append(r)
    ordered = [r for idx in by_prompt for r in by_prompt[idx]]
    groups = [len(v) for v in by_prompt.values()]
    seqs = [r.prompt_ids + r.response_ids for r in ordered]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width - 1), dtype=torch.float32)
    logp_inf = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (r, s) in enumerate(zip(ordered, seqs)):
        start = width - len(s)
        ids[i, start:] = torch.tensor(s, dtype=torch.long)
        attn[i, start:] = 1
        first_target = start + len(r.prompt_ids) - 1  # logits at j predict token j+1
        k = len(r.response_ids)
        if k:
            mask[i, first_target:first_target + k] = 1.0
            logp_inf[i, first_target:first_target + k] = torch.tensor(r.logprobs[:k], dtype=torch.float32)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    pool_index = {p: i for i, p in enumerate(pools)}
    return Batch(ids, attn, pos, mask, logp_inf,
                 torch.tensor([r.reward for r in ordered], dtype=torch.float32),
                 torch.tensor([pool_index[r.pool] for r in ordered], dtype=torch.long),
                 torch.tensor([r.version for r in ordered], dtype=torch.long), groups)


def token_logprobs(model, batch: Batch, rows: slice | torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(y_t) of every target token of ``rows`` under ``model`` (teacher-forced), [n, L−1] fp32."""
    return sequence_logprobs(model, batch.ids[rows], batch.attn[rows], batch.pos[rows], temperature)


def micro_logprobs(model, batch: Batch, mb: microbatch.MicroBatch, temperature: float) -> torch.Tensor:
    """log π of the targets of a micro-batch: [n, mb.width − 1], the last columns of the batch's [N, L−1]."""
    cols = slice(batch.width - mb.width, None)
    return sequence_logprobs(model, batch.ids[mb.rows][:, cols], batch.attn[mb.rows][:, cols],
                             batch.pos[mb.rows][:, cols], temperature)


WeightItem = tuple[str, Optional[torch.Tensor], Optional[str]]


def state_tensors(module: torch.nn.Module, hold: Optional[Callable[[torch.Tensor], Any]] = None) -> Iterator[WeightItem]:
    """``module``'s state dict one tensor at a time: ``(name, tensor, None)``, or ``(name, None,
    first)`` for a tensor tied to the earlier ``first`` (a tied LM head: yielded once). ``hold(t)``:
    a context manager kept open while the caller holds ``t`` (ZeRO-3's gather); a tensor is valid
    only until the next one is asked for."""
    seen: dict[int, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            yield name, None, seen[id(t)]
            continue
        seen[id(t)] = name
        with hold(t) if hold is not None else contextlib.nullcontext():
            yield name, t.detach(), None


class Learner:
    """The trainer's model, optimiser and multipliers; ``train_step`` is one RL step."""

    def __init__(self, run: DCMDPRun, model, pad_id: int, pools: Optional[list[str]] = None):
        spec = run.spec
        self.algo = spec.algorithm
        self.model = model
        self.pad_id = pad_id
        self.pools = pools or [p.name for p in spec.rollout.pools]
        self.device = resolve_device(spec.trainer.device, "spec.trainer.device", self.local_rank())
        self.micro_batch_tokens = spec.trainer.micro_batch_tokens
        model.to(self.device)
        # gradients left on the parameters (the warm start's last backward) would be added to the first
        # update's: every update accumulates from zero (optimizer_step and discard_gradients clear them)
        for param in model.parameters():
            param.grad = None
        if spec.trainer.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        tolerances = {p.name: spec.pool_tolerance(p) for p in spec.rollout.pools if p.name in self.pools}
        self.constraints = ConstraintSet(self.algo.constraint, tolerances)
        # constraint.mode deployed-penalty: the int4 group size, and which pools' tokens are quantised
        self.deployed = self.algo.uses_constraint and self.algo.constraint.mode == "deployed-penalty"
        self.deployed_group = deployed_group_size(spec, self.pools) if self.deployed else None
        by_name = {p.name: p for p in spec.rollout.pools}
        self.quantised_pools = torch.tensor([by_name[p].precision == "int4" if p in by_name else False
                                             for p in self.pools], dtype=torch.bool)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.algo.learning_rate,
                                           betas=tuple(self.algo.adam_betas), weight_decay=self.algo.weight_decay)
        self.autocast = spec.trainer.precision == "bf16"
        # discrepancyReference: sampled — the owner of the weight history sets this: version → weights
        # (None for the current version or one no longer kept, where π_old stands in)
        self.snapshot_of: Optional[Callable[[int], Optional[dict[str, torch.Tensor]]]] = None
        self._scratch = None
        self.reference = None
        if self.algo.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    # -- hooks a distributed wrapper (DeepSpeed) overrides ---------------------------------
    @staticmethod
    def local_rank() -> int:
        """This process's GPU among its pod's (torchrun's LOCAL_RANK; 0 alone)."""
        return int(os.environ.get("LOCAL_RANK", "0"))

    def forward_context(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def local_rows(self, batch: Batch, minibatch: slice) -> torch.Tensor:
        """The rows of ``minibatch`` this process computes (all of them alone)."""
        return torch.arange(minibatch.start, minibatch.stop)

    def weights(self) -> Iterator[WeightItem]:
        """The weights to publish, one tensor at a time (:func:`state_tensors`); consume it whole."""
        return state_tensors(getattr(self.model, "module", self.model))

    def generate(self, prompts: list[list[int]], **kwargs: Any) -> Generated:
        """``dcmdp.generation.sample`` with the trainer's own weights (evaluation), in eval mode."""
        model = getattr(self.model, "module", self.model)
        model.eval()
        return sample(model, prompts, **kwargs)

    def align(self, micro: list[microbatch.MicroBatch]) -> list[microbatch.MicroBatch]:
        """A mini-batch's micro-batches as this process runs them (a ZeRO-3 rank pads to the others' count)."""
        return micro

    def backward(self, loss: torch.Tensor, last: bool) -> bool:
        """Accumulate the gradient of one micro-batch's share of the mini-batch loss; False (nothing
        accumulated) for a non-finite loss: the caller drops the mini-batch's update."""
        if not bool(torch.isfinite(loss)):
            return False
        loss.backward()
        return True

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> float:
        """Clip, step and clear the accumulated gradients; returns the global grad norm. A non-finite
        norm is not applied (the gradients are dropped) and returned for the caller to count."""
        clip = self.algo.grad_clip if self.algo.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if bool(torch.isfinite(norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- memory-bounded passes -----------------------------------------------------------------
    def micro_batches(self, batch: Batch, rows: torch.Tensor) -> list[microbatch.MicroBatch]:
        return microbatch.plan(batch.attn.sum(-1).cpu(), rows.cpu(), self.micro_batch_tokens, batch.width)

    def logprobs(self, model, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """[N, L−1] log π of ``rows``' targets (other rows and padding 0), micro-batch by micro-batch, no grad."""
        out = torch.zeros_like(batch.logp_inf)
        with torch.no_grad(), self.forward_context():
            for mb in self.micro_batches(batch, rows):
                out[mb.rows.to(out.device), batch.width - mb.width:] = micro_logprobs(model, batch, mb,
                                                                                     self.algo.temperature)
        return out

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, rollouts: list[Rollout]) -> dict[str, Any]:
        algo, cons = self.algo, self.algo.constraint
        batch = collate(rollouts, self.pools, self.pad_id).to(self.device)
        everything = torch.arange(batch.size)

        # 1. π_old: the trainer's probabilities before the update (detached)
        self.model.eval()
        logp_old = self.logprobs(self.model, batch, everything)
        logp_ref = self.logprobs(self.reference, batch, everything) if self.reference else None

        # 2. discrepancy (p_train = π_old, or the sampled version's) and each token's pool multiplier
        logp_train = logp_old
        if algo.discrepancy_reference == "sampled" and self.snapshot_of is not None:
            logp_train = self._sampled_version_logprobs(batch, logp_old)
        delta = losses.masked(token_discrepancy(logp_train, batch.logp_inf), batch.mask)
        run_stats = discrepancy_stats(logp_train, batch.logp_inf, batch.mask)
        pool_stats: dict[str, dict[str, float]] = {}
        for i, name in enumerate(self.pools):
            rows = batch.pool == i
            if rows.any():
                pool_stats[name] = discrepancy_stats(logp_train[rows], batch.logp_inf[rows], batch.mask[rows])
                pool_stats[name]["reward_mean"] = float(batch.rewards[rows].mean())
        use_constraint = algo.uses_constraint
        lam_by_pool = torch.tensor([self.constraints.pools[p].value for p in self.pools], dtype=torch.float32,
                                   device=self.device)
        lam_tok = (losses.masked(lam_by_pool[batch.pool][:, None].expand_as(batch.mask), batch.mask) if use_constraint
                   else torch.zeros_like(batch.mask))
        # c of each token's pool (0 while `tolerance: auto` calibrates), for the per-token hinge form
        tol_by_pool = torch.tensor([self.constraints.pools[p].tolerance or 0.0 for p in self.pools], dtype=torch.float32,
                                   device=self.device)
        tol_tok = tol_by_pool[batch.pool][:, None].expand_as(batch.mask)

        # 3. advantages (and shaping)
        adv = losses.group_advantages(batch.rewards, batch.groups, std=algo.advantage_std)
        adv = adv[:, None].expand_as(batch.mask).contiguous()
        if use_constraint and cons.mode == "advantage-shaping":
            adv = losses.shape_advantages(adv, delta, lam_tok)
        weights = keep = None
        if algo.active_corrections:
            weights, keep = losses.importance_weights(logp_old, batch.logp_inf, algo.active_corrections,
                                                      cap=algo.importance_cap, low=algo.icepop_low,
                                                      high=algo.icepop_high, mis_low=algo.mis_low,
                                                      level=algo.correction_level, mask=batch.mask)
        # the tokens the policy loss counts (lossDenominator); its denominator spans a whole mini-batch
        counted = keep if keep is not None and algo.loss_denominator == "kept" else batch.mask

        # 4. mini-batch updates, split at group boundaries; each accumulates its micro-batches' gradients
        #    with the whole mini-batch's token count as the denominator (the mini-batch's token mean)
        self.model.train()
        sums: dict[str, float] = {"loss/policy": 0.0, "loss/constraint": 0.0, "constraint/penalty": 0.0,
                                  "loss/kl": 0.0, "loss/total": 0.0, "optim/grad_norm": 0.0, "optim/clip_frac": 0.0}
        skipped = 0  # updates not applied: non-finite loss or gradient norm
        chunks = self._minibatches(batch)
        for chunk in chunks:
            # computed once over the whole mini-batch (every rank's rows): each micro-batch's loss is its share
            denominator = losses.aggregation_denominator(counted[chunk], algo.loss_aggregation)
            tokens = losses.aggregation_denominator(batch.mask[chunk])
            counted_tokens = losses.aggregation_denominator(counted[chunk])
            micro = self.align(self.micro_batches(batch, self.local_rows(batch, chunk)))
            part_sums = dict.fromkeys(sums, 0.0)
            finite = True
            for k, mb in enumerate(micro):
                cols = slice(batch.width - mb.width, None)

                def part(x: torch.Tensor) -> torch.Tensor:
                    return x[mb.rows.to(x.device)][:, cols]

                with self.forward_context():
                    logp = micro_logprobs(self.model, batch, mb, algo.temperature)
                if mb.idle:  # only keeps this rank's passes in step with the others': no gradient, no metrics
                    self.backward((logp * 0).sum(), last=k == len(micro) - 1)
                    continue
                m = part(batch.mask)
                pg, info = losses.clipped_surrogate(
                    logp, part(logp_old), part(adv), part(counted), algo.clip_low, algo.clip_high,
                    None if weights is None else part(weights), dual_clip=algo.dual_clip,
                    log_ratio_clamp=algo.log_ratio_clamp, aggregation=algo.loss_aggregation,
                    denominator=denominator, constant=algo.loss_aggregation_constant)
                loss = pg
                c_loss = penalty = kl = torch.zeros((), device=self.device)
                if self.deployed:
                    c_loss, penalty = self._deployed_penalty(batch, mb, logp, part(lam_tok), m, tokens)
                    loss = loss + c_loss
                elif use_constraint and cons.mode != "advantage-shaping":
                    c_loss, penalty = losses.constraint_penalty(logp, part(batch.logp_inf), part(lam_tok), m, cons.mode,
                                                                part(tol_tok), log_ratio_clamp=algo.log_ratio_clamp,
                                                                denominator=tokens)
                    loss = loss + c_loss
                if logp_ref is not None:
                    kl = losses.reference_kl(logp, part(logp_ref), m, log_ratio_clamp=algo.log_ratio_clamp,
                                             denominator=tokens)
                    loss = loss + algo.kl_coef * kl
                if not self.backward(loss, last=k == len(micro) - 1):
                    finite = False
                    break
                for key, val in (("loss/policy", pg), ("loss/constraint", c_loss), ("constraint/penalty", penalty),
                                 ("loss/kl", kl), ("loss/total", loss)):
                    part_sums[key] += float(val.detach())
                part_sums["optim/clip_frac"] += info["clip_frac"] * float(part(counted).bool().sum()) / counted_tokens
            if not finite:  # a non-finite loss: this mini-batch's update is not applied
                self.discard_gradients()
                skipped += 1
                continue
            norm = self.optimizer_step()
            if not math.isfinite(norm):
                skipped += 1
                continue
            part_sums["optim/grad_norm"] = norm
            for key, val in part_sums.items():
                sums[key] += val

        # 5. the dual step (the λ logged below is the one applied in this step)
        applied = {p: self.constraints.pools[p].value for p in self.pools}
        run_applied = self.constraints.run.value
        tolerances = {p: self.constraints.pools[p].tolerance for p in self.pools}
        run_tolerance = self.constraints.run.tolerance
        if use_constraint:
            self.constraints.update(run_stats["prob_diff_mean"], {p: s["prob_diff_mean"] for p, s in pool_stats.items()})

        row: dict[str, Any] = {k: v / max(1, len(chunks) - skipped) for k, v in sums.items()}
        row["optim/skipped_updates"] = skipped
        row.update({
            "reward/mean": float(batch.rewards.mean()),
            "reward/std": float(batch.rewards.std(unbiased=False)),
            "response/length_mean": float(batch.mask.sum(-1).mean()),
            "rollouts": batch.size,
            "constraint/run_lambda": run_applied if use_constraint else 0.0,  # applied to no token with 2+ pools
            "constraint/tolerance": run_tolerance,
            "constraint/run_lambda_next": self.constraints.run.value if use_constraint else 0.0,
        })
        row.update({f"discrepancy/{k}": v for k, v in run_stats.items() if k != "tokens"})
        row["discrepancy/tokens"] = run_stats["tokens"]
        if logp_train is not logp_old:  # what δ̄ would be against the current weights (staleness included)
            row["discrepancy/prob_diff_mean_vs_current"] = discrepancy_stats(logp_old, batch.logp_inf, batch.mask)["prob_diff_mean"]
        if weights is not None:
            row["correction/weight_mean"] = float(losses.masked_mean(weights, batch.mask))
            row["correction/masked_frac"] = float(1 - losses.masked_mean(keep.float(), batch.mask))
        for p, s in pool_stats.items():
            row[f"pool/{p}/discrepancy/prob_diff_mean"] = s["prob_diff_mean"]
            row[f"pool/{p}/discrepancy/prob_diff_max"] = s["prob_diff_max"]
            row[f"pool/{p}/discrepancy/k3_kl"] = s["k3_kl"]
            row[f"pool/{p}/discrepancy/tokens"] = s["tokens"]
            row[f"pool/{p}/reward/mean"] = s["reward_mean"]
            row[f"pool/{p}/constraint/lambda"] = applied[p] if use_constraint else 0.0
            row[f"pool/{p}/constraint/tolerance"] = tolerances[p]
        return row

    def _deployed_penalty(self, batch: Batch, mb: microbatch.MicroBatch, logp: torch.Tensor, lam: torch.Tensor,
                          mask: torch.Tensor, tokens: float) -> tuple[torch.Tensor, torch.Tensor]:
        """λ · mean_t |π_θ − π_Q(θ)| of a micro-batch (dcmdp.losses.deployed_penalty); rows of pools
        whose engine does not quantise (fp32) use π_Q = π_θ."""
        cols = slice(batch.width - mb.width, None)
        rows = mb.rows.to(batch.ids.device)
        with self.forward_context():
            logp_q = deployed_logprobs(self.model, batch.ids[rows][:, cols], batch.attn[rows][:, cols],
                                       batch.pos[rows][:, cols], self.algo.temperature, self.deployed_group)
        quantised = self.quantised_pools.to(batch.pool.device)[batch.pool[rows]][:, None]
        logp_q = torch.where(quantised.to(logp.device), logp_q, logp)
        return losses.deployed_penalty(logp, logp_q, lam, mask, denominator=tokens)

    def _sampled_version_logprobs(self, batch: Batch, logp_old: torch.Tensor) -> torch.Tensor:
        """log p_train of each rollout under the weights it was sampled with, where still kept."""
        out = logp_old.clone()
        for version in batch.version.unique().tolist():
            weights = self.snapshot_of(int(version)) if self.snapshot_of else None
            if weights is None:
                continue
            if self._scratch is None:
                self._scratch = copy.deepcopy(self.model).eval()
            self._scratch.load_state_dict(weights)
            rows = (batch.version == version).nonzero().squeeze(-1)
            out[rows] = self.logprobs(self._scratch, batch, rows)[rows]
        return out

    def _minibatches(self, batch: Batch) -> list[slice]:
        """promptsPerStep / miniBatchSize slices of whole groups (fewer if fewer groups came)."""
        n_mb = max(1, min(len(batch.groups), self.algo.prompts_per_step // self.algo.mini_batch_size))
        per = math.ceil(len(batch.groups) / n_mb)
        out, start = [], 0
        for i in range(0, len(batch.groups), per):
            size = sum(batch.groups[i:i + per])
            out.append(slice(start, start + size))
            start += size
        return out

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "constraints": self.constraints.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.constraints.load_state_dict(state["constraints"])
