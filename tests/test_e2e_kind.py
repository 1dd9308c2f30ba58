"""scripts/e2e-kind.sh is not run here (no Docker/kind): check its syntax and that everything it
names exists — files, chart values, the example's name, the operator's labels."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from dcmdp import spec as S

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "e2e-kind.sh"
TEXT = SCRIPT.read_text()


def test_bash_syntax() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_files_it_uses_exist() -> None:
    for path in re.findall(r"(?:-f |apply -f |upgrade --install dcmdp )([\w./-]+)", TEXT):
        assert (REPO / path).exists(), path
    assert "helm/dcmdp" in TEXT and "examples/kind-cpu.yaml" in TEXT


def test_helm_values_it_sets_exist() -> None:
    values = yaml.safe_load((REPO / "helm" / "dcmdp" / "values.yaml").read_text())
    keys = re.findall(r"--set ([\w.]+)=", TEXT)
    assert len(keys) >= 6
    for key in keys:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"--set {key}: not in values.yaml"
            node = node[part]


def test_run_name_and_labels_match_the_example_and_the_operator() -> None:
    from dcmdp_operator.children import RUN_LABEL

    run = S.load_run(REPO / "examples" / "kind-cpu.yaml")
    assert re.search(rf"^RUN={run.metadata.name}$", TEXT, re.M)
    assert f'-l "{RUN_LABEL}=$RUN"' in TEXT


def test_cpu_trainer_image_can_serve_the_pools() -> None:
    """The script uses the CPU trainer image for the rollout pools too: the package it installs
    carries the rollout worker and its Hugging Face engine, whose dependencies are in [trainer]."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "dcmdp-rollout" in project["scripts"]
    assert project["entry-points"]["dcmdp.engines"]["hf"].startswith("dcmdp_rollout.")
    assert "runImages.rollout=\"$TRAINER_IMAGE\"" in TEXT
    assert all(p.engine == "hf" for p in S.load_run(REPO / "examples" / "kind-cpu.yaml").spec.rollout.pools)
