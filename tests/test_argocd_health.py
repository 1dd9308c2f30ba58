"""docs/argocd/health.lua, run in a real Lua 5.1 (Argo CD's gopher-lua speaks 5.1) via lupa, on
statuses made by the operator's own pure status function."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from dcmdp import spec as S

lua51 = pytest.importorskip("lupa.lua51", reason="lupa (in the test extra) runs the Lua health check")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = (REPO / "docs" / "argocd" / "health.lua").read_text()
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lua51.LuaRuntime()
    lua.globals().obj = _to_lua(lua, obj)
    hs = lua.execute(SCRIPT)
    return hs["status"], hs["message"]


def run_obj(status: Optional[dict[str, Any]], generation: int = 1) -> dict[str, Any]:
    obj = yaml.load((REPO / "examples" / "kind-cpu.yaml").read_text(), Loader=S.YAMLLoader)
    obj["metadata"]["generation"] = generation
    if status is not None:
        obj["status"] = status
    return obj


def operator_status(**observed: Any) -> dict[str, Any]:
    from dcmdp_operator import status as st

    run = S.parse_run(run_obj(None))
    return st.compute(run, st.Observed(**observed), None, 1, NOW)


def test_no_status_is_progressing() -> None:
    assert health(run_obj(None)) == ("Progressing", "Waiting for the dcmdp operator")


def test_status_of_an_older_generation_is_progressing() -> None:
    status = {"phase": "Succeeded", "observedGeneration": 1}
    assert health(run_obj(status, generation=2))[0] == "Progressing"
    assert health(run_obj(status, generation=1))[0] == "Healthy"


def test_statuses_from_the_operator() -> None:
    pending = operator_status()  # no Job observed yet
    assert pending["phase"] == "Pending"
    assert health(run_obj(pending))[0] == "Progressing"


@pytest.mark.parametrize(
    "phase, ready, reason, expected",
    [
        ("Pending", "False", "WaitingForTrainer", "Progressing"),
        ("Running", "False", "PoolsNotReady", "Progressing"),
        ("Running", "True", "Ready", "Healthy"),
        ("Succeeded", "False", "Succeeded", "Healthy"),
        ("Suspended", "False", "Suspended", "Suspended"),
        ("Failed", "False", "BackoffLimitExceeded", "Degraded"),
        ("Running", "False", "SpecChangeRefused", "Degraded"),
        ("Pending", "False", "InvalidSpec", "Degraded"),
        ("Pending", "False", "ChildRejected", "Degraded"),
        ("Running", "False", "ReconcileError", "Progressing"),
        ("Exploding", "False", "Whatever", "Unknown"),
    ],
)
def test_phase_and_ready_map_to_health(phase: str, ready: str, reason: str, expected: str) -> None:
    status = {
        "phase": phase,
        "message": "msg",
        "observedGeneration": 1,
        "step": 10,
        "totalSteps": 40,
        "reward": 0.5,
        "probDiffMean": 0.00123,
        "lambdas": "bf16=0.25 int8=0.5",
        "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": "ready says why"}],
    }
    got, message = health(run_obj(status))
    assert got == expected
    if expected in ("Healthy", "Progressing", "Suspended") or phase == "Failed":
        assert "step 10/40" in message and "discrepancy 0.00123" in message and "lambda bf16=0.25 int8=0.5" in message


def test_docs_embed_the_same_script() -> None:
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    embedded = "\n".join(line.removeprefix("    ") for line in doc.splitlines())
    assert SCRIPT.strip() in embedded, "docs/kubernetes.md's argocd-cm snippet differs from docs/argocd/health.lua"
