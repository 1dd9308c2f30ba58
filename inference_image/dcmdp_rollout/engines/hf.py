"""The Hugging Face engine: transformers models sampled with a KV cache at the pool's precision.

Precisions (``dcmdp.precision`` says what each means): float ones cast the weights and
activations to their ``compute`` dtype; a quantising one serves a copy of the fp32 master weights
through its ``quantisation``'s quantiser (:data:`QUANTISERS`), redone after every update:
``int8-dynamic`` (torch's ``quantize_dynamic`` of every Linear, CPU kernels), ``fp8-e4m3``
(*emulated*: Linear weights rounded through float8-e4m3 with a per-output-channel scale, compute
in fp32 — the weight error of an FP8 checkpoint, not its kernels) and ``int4-rtn`` (*emulated*:
weight-only round-to-nearest int4, group-wise with ``quant_group_size`` weights per group, of
every decoder Linear — embedding and LM head kept — by :mod:`dcmdp.int4`, the quantiser the
trainer's ``deployed-penalty`` reproduces; compute in fp32). ``noise`` adds Gaussian
logit noise of that σ before sampling, to emulate a worse engine at a chosen mismatch level.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterable, Mapping

import torch

from dcmdp.device import resolve_device
from dcmdp.engine import EngineError, Sample, SamplingParams
from dcmdp.generation import sample
from dcmdp.int4 import DEFAULT_GROUP_SIZE, int4_roundtrip_model_
from dcmdp.precision import PRECISIONS, TORCH_DTYPES, precision as precision_of


def fp8_roundtrip_(model: torch.nn.Module) -> None:
    """Round every Linear weight through float8-e4m3 with a per-row absmax scale (in place)."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / fmax
                w.copy_((w / scale).to(torch.float8_e4m3fn).to(w.dtype) * scale)


def int8_dynamic(master: torch.nn.Module, group_size: int = 0) -> torch.nn.Module:
    """A copy of ``master`` with every Linear dynamically quantised to int8 (CPU kernels)."""
    with warnings.catch_warnings():  # torch deprecates the quantized-tensor API, still the CPU int8 path
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(master), {torch.nn.Linear}, dtype=torch.qint8)


def fp8_e4m3(master: torch.nn.Module, group_size: int = 0) -> torch.nn.Module:
    """A copy of ``master`` with its Linear weights rounded through float8-e4m3 (:func:`fp8_roundtrip_`)."""
    model = copy.deepcopy(master)
    fp8_roundtrip_(model)
    return model


def int4_rtn(master: torch.nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> torch.nn.Module:
    """A copy of ``master`` with every decoder Linear weight replaced by its group-wise int4 round
    trip (:func:`dcmdp.int4.int4_roundtrip_model_`, ``group_size`` weights per group)."""
    model = copy.deepcopy(master)
    int4_roundtrip_model_(model, group_size)
    return model


# quantisation kind (``dcmdp.precision.Precision.quantisation``) -> quantiser of the fp32 master
# (its second argument: the pool's quantGroupSize, used by the group-wise kinds)
QUANTISERS: dict[str, Callable[[torch.nn.Module, int], torch.nn.Module]] = {
    "int8-dynamic": int8_dynamic,
    "fp8-e4m3": fp8_e4m3,
    "int4-rtn": int4_rtn,
}


class HFEngine:
    name = "hf"

    def __init__(self, model_dir: str, precision: str = "fp32", noise: float = 0.0, seed: int = 0,
                 threads: int = 0, device: str = "cpu", quant_group_size: int = DEFAULT_GROUP_SIZE, **_: object):
        from transformers import AutoModelForCausalLM

        from dcmdp.models.tokenizer import load_tokenizer

        if precision not in PRECISIONS:
            raise EngineError(f"hf engine: unsupported precision {precision!r} ({', '.join(PRECISIONS)})")
        if int(quant_group_size) < 1:
            raise EngineError(f"hf engine: quantGroupSize must be >= 1, got {quant_group_size}")
        self.quant_group_size = int(quant_group_size)
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device, "spec.rollout.pools[].device")
        self.spec = precision_of(precision)
        if self.spec.hf_cpu_only and self.device.type != "cpu":
            others = "/".join(n for n, p in PRECISIONS.items() if p.quantisation and not p.hf_cpu_only)
            raise EngineError(f"hf engine: {precision} ({self.spec.quantisation} quantisation) runs on the CPU "
                              f"only: set the pool's device: cpu, or precision {others or 'bf16'}/bf16")
        self.precision, self.noise, self.seed = precision, float(noise), seed
        self.tokenizer = load_tokenizer(model_dir)
        self.master = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False).eval().to(self.device)
        self.version = 0
        self.model = self._serving_model()

    def _serving_model(self) -> torch.nn.Module:
        if self.spec.quantisation is not None:
            return QUANTISERS[self.spec.quantisation](self.master, self.quant_group_size).eval()
        if self.spec.compute == "fp32":
            return self.master
        return copy.deepcopy(self.master).to(getattr(torch, TORCH_DTYPES[self.spec.compute])).eval()

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        self.begin_update()
        self.load_partial(state_dict.items())
        self.finish_update(version)

    # -- streaming update: tensors copied in place as their bucket arrives -------------------------
    def begin_update(self) -> None:
        """Start an update; until :meth:`finish_update` the engine must not sample (the worker fences it)."""
        self._target = self.master.state_dict()  # tensors sharing the parameters' storage
        self._seen: set[str] = set()
        self._unexpected: list[str] = []
        self._filled: dict[str, int] = {}  # elements written so far, by tensor (load_slices)

    def load_partial(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (and cast) each (name, tensor) into the master weights in place."""
        with torch.no_grad():
            for name, t in pairs:
                dst = self._target.get(name)
                if dst is None or dst.shape != t.shape:
                    self._unexpected.append(name)
                    continue
                dst.copy_(t)
                self._seen.add(name)

    def load_slices(self, slices: Iterable) -> None:
        """Copy (and cast) each :class:`~dcmdp.transport.buckets.Slice` (a run of a tensor's
        flattened elements, a view of the bucket) straight into the master weights in place: a
        tensor spanning buckets is never assembled first. A tensor counts as loaded once all its
        elements have arrived."""
        with torch.no_grad():
            for sl in slices:
                dst = self._target.get(sl.name)
                n = sl.values.numel()
                if dst is None or tuple(dst.shape) != tuple(sl.shape) or not dst.is_contiguous() \
                        or sl.start + n > dst.numel():
                    self._unexpected.append(sl.name)
                    continue
                dst.view(-1)[sl.start:sl.start + n].copy_(sl.values)
                filled = self._filled[sl.name] = self._filled.get(sl.name, 0) + n
                if filled == dst.numel():
                    self._seen.add(sl.name)

    def finish_update(self, version: int) -> None:
        """Check every weight arrived, refresh the serving copy, take ``version``."""
        missing = [k for k in self._target if k not in self._seen and not k.endswith("lm_head.weight")]
        unexpected = self._unexpected
        if missing or unexpected:  # (lm_head.weight: tied to the embedding)
            raise EngineError(f"weight update does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if self.spec.quantisation is not None:
            self.model = self._serving_model()
        elif self.model is not self.master:
            self.model.load_state_dict(self.master.state_dict())  # casts in place
        self.version = version

    def generate(self, prompts: list[list[int]], indices: list[int], params: SamplingParams) -> list[Sample]:
        gen = torch.Generator(device=self.device).manual_seed(int(params.seed) & 0x7FFFFFFFFFFFFFFF)
        out = sample(self.model, prompts, n=params.n, max_new_tokens=params.max_new_tokens,
                     eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                     temperature=params.temperature, noise=self.noise, generator=gen)
        idx = [i for i in indices for _ in range(params.n)]
        return [Sample(i, r, lp, f) for i, r, lp, f in zip(idx, out.responses, out.logprobs, out.finish_reasons)]

    def close(self) -> None:
        self.model = self.master = None  # type: ignore[assignment]
