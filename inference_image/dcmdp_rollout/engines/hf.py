"""The Hugging Face engine: transformers models sampled with a KV cache at the pool's precision.

Precisions: ``fp32``, ``bf16``, ``fp16`` (weights and activations cast), ``int8`` (dynamic int8
quantisation of every Linear layer, as torch's ``quantize_dynamic`` does for CPU serving) and
``fp8`` (*emulated*: Linear weights rounded through float8-e4m3 with a per-output-channel scale,
compute in fp32 — the weight error of an FP8 checkpoint, not its kernels). ``noise`` adds Gaussian
logit noise of that σ before sampling, to emulate a worse engine at a chosen mismatch level.
"""

from __future__ import annotations

import copy
import warnings
from typing import Iterable, Mapping

import torch

from dcmdp.device import resolve_device
from dcmdp.engine import EngineError, Sample, SamplingParams
from dcmdp.generation import sample

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fp8_roundtrip_(model: torch.nn.Module) -> None:
    """Round every Linear weight through float8-e4m3 with a per-row absmax scale (in place)."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / fmax
                w.copy_((w / scale).to(torch.float8_e4m3fn).to(w.dtype) * scale)


class HFEngine:
    name = "hf"

    def __init__(self, model_dir: str, precision: str = "fp32", noise: float = 0.0, seed: int = 0,
                 threads: int = 0, device: str = "cpu", **_: object):
        from transformers import AutoModelForCausalLM

        from dcmdp.models.tokenizer import load_tokenizer

        if precision not in ("fp32", "bf16", "fp16", "int8", "fp8"):
            raise EngineError(f"hf engine: unsupported precision {precision!r} (fp32, bf16, fp16, int8, fp8)")
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device, "spec.rollout.pools[].device")
        if precision == "int8" and self.device.type != "cpu":
            raise EngineError("hf engine: int8 (torch dynamic quantisation) runs on the CPU only: "
                              "set the pool's device: cpu, or precision fp8/bf16")
        self.precision, self.noise, self.seed = precision, float(noise), seed
        self.tokenizer = load_tokenizer(model_dir)
        self.master = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(self.device)
        self.version = 0
        self.model = self._serving_model()

    def _serving_model(self) -> torch.nn.Module:
        if self.precision in DTYPES:
            if self.precision == "fp32":
                return self.master
            return copy.deepcopy(self.master).to(DTYPES[self.precision]).eval()
        if self.precision == "int8":
            with warnings.catch_warnings():  # torch deprecates the quantized-tensor API, still the CPU int8 path
                warnings.simplefilter("ignore", UserWarning)
                return torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(self.master), {torch.nn.Linear}, dtype=torch.qint8).eval()
        model = copy.deepcopy(self.master)
        fp8_roundtrip_(model)
        return model.eval()

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
        if self.precision in ("bf16", "fp16"):
            self.model.load_state_dict(self.master.state_dict())  # casts in place
        elif self.precision != "fp32":
            self.model = self._serving_model()
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
