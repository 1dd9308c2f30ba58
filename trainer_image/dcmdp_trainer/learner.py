"""One DC-GRPO training step on a batch of rollouts: the loop a reader finishes in one sitting.

    1. teacher-forced log π_old of every response token (no grad, weights before the update)
    2. δ_t = |π_old,t − p_inf,t|, the step's δ̄ overall and per pool, λ_t of each token's pool
    3. group-normalised advantages (advantage-shaping: Â_t − λ_t δ_t)
    4. promptsPerStep / miniBatchSize mini-batch updates of the clipped surrogate
       (+ the λ-weighted penalty, + the passive corrections' weights, + optional reference KL)
    5. the dual step on every multiplier with the step's δ̄ (dcmdp.constraint)

All formulas live in ``dcmdp.constraint`` and ``dcmdp.losses``; this module only arranges them.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from dcmdp import losses
from dcmdp.constraint import ConstraintSet, discrepancy_stats, token_discrepancy
from dcmdp.engine import Rollout
from dcmdp.spec import DCMDPRun


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
    """log π(y_t) of every target token of ``rows`` under ``model`` (teacher-forced)."""
    out = model(input_ids=batch.ids[rows], attention_mask=batch.attn[rows], position_ids=batch.pos[rows], use_cache=False)
    logits = out.logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, batch.ids[rows, 1:, None]).squeeze(-1)


class Learner:
    """The trainer's model, optimiser and multipliers; ``train_step`` is one RL step."""

    def __init__(self, run: DCMDPRun, model, pad_id: int, pools: Optional[list[str]] = None):
        spec = run.spec
        self.algo = spec.algorithm
        self.model = model
        self.pad_id = pad_id
        self.pools = pools or [p.name for p in spec.rollout.pools]
        tolerances = {p.name: spec.pool_tolerance(p) for p in spec.rollout.pools if p.name in self.pools}
        self.constraints = ConstraintSet(self.algo.constraint, tolerances)
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
    def forward_context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def backward_and_step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.algo.grad_clip if self.algo.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        return float(norm)

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, rollouts: list[Rollout]) -> dict[str, Any]:
        algo, cons = self.algo, self.algo.constraint
        batch = collate(rollouts, self.pools, self.pad_id)
        everything = slice(0, batch.size)

        # 1. π_old: the trainer's probabilities before the update (detached)
        self.model.eval()
        with torch.no_grad(), self.forward_context():
            logp_old = token_logprobs(self.model, batch, everything, algo.temperature)
            logp_ref = token_logprobs(self.reference, batch, everything, algo.temperature) if self.reference else None

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
        lam_by_pool = torch.tensor([self.constraints.pools[p].value for p in self.pools], dtype=torch.float32)
        lam_tok = (losses.masked(lam_by_pool[batch.pool][:, None].expand_as(batch.mask), batch.mask) if use_constraint
                   else torch.zeros_like(batch.mask))
        # c of each token's pool (0 while `tolerance: auto` calibrates), for the per-token hinge form
        tol_by_pool = torch.tensor([self.constraints.pools[p].tolerance or 0.0 for p in self.pools], dtype=torch.float32)
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

        # 4. mini-batch updates, split at group boundaries
        self.model.train()
        sums: dict[str, float] = {"loss/policy": 0.0, "loss/constraint": 0.0, "constraint/penalty": 0.0,
                                  "loss/kl": 0.0, "loss/total": 0.0, "optim/grad_norm": 0.0, "optim/clip_frac": 0.0}
        chunks = self._minibatches(batch)
        for rows in chunks:
            with self.forward_context():
                logp = token_logprobs(self.model, batch, rows, algo.temperature)
            m = batch.mask[rows]
            pg, info = losses.clipped_surrogate(
                logp, logp_old[rows], adv[rows], counted[rows], algo.clip_low, algo.clip_high,
                None if weights is None else weights[rows], dual_clip=algo.dual_clip,
                log_ratio_clamp=algo.log_ratio_clamp, aggregation=algo.loss_aggregation,
                denominator=losses.aggregation_denominator(counted[rows], algo.loss_aggregation),
                constant=algo.loss_aggregation_constant)
            loss = pg
            c_loss = torch.zeros(())
            penalty = torch.zeros(())
            if use_constraint and cons.mode != "advantage-shaping":
                c_loss, penalty = losses.constraint_penalty(logp, batch.logp_inf[rows], lam_tok[rows], m, cons.mode,
                                                            tol_tok[rows], log_ratio_clamp=algo.log_ratio_clamp)
                loss = loss + c_loss
            kl = torch.zeros(())
            if logp_ref is not None:
                kl = losses.reference_kl(logp, logp_ref[rows], m, log_ratio_clamp=algo.log_ratio_clamp)
                loss = loss + algo.kl_coef * kl
            norm = self.backward_and_step(loss)
            for key, val in (("loss/policy", pg), ("loss/constraint", c_loss), ("constraint/penalty", penalty),
                             ("loss/kl", kl), ("loss/total", loss)):
                sums[key] += float(val.detach())
            sums["optim/grad_norm"] += norm
            sums["optim/clip_frac"] += info["clip_frac"]

        # 5. the dual step (the λ logged below is the one applied in this step)
        applied = {p: self.constraints.pools[p].value for p in self.pools}
        run_applied = self.constraints.run.value
        tolerances = {p: self.constraints.pools[p].tolerance for p in self.pools}
        run_tolerance = self.constraints.run.tolerance
        if use_constraint:
            self.constraints.update(run_stats["prob_diff_mean"], {p: s["prob_diff_mean"] for p, s in pool_stats.items()})

        row: dict[str, Any] = {k: v / len(chunks) for k, v in sums.items()}
        row.update({
            "reward/mean": float(batch.rewards.mean()),
            "reward/std": float(batch.rewards.std(unbiased=False)),
            "response/length_mean": float(batch.mask.sum(-1).mean()),
            "rollouts": batch.size,
            "constraint/lambda": run_applied if use_constraint else 0.0,
            "constraint/tolerance": run_tolerance,
            "constraint/lambda_next": self.constraints.run.value if use_constraint else 0.0,
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
            with torch.no_grad(), self.forward_context():
                out[rows] = token_logprobs(self._scratch, batch, rows, self.algo.temperature)
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
