"""Checkpoints that can be trusted: a record (size, sha256) per checkpoint, safe loading, fallback
to the newest intact checkpoint on resume, a clear error when none is intact, and metrics files
whose torn last line does not break a resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dcmdp.metrics import read_metrics
from dcmdp_trainer import checkpoint
from dcmdp_trainer.checkpoint import CheckpointError
from dcmdp_trainer.local import run_inprocess
from tests.runs import tiny_run


def _state(value: float) -> dict:
    return {"learner": {"model": {"w": torch.full((4,), value)}}, "version": 1}


def _three(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _state(float(step)), keep=3)
    return checkpoint.candidates(tmp_path)


def test_save_writes_a_record_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _state(float(step)), keep=2)
    folder = checkpoint.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002.json", "step-00000002.pt",
                                                       "step-00000003.json", "step-00000003.pt"]
    meta = json.loads((folder / "step-00000003.json").read_text())
    assert meta["sha256"] == checkpoint.sha256_file(folder / "step-00000003.pt")
    assert meta["bytes"] == (folder / "step-00000003.pt").stat().st_size and meta["step"] == 3
    path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000003.pt" and state["step"] == 3 and state["learner"]["model"]["w"][0] == 3.0


@pytest.mark.parametrize("damage,cause", [
    ("corrupt", "sha256 differs"),
    ("truncate", "truncated"),
    ("no-record", "no record"),
])
def test_a_broken_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, damage, cause):
    newest = _three(tmp_path)[0]
    data = newest.read_bytes()
    if damage == "corrupt":  # same size, one byte flipped in the middle
        i = len(data) // 2
        newest.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif damage == "truncate":
        newest.write_bytes(data[: len(data) // 3])
    else:
        checkpoint.record_path(newest).unlink()
    with caplog.at_level(logging.WARNING, logger="dcmdp.trainer"):
        path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000002.pt" and state["step"] == 2
    warned = [r for r in caplog.records if "broken checkpoint" in r.getMessage()]
    assert len(warned) == 1
    assert "step-00000003.pt" in warned[0].fields["cause"] and cause in warned[0].fields["cause"]


def test_every_checkpoint_broken_is_a_clear_error(tmp_path):
    for path in _three(tmp_path):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        checkpoint.load_latest(tmp_path)
    for step in (1, 2, 3):
        assert f"step-0000000{step}.pt" in str(err.value)


def test_loading_never_runs_code(tmp_path):
    """A file that matches its record but holds a pickled callable is refused (weights_only)."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = checkpoint.save(tmp_path, 1, _state(1.0))
    torch.save({"step": 1, "rng": {}, "learner": {}, "x": Evil()}, path)
    record = checkpoint.record_path(path)
    record.write_text(json.dumps({"step": 1, "file": path.name, "bytes": path.stat().st_size,
                                  "sha256": checkpoint.sha256_file(path)}))
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        checkpoint.read(path)


def test_non_finite_weights_are_refused(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state(float("nan")))
    with pytest.raises(CheckpointError, match="non-finite"):
        checkpoint.read(path)


def test_torn_metrics_line_is_dropped(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew')
    assert read_metrics(f) == [{"step": 0}, {"step": 1}]
    f.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(f)


def test_resume_falls_back_past_a_corrupted_checkpoint_and_a_torn_metrics_line(tmp_path):
    """End to end, in process: the newest checkpoint corrupted, metrics.jsonl torn mid-line; the
    resumed run continues from the older checkpoint and matches an uninterrupted run."""
    run = tiny_run(algorithm={"steps": 4}, checkpoint={"everySteps": 1, "keep": 3})
    full, part = tmp_path / "full", tmp_path / "part"
    run_inprocess(run, full)
    run_inprocess(run, part, steps=3)  # checkpoints of steps 1, 2 and 3
    newest = checkpoint.latest(part)
    assert newest.name == "step-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    metrics = part / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "reward/me')
    run_inprocess(run, part, steps=4, resume=True)  # from step 2
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(metrics)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    assert [r["constraint/run_lambda"] for r in a] == [r["constraint/run_lambda"] for r in b]
    assert [r["loss/policy"] for r in a] == [r["loss/policy"] for r in b]
