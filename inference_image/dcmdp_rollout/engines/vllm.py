"""The vLLM engine: real vLLM sampling, with the logprob of each sampled token as vLLM computed it.

vLLM pins its own torch/transformers, so it lives in a venv of its own (``make vllm-venv`` builds
``.venv-vllm``); a rollout worker for a ``vllm`` pool runs under that venv's Python
(``DCMDP_VLLM_PYTHON`` overrides which one). The module imports vLLM only when an engine is built.

What the engine promises, and how:

* **Logprobs of the sampling distribution.** vLLM is started with ``logprobs_mode=
  "processed_logprobs"`` and every request asks for ``logprobs=0`` (the sampled token only), so
  the recorded value is log softmax((logits + ε) / T) of the token drawn, i.e. of the distribution
  the token was really sampled from (vLLM's default, ``raw_logprobs``, would report the
  untempered model distribution). With T = 0 (greedy) it is log softmax(logits + ε) of the argmax,
  as in the HF engine. The folder's ``generation_config.json`` is ignored
  (``generation_config="vllm"``), so no top-k/top-p default from a checkpoint silently truncates
  the distribution the trainer assumes.
* **Precisions** map to vLLM as ``dcmdp.precision`` says (its ``vllm`` field): fp32 / bf16 /
  fp16 set vLLM's ``dtype``. fp8 uses vLLM's online FP8 quantisation (``quantization="fp8"``)
  where the platform supports it (GPU); on a CPU it is rejected with an :class:`EngineError`.
  int8 is rejected: vLLM has no online int8 quantisation of an unquantised checkpoint (use the
  ``hf`` engine for an int8 pool).
* **Logit noise** (``noise`` = σ > 0) is added to the logits in the model's ``compute_logits``
  (inside vLLM's worker, before temperature and sampling), so the reported logprob includes it.
* **Weight updates** go in place through vLLM's layerwise ``reload_weights`` (checkpoint-format
  names, as the trainer's ``state_dict()`` has them). On the CPU backend, layers whose weight vLLM
  keeps but whose GEMM it pre-packs (the tied ``lm_head``) would keep the old packed copy, so their
  GEMM dispatch is re-run after the reload. ``weight_sync="restart"`` instead writes the new
  weights to a temporary model folder and restarts vLLM from it (slower; kept as a fallback for
  architectures whose in-place reload misbehaves). The prefix cache is reset after each update so
  no KV block computed with old weights is reused.

vLLM's engine core runs *in this process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weight tensors
and the noise hook reach the model without serialisation, and no child process is spawned (so no
``__main__`` guard is needed in the caller).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from dcmdp.engine import EngineError, Sample, SamplingParams
from dcmdp.precision import PRECISIONS

WEIGHT_SYNC = ("inplace", "restart")
# Files of a model folder other than the weights, carried over when restarting from new weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SEED_MASK = 0x7FFFFFFF


class _LogitNoise:
    """Adds σ·N(0, 1) to the logits vLLM samples from; reseeded at each ``generate`` call."""

    def __init__(self, sigma: float):
        self.sigma = float(sigma)
        self.generator: Optional[torch.Generator] = None
        self.seed = 0

    def reseed(self, seed: int) -> None:
        self.seed = seed
        if self.generator is not None:
            self.generator.manual_seed(seed)

    def wrap(self, compute_logits):
        def noisy_compute_logits(*args, **kwargs):
            logits = compute_logits(*args, **kwargs)
            if logits is None:  # non-last pipeline stages return nothing
                return logits
            if self.generator is None or self.generator.device != logits.device:
                self.generator = torch.Generator(device=logits.device)
                self.generator.manual_seed(self.seed)
            noise = torch.randn(logits.shape, generator=self.generator, device=logits.device,
                                dtype=torch.float32)
            return logits.float() + self.sigma * noise

        noisy_compute_logits._dcmdp_noise = True  # type: ignore[attr-defined]
        return noisy_compute_logits


# ---------------------------------------------------------------- functions run inside vLLM's worker
# (collective_rpc calls them with the worker as first argument; in-process, so nothing is pickled)
def _worker_install_noise(worker, noise: _LogitNoise) -> bool:
    model = worker.model_runner.model
    current = model.compute_logits
    if getattr(current, "_dcmdp_noise", False):
        return True
    model.compute_logits = noise.wrap(current)
    return True


def _worker_reload(worker, weights: list[tuple[str, torch.Tensor]], repack_cpu: bool) -> int:
    """vLLM's in-place layerwise reload, then (CPU) re-pack what the reload leaves stale.

    On the CPU backend vLLM's reload re-runs ``process_weights_after_loading`` layer by layer and
    copies the result into the original tensors. Two kinds of layer come out wrong and are fixed
    here: (1) layers that keep a 2-D ``.weight`` *and* a pre-packed GEMM (the embedding-tied
    ``lm_head``: its weight is reloaded through the embedding, its packed copy is not); (2) MoE
    experts, whose CPU grouped-GEMM pre-pack is skipped on a weight update, so the unpacked new
    weights end up where the kernel expects packed ones. Returns how many layers were re-packed.
    """
    model = worker.model_runner.get_model()
    moe = _cpu_moe_layers(model) if repack_cpu else []  # refuses before any weight is touched
    worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    if not repack_cpu:
        return 0
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    repacked = 0
    with set_current_vllm_config(worker.vllm_config):
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor)
                    and weight.ndim == 2 and weight.numel() > 0 and not weight.is_meta):
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                repacked += 1
        for module, experts in moe:
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked


def _cpu_moe_layers(model) -> list:
    """(layer, experts kernel) of every MoE layer; only unquantised CPU experts can be re-packed."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    found = []
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is None:
            continue
        experts = kernel.fused_experts
        if type(experts).process_weights_after_loading is not \
                CPUUnquantizedExperts.process_weights_after_loading:
            raise RuntimeError(f"in-place reload of {name} ({type(experts).__name__}) is not "
                               "supported on the CPU backend; use weight_sync='restart'")
        found.append((module, experts))
    return found


class VLLMEngine:
    """A rollout engine backed by ``vllm.LLM`` (see the module docstring for its guarantees).

    Options (``**options``): ``weight_sync`` ("inplace" | "restart", default "inplace"),
    ``max_model_len`` (default: the model's), ``kv_cache_gib`` (CPU KV cache, default 1),
    ``gpu_memory_utilization`` (GPU, default 0.5), ``enforce_eager`` (default True on CPU, False
    on GPU), ``max_num_seqs`` (default vLLM's), ``tensor_parallel_size`` (the pool's
    ``tensorParallelSize``, default 1). See :func:`llm_args`.
    """

    name = "vllm"
    _live: Optional["VLLMEngine"] = None  # the engine holding vLLM's process-wide state
    OPTIONS = ("weight_sync", "max_model_len", "kv_cache_gib", "gpu_memory_utilization",
               "enforce_eager", "max_num_seqs", "tensor_parallel_size")

    def __init__(self, model_dir: str, precision: str = "bf16", noise: float = 0.0, seed: int = 0,
                 **options: Any):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise EngineError(f"vllm engine: unknown option(s) {', '.join(unknown)} "
                              f"(accepted: {', '.join(self.OPTIONS)})")
        if precision not in PRECISIONS:
            raise EngineError(f"vllm engine: unknown precision {precision!r} ({', '.join(PRECISIONS)})")
        mapping = PRECISIONS[precision].vllm
        if mapping is None:
            raise EngineError(f"vllm engine: pool precision {precision!r} is not supported: "
                              f"{PRECISIONS[precision].vllm_refusal}")
        if not (noise >= 0):
            raise EngineError(f"vllm engine: noise must be >= 0 (got {noise!r})")
        weight_sync = options.get("weight_sync", "inplace")
        if weight_sync not in WEIGHT_SYNC:
            raise EngineError(f"vllm engine: option weight_sync must be one of {', '.join(WEIGHT_SYNC)} "
                              f"(got {weight_sync!r})")
        if VLLMEngine._live is not None:
            raise EngineError("vllm engine: another vLLM engine is open in this process; vLLM's "
                              "in-process engine core holds process-wide state, so close() it first "
                              "(run one worker process per vllm pool)")
        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise EngineError(f"vllm engine: {folder} is not a Hugging Face model folder (no config.json)")

        # In-process engine core: must be set before vLLM reads its environment.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if "kv_cache_gib" in options:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(options["kv_cache_gib"]))
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            import vllm  # noqa: F401
            from vllm.platforms import current_platform
        except ImportError as e:
            raise EngineError(
                f"vllm engine: vLLM is not importable from {sys.executable} ({e}); a vllm pool's "
                "worker runs under the vLLM venv: run `make vllm-venv` and use .venv-vllm/bin/python "
                "(or set DCMDP_VLLM_PYTHON)") from e

        self.on_cpu = bool(current_platform.is_cpu())
        if mapping.gpu_only and self.on_cpu:
            raise EngineError(
                f"vllm engine: pool precision {precision!r} cannot run on a CPU: vLLM's "
                f"quantization={mapping.quantization!r} needs GPU kernels, and the CPU backend has none; use "
                f"bf16/fp16/fp32 here, {precision} on a GPU node pool, or engine 'hf' (emulated {precision})")
        self.precision, self.mapping, self.noise, self.seed = precision, mapping, float(noise), int(seed)
        self.weight_sync = weight_sync
        self.version = 0
        self.restarts = 0
        self.last_sync_seconds = 0.0
        self._options = options
        self._source = folder  # the original folder: config, tokenizer, initial weights
        self._tmp: Optional[Path] = None  # temporary folder of the weights we restarted from
        self._noise = _LogitNoise(self.noise) if self.noise > 0 else None
        self._expected = _checkpoint_shapes(folder)
        self._tied = bool(_read_json(folder / "config.json").get("tie_word_embeddings", False))
        self._llm = self._start(folder)
        VLLMEngine._live = self
        self.eos_token_id = self._llm.get_tokenizer().eos_token_id

    # ------------------------------------------------------------------------------ life cycle
    def _start(self, folder: Path):
        from vllm import LLM

        kwargs = llm_args(folder, self._source, self.mapping, self.seed, self._options, on_cpu=self.on_cpu)
        try:
            llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises many types; name the folder and precision
            raise EngineError(f"vllm engine: could not start vLLM on {folder} at precision "
                              f"{self.precision}: {type(e).__name__}: {e}") from e
        if self._noise is not None:
            llm.collective_rpc(_worker_install_noise, args=(self._noise,))
        return llm

    def _shutdown(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()

    def close(self) -> None:
        self._shutdown()
        if VLLMEngine._live is self:
            VLLMEngine._live = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):  # best effort; close() is the real API
        try:
            self.close()
        except Exception:
            pass

    # --------------------------------------------------------------------------------- weights
    def _check_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        given = set(state_dict)
        optional = {"lm_head.weight"} if self._tied else set()
        missing = sorted(set(self._expected) - given - optional)
        unexpected = sorted(given - set(self._expected) - optional)
        wrong = sorted(n for n in given & set(self._expected)
                       if tuple(state_dict[n].shape) != self._expected[n])
        if missing or unexpected or wrong:
            detail = "; ".join(part for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                "wrong shape " + ", ".join(f"{n} {tuple(state_dict[n].shape)} != {self._expected[n]}"
                                           for n in wrong[:3]) if wrong else "") if part)
            raise EngineError(f"vllm engine: weight update does not fit the model: {detail}")

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace the weights (vLLM casts them to the engine's dtype) and remember ``version``."""
        if self._llm is None:
            raise EngineError("vllm engine: no running vLLM (closed, or a restart failed)")
        start = time.perf_counter()
        state_dict = _to_checkpoint_format(state_dict, self._expected)
        self._check_state_dict(state_dict)
        weights = [(n, t) for n, t in state_dict.items() if not (self._tied and n == "lm_head.weight")]
        if self.weight_sync == "restart":
            self._restart_from(weights)
        else:
            try:
                self._llm.collective_rpc(_worker_reload, args=(weights, self.on_cpu))
            except RuntimeError as e:
                raise EngineError(f"vllm engine: in-place weight update failed: {e}") from e
            self._llm.reset_prefix_cache()
        self.version = int(version)
        self.last_sync_seconds = time.perf_counter() - start

    def _restart_from(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        folder = Path(tempfile.mkdtemp(prefix="dcmdp-vllm-weights-"))
        try:
            for item in self._source.iterdir():
                if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) \
                        and not item.name.endswith(".index.json"):
                    shutil.copy2(item, folder / item.name)
            save_file({n: t.detach().to("cpu").contiguous() for n, t in weights},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
            self._shutdown()
            self._llm = self._start(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = folder
        self.restarts += 1

    # ------------------------------------------------------------------------------- sampling
    def generate(self, prompts: list[list[int]], indices: list[int], params: SamplingParams) -> list[Sample]:
        """``params.n`` samples per prompt, grouped by prompt in input order."""
        from vllm import SamplingParams as VSamplingParams

        if self._llm is None:
            raise EngineError("vllm engine: no running vLLM (closed, or a restart failed)")
        if len(prompts) != len(indices):
            raise EngineError(f"vllm engine: {len(prompts)} prompts but {len(indices)} indices")
        if params.n < 1 or params.max_new_tokens < 1 or params.temperature < 0:
            raise EngineError(f"vllm engine: bad sampling params {params}")
        if not prompts:
            return []
        if self._noise is not None:
            self._noise.reseed(int(params.seed) & _SEED_MASK)
        # One seed per prompt, derived from (call seed, prompt index): a sample does not depend on
        # which other prompts share its batch.
        per_prompt = [
            VSamplingParams(n=params.n, temperature=float(params.temperature),
                            max_tokens=int(params.max_new_tokens), logprobs=0, detokenize=False,
                            seed=(int(params.seed) * 1_000_003 + int(i)) & _SEED_MASK)
            for i in indices
        ]
        from vllm.exceptions import VLLMClientError

        try:
            outputs = self._llm.generate([{"prompt_token_ids": list(p)} for p in prompts], per_prompt,
                                         use_tqdm=False)
        except (ValueError, VLLMClientError) as e:  # prompt too long, token id out of vocab, ...
            raise EngineError(f"vllm engine: vLLM rejected the batch: {e}") from e
        samples: list[Sample] = []
        for index, out in zip(indices, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(tokens):
                    raise EngineError("vllm engine: vLLM returned no logprob for some sampled tokens")
                logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs, tokens)]
                if c.finish_reason not in ("stop", "length"):
                    raise EngineError(f"vllm engine: request ended with {c.finish_reason!r}")
                samples.append(Sample(int(index), tokens, logprobs, str(c.finish_reason)))
        return samples


def llm_args(model: Path, tokenizer: Path, mapping, seed: int, options: Mapping[str, Any], *,
             on_cpu: bool) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for a pool: the precision's mapping
    (``dcmdp.precision``: ``dtype``, and ``quantization`` — ``fp8`` is vLLM's online FP8 on a GPU),
    the logprob contract (``processed_logprobs``, ``generation_config="vllm"``), prefix caching,
    and the pool's engine options: ``tensor_parallel_size`` (the pool's ``tensorParallelSize``:
    vLLM shards every layer over that many GPUs of the worker's pod; each shard takes its slice of
    a weight update in vLLM's own ``reload_weights``), ``gpu_memory_utilization`` (GPU only,
    default 0.5), ``enforce_eager`` (default: True on a CPU, False on a GPU, where CUDA graphs
    are captured), ``max_model_len``, ``max_num_seqs``. Pure: no vLLM import.

    Raises EngineError naming the option when ``tensor_parallel_size`` is not an integer >= 1."""
    try:
        tp = int(options.get("tensor_parallel_size", 1))
    except (TypeError, ValueError):
        tp = 0
    if tp < 1 or str(options.get("tensor_parallel_size", 1)).strip() != str(tp):
        raise EngineError(f"vllm engine: option tensor_parallel_size must be an integer >= 1 "
                          f"(got {options.get('tensor_parallel_size')!r})")
    kwargs: dict[str, Any] = dict(
        model=str(model), tokenizer=str(tokenizer), dtype=mapping.dtype, seed=int(seed),
        logprobs_mode="processed_logprobs", generation_config="vllm",
        enforce_eager=_flag(options.get("enforce_eager", on_cpu)), enable_prefix_caching=True,
        tensor_parallel_size=tp,
    )
    if mapping.quantization is not None:
        kwargs["quantization"] = mapping.quantization
    if "max_model_len" in options:
        kwargs["max_model_len"] = int(options["max_model_len"])
    if "max_num_seqs" in options:
        kwargs["max_num_seqs"] = int(options["max_num_seqs"])
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = float(options.get("gpu_memory_utilization", 0.5))
    return kwargs


def _flag(value: Any) -> bool:
    """A boolean option, also as the string ``--engine-option KEY=VALUE`` gives."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _to_checkpoint_format(state_dict: Mapping[str, torch.Tensor],
                          expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Unfold transformers-5 fused expert tensors into the per-expert names of the checkpoint.

    In memory, transformers 5 keeps a MoE layer's experts as ``experts.gate_up_proj`` (E, 2I, H:
    gate rows then up rows) and ``experts.down_proj`` (E, H, I); ``save_pretrained`` (and vLLM's
    loader) use ``experts.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj``. Views, no copies.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        prefix, _, leaf = name.rpartition(".experts.")
        fused = (prefix and leaf in ("gate_up_proj", "down_proj") and tensor.ndim == 3
                 and f"{prefix}.experts.0.down_proj.weight" in expected)
        if not fused:
            out[name] = tensor
        elif leaf == "gate_up_proj":
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.experts.{e}.gate_proj.weight"] = tensor[e, :half]
                out[f"{prefix}.experts.{e}.up_proj.weight"] = tensor[e, half:]
        else:
            for e in range(tensor.shape[0]):
                out[f"{prefix}.experts.{e}.down_proj.weight"] = tensor[e]
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the folder's safetensors checkpoint (read from headers only)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EngineError(f"vllm engine: {folder} has no *.safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes
