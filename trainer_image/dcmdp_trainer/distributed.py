"""DeepSpeed ZeRO data parallelism for the trainer: ``replicas × gpusPerReplica`` ranks (``dcmdp.ranks``), one learner.

Rank 0 is the trainer process of the runtime (gRPC server, coordinator, checkpoints); ranks
1..N-1 follow it. Each step rank 0 broadcasts the step's rollouts; every rank computes π_old, δ
and the advantages on the whole batch (so every rank makes the same dual update and holds the same
λ), then takes its contiguous share of each mini-batch, as micro-batches under
``spec.trainer.microBatchTokens`` (gradients accumulated, DeepSpeed's boundary set on the last).
A rank's loss is its tokens' sum over the whole mini-batch's token count, scaled by ``world``
before DeepSpeed averages the gradients, so the averaged gradient is exactly the gradient of the
token mean over the whole mini-batch: N ranks take the same step as one
(``tests/test_deepspeed.py``). Gradient clipping is DeepSpeed's, on the global norm. The loss keys
in the metrics are summed over ranks: the mini-batch's.

ZeRO stages 0–3. Stage 3 partitions the parameters themselves: every forward and backward gathers
a layer's parameters as it runs, so every rank runs the same number of micro-batch passes (a rank
with fewer pads with idle passes whose loss is 0). Publishing (and a checkpoint's model) gathers
the weights one parameter at a time (``deepspeed.zero.GatheredParameters``, every rank joining
each gather), handing each to the caller, who copies it to the host, before the next: no device
ever holds more than one gathered parameter beyond its partition (:meth:`DeepSpeedLearner.weights`).
Stage 3 refuses ``algorithm.klCoef > 0``, ``discrepancyReference: sampled`` and
``constraint.mode: deployed-penalty``: their reference, scratch and quantised models would be whole
replicas on every rank. Checkpoints: rank 0 gathers every rank's
optimizer partition (stage 3: with its fp32 master partition) into its checkpoint; on resume it
broadcasts the checkpoint and every rank loads its own partition.

Environment: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (torch.distributed's);
backend gloo on CPU, NCCL on GPU. ``TORCH_EXTENSIONS_DIR`` keeps DeepSpeed's JIT builds (the CPU
shm op, ~22 s once per machine) in ``.cache/torch_extensions`` unless set.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import torch

from dcmdp.spec import DCMDPRun
from dcmdp_trainer import microbatch
from dcmdp_trainer.learner import Learner, state_tensors

LOSS_KEYS = ("loss/policy", "loss/constraint", "constraint/penalty", "loss/kl", "loss/total", "optim/clip_frac")


class DistributedError(RuntimeError):
    pass


def zero_stage(run: DCMDPRun) -> int:
    """``spec.trainer.deepspeed.zeroStage`` when enabled; else 0: more than one rank
    (``dcmdp.ranks.world_size``) without DeepSpeed asked for is plain data parallelism (the
    gradients all-reduced, every rank a whole optimizer)."""
    ds = run.spec.trainer.deepspeed
    return ds.zero_stage if ds.enabled else 0


def unsupported(run: DCMDPRun, world: int) -> Optional[str]:
    """Why ``run`` cannot train over ``world`` ranks, or None. ``discrepancyReference: sampled``
    needs the weight history, which only rank 0 keeps: the other ranks would compute δ against
    π_old on their rows, and so take a different step."""
    if world > 1 and run.spec.algorithm.discrepancy_reference == "sampled":
        return (f"spec.algorithm.discrepancyReference: sampled is not supported over {world} trainer ranks "
                "(only rank 0 keeps the weight history); use current, or one rank "
                "(trainer.replicas × gpusPerReplica = 1)")
    return None


def init_distributed(run: DCMDPRun, log=None) -> None:
    """Join the process group (idempotent)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
    ds = run.spec.trainer.deepspeed
    if ds.enabled and ds.zero_stage == 3:
        algo = run.spec.algorithm
        if algo.kl_coef > 0:
            raise DistributedError("spec.algorithm.klCoef > 0 needs a whole reference model on every rank: not "
                                   "with spec.trainer.deepspeed.zeroStage 3 (use klCoef 0 or zeroStage ≤ 2)")
        if algo.constraint.mode == "deployed-penalty":
            raise DistributedError("spec.algorithm.constraint.mode: deployed-penalty swaps in quantised copies of "
                                   "whole weights: not with spec.trainer.deepspeed.zeroStage 3 (use zeroStage ≤ 2)")
        if algo.discrepancy_reference == "sampled":
            raise DistributedError("spec.algorithm.discrepancyReference: sampled needs whole older weights on every "
                                   "rank: not with spec.trainer.deepspeed.zeroStage 3 (use current or zeroStage ≤ 2)")
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(var, default)
    os.environ.setdefault("LOCAL_RANK", "0")  # torchrun sets it; without it DeepSpeed looks for MPI
    backend = "nccl" if torch.cuda.is_available() and run.spec.trainer.device != "cpu" else "gloo"
    if backend == "nccl":  # DeepSpeed places the engine on the current device: this rank's GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if log:
        log.info("process group joined", extra={"fields": {"rank": dist.get_rank(), "world": dist.get_world_size(),
                                                           "backend": backend, "zero_stage": zero_stage(run)}})


def leave_distributed() -> None:
    """Leave the process group (idempotent; every rank, after its last collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``. A process that never joined a process group exits normally
    (``sys.exit``). A rank that did leaves it, flushes the logs and standard streams, then calls
    ``os._exit(code)``, skipping the interpreter's teardown.

    Why not a plain ``sys.exit``: DeepSpeed's engine keeps the gloo group alive past
    ``destroy_process_group``, so the group's worker threads are still running when the interpreter
    finalises. A worker that drops the last reference to a finished collective's tensors then needs
    the GIL, which a finalising interpreter refuses by ending the thread; the forced unwind crosses a
    noexcept destructor and the process aborts ("terminate called without an active exception",
    SIGABRT, seen in about 1 of 4 two-rank runs on a loaded machine: a clean exit or a pod's 143
    became -6). Everything a rank writes (metrics, checkpoints, the JSON log) is closed before this
    is called."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    leave_distributed()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class DeepSpeedLearner(Learner):
    """The DC-GRPO learner with its model and optimizer inside a DeepSpeed engine."""

    def __init__(self, run: DCMDPRun, model, pad_id: int, pools: Optional[list[str]] = None):
        import deepspeed
        import torch.distributed as dist

        super().__init__(run, model, pad_id, pools)
        self.stage = zero_stage(run)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if self.algo.grad_clip > 0 and self.stage > 0:  # stage 0: clipped in optimizer_step
            config["gradient_clipping"] = self.algo.grad_clip
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        self.engine, self.module = engine, model
        self.model = engine  # forward, eval() and train() go through the engine
        self.optimizer = optimizer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.reference is not None and self.rank > 0:
            # the KL reference is rank 0's model as the learner starts (a follower builds its own,
            # without the warm start): the weights DeepSpeed's engine just broadcast from rank 0
            self.reference.load_state_dict(self.module.state_dict())

    # -- rank 0 drives, the others follow ----------------------------------------------------------
    def _broadcast(self, obj: Any = None) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def train_step(self, rollouts):
        if self.world > 1 and self.rank == 0:
            self._broadcast(("train", rollouts))
        return self._train_local(rollouts)

    def _train_local(self, rollouts) -> dict[str, Any]:
        import torch.distributed as dist

        row = super().train_step(rollouts)
        if self.world > 1:  # each rank's share of every mini-batch mean: their sum is the mean
            local = torch.tensor([row[k] for k in LOSS_KEYS], dtype=torch.float64, device=self.device)
            dist.all_reduce(local)
            row.update({k: float(v) for k, v in zip(LOSS_KEYS, local)})
        return row

    def follow(self) -> int:
        """Ranks > 0: do what rank 0 broadcasts until it says stop; returns the steps trained."""
        steps = 0
        while True:
            kind, payload = self._broadcast()
            if kind == "train":
                self._train_local(payload)
                steps += 1
            elif kind == "generate":
                self.generate(payload[0], **payload[1])
            elif kind == "weights":
                for _ in self._gathered():
                    pass
            elif kind == "state":
                self._model_state()
                self._gather_optimizer()
            elif kind == "load":
                self._load_local(payload)
            elif kind == "stop":
                return steps
            else:
                raise DistributedError(f"unknown command from rank 0: {kind!r}")

    def shutdown(self) -> None:
        if self.world > 1 and self.rank == 0:
            self._broadcast(("stop", None))

    # -- the hooks of Learner -----------------------------------------------------------------------
    def local_rows(self, batch, minibatch: slice) -> torch.Tensor:
        """This rank's contiguous share of a mini-batch."""
        n = minibatch.stop - minibatch.start
        if n < self.world:
            raise DistributedError(f"a mini-batch of {n} sequences cannot be split over {self.world} ranks "
                                   "(raise miniBatchSize or groupSize, or lower trainer.replicas × gpusPerReplica, "
                                   "which defaults to the template's nvidia.com/gpu limit)")
        return torch.arange(minibatch.start + n * self.rank // self.world,
                            minibatch.start + n * (self.rank + 1) // self.world)

    def forward_context(self):
        """What ``engine.forward`` does first (our passes call the model's decoder and head, not the
        engine): the ZeRO optimizer counts the previous backward as a micro-step (stage 3 otherwise
        overwrites the accumulated gradient with each micro-batch's) and clears its per-pass flags."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer  # optional and heavy: only with DeepSpeed

        if isinstance(self.optimizer, ZeROOptimizer):
            self.optimizer.clear_backward_seen_flag()
        return super().forward_context()

    def align(self, micro: list[microbatch.MicroBatch]) -> list[microbatch.MicroBatch]:
        """ZeRO-3 over several ranks: as many passes as the rank with the most (every pass gathers
        each layer's parameters from every rank), the extra ones idle."""
        if self.stage != 3 or self.world == 1:
            return micro
        import torch.distributed as dist

        most = torch.tensor([len(micro)], dtype=torch.int64, device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        idle = microbatch.MicroBatch(micro[-1].rows[:1], micro[-1].width, idle=True)
        return micro + [idle] * (int(most) - len(micro))

    def backward(self, loss: torch.Tensor, last: bool) -> bool:
        """× world: DeepSpeed averages the ranks' gradients, the mini-batch mean is their sum. Every
        rank takes part in every backward (a rank skipping alone would leave the others waiting)."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world)
        return True

    def optimizer_step(self) -> float:
        """Stages 1–2: DeepSpeed's step and global norm. Stage 0 (plain data parallelism): DeepSpeed
        clips without reporting the norm, so the learner's own step runs on the gradients the
        engine's backward all-reduced (every rank the same norm)."""
        if self.stage == 0:
            return super().optimizer_step()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def generate(self, prompts: list[list[int]], **kwargs: Any):
        """As :meth:`Learner.generate`; under ZeRO-3 every rank runs it (each forward gathers layers
        from all ranks): rank 0 tells the others. Greedy or seeded, every rank takes the same steps."""
        if self.stage == 3 and self.world > 1 and self.rank == 0:
            self._broadcast(("generate", (prompts, kwargs)))
        return super().generate(prompts, **kwargs)

    # -- weights, one parameter at a time -----------------------------------------------------------
    def weights(self) -> Iterator[tuple[str, Optional[torch.Tensor], Optional[str]]]:
        """As :meth:`Learner.weights`; under ZeRO-3 each parameter is gathered (every rank joining:
        rank 0 tells the others) for as long as the caller holds it, then released. Consume it whole."""
        if self.stage != 3:
            yield from super().weights()
            return
        if self.world > 1 and self.rank == 0:
            self._broadcast(("weights", None))
        yield from self._gathered()

    def _gathered(self) -> Iterator[tuple[str, Optional[torch.Tensor], Optional[str]]]:
        import deepspeed

        def hold(t: torch.Tensor):  # a partitioned parameter is gathered; buffers are whole on every rank
            return deepspeed.zero.GatheredParameters([t], modifier_rank=None) if hasattr(t, "ds_id") else nullcontext()

        return state_tensors(self.module, hold)

    def _model_state(self) -> dict[str, torch.Tensor]:
        """The model's weights on the host (ZeRO-3: gathered one parameter at a time; ties kept)."""
        if self.stage != 3:
            return self.module.state_dict()
        out: dict[str, torch.Tensor] = {}
        for name, t, same_as in self._gathered():
            out[name] = out[same_as] if same_as is not None else t.detach().to("cpu", copy=True)
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def _optimizer_state(self) -> dict[str, Any]:
        import deepspeed

        sd = self.optimizer.state_dict()
        if self.stage in (1, 2):
            sd["ds_version"] = deepspeed.__version__
        return sd

    def _gather_optimizer(self) -> Optional[list[dict[str, Any]]]:
        import torch.distributed as dist

        parts: Optional[list] = [None] * self.world if self.rank == 0 else None
        dist.gather_object(self._optimizer_state(), parts, dst=0)
        return parts

    def state_dict(self) -> dict[str, Any]:
        """Rank 0: the model, every rank's optimizer partition, the multipliers."""
        if self.world > 1:
            self._broadcast(("state", None))
            model = self._model_state()
            parts = self._gather_optimizer()
        else:
            model = self._model_state()
            parts = [self._optimizer_state()]
        return {"model": model, "optimizer": {"deepspeed_stage": self.stage, "ranks": parts},
                "constraints": self.constraints.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.world > 1 and self.rank == 0:
            self._broadcast(("load", state))
        self._load_local(state)

    def _load_local(self, state: dict[str, Any]) -> None:
        opt = state["optimizer"]
        if not (isinstance(opt, dict) and "ranks" in opt):
            raise DistributedError("this checkpoint was written without DeepSpeed; resume it with "
                                   "spec.trainer.deepspeed.enabled: false")
        if opt["deepspeed_stage"] != self.stage or len(opt["ranks"]) != self.world:
            raise DistributedError(f"checkpoint of ZeRO stage {opt['deepspeed_stage']} over {len(opt['ranks'])} ranks; "
                                   f"this run has stage {self.stage} over {self.world}: keep them equal to resume")
        if self.stage == 3:  # each rank's fp32 master partition restores its share of the weights
            self.optimizer.load_state_dict(opt["ranks"], load_optimizer_states=True)
            self.constraints.load_state_dict(state["constraints"])
            return
        self.module.load_state_dict(state["model"])
        if self.stage in (1, 2):
            self.optimizer.load_state_dict(opt["ranks"], load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(opt["ranks"][0])
        self.constraints.load_state_dict(state["constraints"])


def session_kwargs(run: DCMDPRun) -> dict[str, Any]:
    """Session arguments of rank 0: build its learner inside DeepSpeed."""
    return {"learner_factory": DeepSpeedLearner}


def follow(run: DCMDPRun, out: Path, *, resume: bool, steps: Optional[int], threads: int, log) -> int:
    """A rank > 0: build the same model and learner, then train whatever rank 0 broadcasts."""
    from dcmdp.models.tiny import build_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(run.spec.algorithm.seed)
    model, tokenizer = build_model(run.spec.model, seed=run.spec.algorithm.seed)
    learner = DeepSpeedLearner(run, model, tokenizer.pad_token_id, [p.name for p in run.spec.rollout.pools])
    log.info("following rank 0", extra={"fields": {"rank": learner.rank, "world": learner.world}})
    trained = learner.follow()
    log.info("rank done", extra={"fields": {"steps": trained}})
    return 0
