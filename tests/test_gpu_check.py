"""bench/gpu_check.sh runs where a GPU is lent; here it runs on the CPU (--device cpu, the tiny
model) so that a broken script is found before a device session is spent on it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_reports_the_weight_load_and_both_pools_delta():
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--size", "tiny", "--steps", "1",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["device"] == "cpu" and last["steps"] == 1
    assert last["delta_bar_fp8"] > last["delta_bar_bf16"] > 0  # fp8-cast weights are further from the trainer
    load = last["weight_load"]
    assert load["loaded_weights_match"] and load["buckets"] >= 1 and load["load_s"] > 0 and load["d2d_copy_s"] > 0
