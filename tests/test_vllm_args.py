"""vLLM's start arguments for a pool, checked without vLLM (the pure mapping the engine uses on a
CPU and on GPUs): precision → dtype / quantization, tensorParallelSize, GPU-only options."""

from pathlib import Path

import pytest

from dcmdp.engine import EngineError
from dcmdp.precision import PRECISIONS
from dcmdp.spec import PoolSpec
from dcmdp_rollout.engines.vllm import llm_args

M, T = Path("/m"), Path("/t")


def args(precision: str, on_cpu: bool, **options):
    return llm_args(M, T, PRECISIONS[precision].vllm, 7, options, on_cpu=on_cpu)


def test_fp8_on_gpu_is_vllms_online_fp8_from_bf16_weights_sharded_over_the_pools_gpus():
    got = args("fp8", on_cpu=False, tensor_parallel_size=4)
    assert got == {"model": "/m", "tokenizer": "/t", "dtype": "bfloat16", "quantization": "fp8", "seed": 7,
                   "logprobs_mode": "processed_logprobs", "generation_config": "vllm", "enforce_eager": False,
                   "enable_prefix_caching": True, "tensor_parallel_size": 4, "gpu_memory_utilization": 0.5}


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")])
def test_float_precisions_on_a_cpu(precision, dtype):
    got = args(precision, on_cpu=True)
    assert got["dtype"] == dtype and "quantization" not in got and "gpu_memory_utilization" not in got
    assert got["enforce_eager"] is True and got["tensor_parallel_size"] == 1


def test_engine_options_as_the_command_line_gives_them():
    got = args("bf16", on_cpu=False, enforce_eager="true", max_model_len="512", max_num_seqs=8,
               gpu_memory_utilization="0.9", tensor_parallel_size="2")
    assert (got["enforce_eager"], got["max_model_len"], got["max_num_seqs"], got["gpu_memory_utilization"],
            got["tensor_parallel_size"]) == (True, 512, 8, 0.9, 2)
    assert args("bf16", on_cpu=True, enforce_eager="false")["enforce_eager"] is False
    for bad in (0, -1, "two", 1.5):
        with pytest.raises(EngineError, match="tensor_parallel_size must be an integer >= 1"):
            args("bf16", on_cpu=False, tensor_parallel_size=bad)


def test_tensor_parallel_size_is_a_vllm_pool_field():
    assert PoolSpec(name="p", engine="vllm", tensorParallelSize=8).tensor_parallel_size == 8
    assert PoolSpec(name="p").tensor_parallel_size == 1
    with pytest.raises(ValueError, match="tensorParallelSize > 1 needs engine vllm"):
        PoolSpec(name="p", engine="hf", tensorParallelSize=2)
    with pytest.raises(ValueError):
        PoolSpec(name="p", engine="vllm", tensorParallelSize=0)
