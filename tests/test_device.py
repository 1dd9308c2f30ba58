"""spec.trainer.device / a pool's device: auto, cpu, cuda, and a clear error where cuda is missing."""

import pytest
import torch

from dcmdp.device import DeviceError, resolve_device


def test_cpu_and_auto_without_cuda_are_the_cpu():
    assert resolve_device("cpu", "spec.trainer.device") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto", "spec.trainer.device") == torch.device("cpu")


def test_cuda_without_a_gpu_names_the_field():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(DeviceError, match=r"spec\.rollout\.pools\[0\]\.device: cuda was asked for"):
        resolve_device("cuda", "spec.rollout.pools[0].device")


def test_unknown_name_is_an_error():
    with pytest.raises(DeviceError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu", "spec.trainer.device")
