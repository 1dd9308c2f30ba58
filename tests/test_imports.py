"""The import rules of docs/architecture.md, read from the source (``ast``; nothing is imported):

* the operator never imports torch (nor anything that does, at module level or inside a function);
* the trainer and the rollout packages never import each other (they share only ``dcmdp.proto``);
* no import cycle among the modules of any package (module-level imports);
* imports sit at the top of a module, except an optional heavy dependency, imported where it is used
  with a one-line reason comment on the line of the import or the line above it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {
    "dcmdp": REPO / "dcmdp",
    "dcmdp_trainer": REPO / "trainer_image" / "dcmdp_trainer",
    "dcmdp_rollout": REPO / "inference_image" / "dcmdp_rollout",
    "dcmdp_operator": REPO / "operator" / "dcmdp_operator",
    "dcmdp_testing": REPO / "dcmdp_testing",
}
# Function-local imports still to move (file, module): the rollout's entry point and engines; the
# operator's main imports its handlers (which register with kopf on import) after configuring kopf. This list may only shrink: a new function-local import fails the test below.
PENDING = {
    ("trainer_image/dcmdp_trainer/launcher.py", "dcmdp_trainer.checkpoint"),
    ("inference_image/dcmdp_rollout/__main__.py", "dcmdp.jsonlog"),
    ("inference_image/dcmdp_rollout/__main__.py", "dcmdp.transport.auth"),
    ("inference_image/dcmdp_rollout/__main__.py", "dcmdp_rollout.observability"),
    ("inference_image/dcmdp_rollout/__main__.py", "dcmdp_rollout.worker"),
    ("inference_image/dcmdp_rollout/__main__.py", "torch"),
    ("inference_image/dcmdp_rollout/engines/hf.py", "dcmdp.models.tokenizer"),
    ("inference_image/dcmdp_rollout/engines/hf.py", "transformers"),
    ("inference_image/dcmdp_rollout/engines/vllm.py", "safetensors"),
    ("inference_image/dcmdp_rollout/engines/vllm.py", "safetensors.torch"),
    ("inference_image/dcmdp_rollout/engines/vllm.py", "vllm.config"),
    ("inference_image/dcmdp_rollout/engines/vllm.py", "vllm.distributed.parallel_state"),
    ("inference_image/dcmdp_rollout/engines/vllm.py", "vllm.exceptions"),
    ("inference_image/dcmdp_rollout/engines/vllm.py", "vllm.model_executor.layers.fused_moe.experts.cpu_moe"),
    ("inference_image/dcmdp_rollout/engines/vllm.py", "vllm.model_executor.layers.utils"),
    ("inference_image/dcmdp_rollout/engines/vllm.py", "vllm.platforms"),
    ("inference_image/dcmdp_rollout/worker.py", "safetensors.torch"),
    ("operator/dcmdp_operator/main.py", "dcmdp_operator.handlers"),
    ("operator/dcmdp_operator/main.py", "dcmdp_operator.metrics"),
    ("trainer_image/dcmdp_trainer/distributed.py", "dcmdp.models.tiny"),
    ("trainer_image/dcmdp_trainer/distributed.py", "deepspeed"),
    ("trainer_image/dcmdp_trainer/distributed.py", "torch.distributed"),
    ("trainer_image/dcmdp_trainer/session.py", "transformers"),
}
GENERATED = {"dcmdp.proto.dcmdp_pb2", "dcmdp.proto.dcmdp_pb2_grpc"}
# Optional heavy dependencies: an extra installs them (ml, trainer, rollout, operator) and the
# modules that use them must still import without them, or they are slow to import.
HEAVY = {"torch", "transformers", "tokenizers", "safetensors", "deepspeed", "vllm", "matplotlib", "kopf",
         "grpc_tools", "math_verify", "huggingface_hub"}


@dataclass
class Module:
    name: str
    path: Path
    top: set[str] = field(default_factory=set)  # modules imported at module level (absolute names)
    local: list[tuple[int, str]] = field(default_factory=list)  # (line, module) imported inside a function


def _absolute(module: str, node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.AST, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = _absolute(module, node, "", is_package)
    # `from pkg import sub` imports the module pkg.sub when there is one
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _scan() -> dict[str, Module]:
    files = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    known = set(files)
    mods = {}
    for name, path in files.items():
        if name in GENERATED:
            continue
        m = Module(name, path)
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(s) for f in functions for s in ast.walk(f) if isinstance(s, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, node, is_package, known):
                    if id(node) in inside:
                        m.local.append((node.lineno, target))
                    elif not _type_checking_only(tree, node):
                        m.top.add(target)
        mods[name] = m
    return mods


def _type_checking_only(tree: ast.Module, node: ast.AST) -> bool:
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING":
            if any(s is node for s in ast.walk(n)):
                return True
    return False


MODULES = _scan()


def _internal(target: str) -> str | None:
    """The project module a dotted import names (the longest known prefix), or None."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _reaches(start: str, everything: bool) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or not, with the chain that gets there."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        m = MODULES[todo.pop()]
        targets = set(m.top) | ({t for _, t in m.local} if everything else set())
        for t in sorted(targets):
            inner = _internal(t)
            key = inner or t.split(".")[0]
            if key not in chains:
                chains[key] = chains[m.name] + [key]
                if inner:
                    todo.append(inner)
    return chains


def test_the_scan_sees_the_packages() -> None:
    assert {"dcmdp.spec", "dcmdp.sweep.run", "dcmdp_trainer.learner", "dcmdp_rollout.worker",
            "dcmdp_operator.handlers", "dcmdp_testing.emulator"} <= set(MODULES)
    assert "dcmdp.spec" in MODULES["dcmdp.cli"].top


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("dcmdp_operator")))
def test_the_operator_never_imports_torch(module: str) -> None:
    chains = _reaches(module, everything=True)
    for heavy in ("torch", "transformers", "vllm", "deepspeed"):
        assert heavy not in chains, f"{module} imports {heavy}: {' -> '.join(chains[heavy])}"


@pytest.mark.parametrize("a, b", [("dcmdp_trainer", "dcmdp_rollout"), ("dcmdp_rollout", "dcmdp_trainer"),
                                  ("dcmdp", "dcmdp_trainer"), ("dcmdp", "dcmdp_rollout"),
                                  ("dcmdp", "dcmdp_operator"), ("dcmdp", "dcmdp_testing")])
def test_packages_do_not_import_each_other(a: str, b: str) -> None:
    """Trainer and rollout know each other through the wire protocol only; the core imports neither
    (nor the operator, nor the test tooling)."""
    bad = [f"{m.name}:{t}" for m in MODULES.values() if m.name.split(".")[0] == a
           for t in list(m.top) + [t for _, t in m.local] if t.split(".")[0] == b]
    assert not bad, bad


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (module -> modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for nxt in sorted(graph[n]):
            # a package's __init__ importing its own submodules is not a cycle through them
            if state.get(nxt) == 1 and not n.startswith(nxt + "."):
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package's __init__ and its submodule


def test_no_import_cycles() -> None:
    graph = {m.name: {i for t in m.top if (i := _internal(t)) and i != m.name} for m in MODULES.values()}
    found = _cycle(graph)
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_imports_are_at_the_top_except_marked_optional_heavy_ones() -> None:
    bad = []
    for m in MODULES.values():
        lines = m.path.read_text().splitlines()
        for line, target in m.local:
            root = target.split(".")[0]
            # the reason on the import's line or on a comment line just above its block of imports
            marked = "#" in lines[line - 1] or any(x.strip().startswith("#") for x in lines[max(0, line - 5):line - 1])
            if (str(m.path.relative_to(REPO)), target) in PENDING:
                continue
            if root not in HEAVY or not marked:
                bad.append(f"{m.path.relative_to(REPO)}:{line}: {target}"
                           + ("" if root in HEAVY else " (not an optional heavy dependency: import it at the top)"))
    assert not bad, "\n".join(bad)
