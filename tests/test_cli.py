"""The dcmdp command line: validate, run (in-process), plot; bad input exits 2 naming the field."""

import json
import subprocess
import sys

import pytest

from dcmdp.cli import main

BAD = """apiVersion: dcmdp.io/v1alpha1
kind: DCMDPRun
metadata: {name: bad}
spec:
  algorithm:
    clipLow: 3
    constraint: {lambdaInit: 5}
"""


def test_validate_accepts_the_quickstart(capsys):
    assert main(["validate", "-f", "examples/quickstart.yaml"]) == 0
    assert "valid DCMDPRun 'quickstart'" in capsys.readouterr().out


def test_validate_names_the_trainer_ranks(capsys):
    """replicas × gpusPerReplica: the GPU example's two 8-GPU pods."""
    assert main(["validate", "-f", "examples/gpu-cluster.yaml", "--cluster"]) == 0
    assert "trainer 2×8 ranks" in capsys.readouterr().out


def test_validate_prints_the_resolved_manifest(capsys):
    assert main(["validate", "-f", "examples/quickstart.yaml", "--print"]) == 0
    out = capsys.readouterr().out
    assert "lambdaLR: 1.0" in out and "groupSize: 8" in out


def test_bad_manifest_exits_2_naming_every_field(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    assert main(["validate", "-f", str(f)]) == 2
    err = capsys.readouterr().err
    assert "spec.algorithm.clipLow" in err and "lambdaInit" in err


def test_missing_file_and_bad_yaml_are_clear(tmp_path, capsys):
    assert main(["validate", "-f", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    f = tmp_path / "x.yaml"
    f.write_text("spec: [unclosed")
    assert main(["validate", "-f", str(f)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_run_inprocess_writes_metrics_plots_and_tensorboard(tmp_path):
    manifest = tmp_path / "run.yaml"
    manifest.write_text("""apiVersion: dcmdp.io/v1alpha1
kind: DCMDPRun
metadata: {name: cli}
spec:
  model: {hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 2, numKvHeads: 1, warmStart: {steps: 0}}
  task: {name: addition, digits: 1, heldOut: 16}
  algorithm: {groupSize: 4, promptsPerStep: 4, miniBatchSize: 2, steps: 3}
  rollout: {pools: [{name: a, precision: bf16}, {name: b, precision: int8}]}
""")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dcmdp.cli", "run", "-f", str(manifest), "--out", str(out),
                           "--inprocess", "--quiet", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for png in ("reward.png", "discrepancy.png", "lambda.png"):
        assert (out / png).stat().st_size > 1000
    assert "dcmdp run summary" in proc.stderr
    assert "pool a" in proc.stderr and "pool b" in proc.stderr and "updated λ" in proc.stderr
    again = subprocess.run([sys.executable, "-m", "dcmdp.cli", "run", "-f", str(manifest), "--out", str(out),
                            "--inprocess", "--quiet"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and f"{out} already holds a run that finished (3 steps); pass --resume" in again.stderr


def test_ctrl_c_during_a_run_says_how_to_resume_it(tmp_path, monkeypatch, capsys):
    def interrupted(mode):
        def run(*args, **kwargs):
            raise KeyboardInterrupt
        return run

    monkeypatch.setattr("dcmdp.cli.runner", interrupted)
    out = tmp_path / "out"
    assert main(["run", "-f", "examples/quickstart.yaml", "--out", str(out), "--quiet"]) == 130
    assert f"interrupted: continue with  dcmdp run -f examples/quickstart.yaml --out {out} --resume" in \
        capsys.readouterr().err


def test_steps_must_be_positive(capsys):
    assert main(["run", "-f", "examples/quickstart.yaml", "--steps", "0"]) == 2
