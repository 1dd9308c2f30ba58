"""Built-in tasks, JSONL datasets and verifiers."""

import json
import random

import pytest

from dcmdp.spec import TaskSpec
from dcmdp.tasks import build_task
from dcmdp.tasks.base import contains_match, exact_match, numeric_match, resolve_verifier


def test_addition_is_zero_padded_and_correct():
    t = build_task(TaskSpec(name="addition", digits=2))
    for p in t.sample(random.Random(0), 50):
        a, b = p.prompt[:-1].split("+")
        assert len(a) == len(b) == 2 and p.answer == f"{int(a) + int(b):03d}"
    assert t.max_new_tokens == 4


def test_training_draws_never_hit_the_held_out_set():
    t = build_task(TaskSpec(name="addition", digits=1, held_out=30))
    held = {p.prompt for p in t.held_out()}
    assert len(held) == 30
    assert not held & {p.prompt for p in t.sample(random.Random(1), 500)}


@pytest.mark.parametrize("name,check", [
    ("comparison", lambda p: p.answer in "<>="),
    ("sorting", lambda p: p.answer == "".join(sorted(p.prompt[:-1]))),
])
def test_other_builtin_tasks(name, check):
    t = build_task(TaskSpec(name=name))
    assert all(check(p) for p in t.sample(random.Random(0), 40))
    assert t.reward(t.held_out()[0].answer, t.held_out()[0].answer) == 1.0


def test_jsonl_dataset_with_builtin_and_custom_verifier(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(20)))
    t = build_task(TaskSpec(name="jsonl", dataset={"path": str(f), "verifier": "numeric"}, max_new_tokens=5))
    assert len(t.held_out()) == 2 and t.max_new_tokens == 5
    assert t.reward("3.0", "3") == 1.0
    t2 = build_task(TaskSpec(name="jsonl", dataset={"path": str(f), "verifier": "dcmdp.tasks.base:contains_match"}))
    assert t2.reward("the answer is 7.", "7") == 1.0


def test_jsonl_errors_name_the_field_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"spec.task.dataset.path: .*bad.jsonl:2"):
        build_task(TaskSpec(name="jsonl", dataset={"path": str(f)}))
    with pytest.raises(FileNotFoundError, match="spec.task.dataset.path"):
        build_task(TaskSpec(name="jsonl", dataset={"path": str(tmp_path / "none.jsonl")}))
    with pytest.raises(ValueError, match="spec.task.dataset.verifier"):
        resolve_verifier("no.such.module:fn")


@pytest.mark.parametrize("line, cause", [
    ('{"prompt": null, "answer": null}', "'prompt' is None"),
    ('{"prompt": "   ", "answer": "1"}', "'prompt' is '   '"),
    ('{"prompt": "a", "answer": null}', "'answer' is None"),
    ('{"prompt": "a", "answer": [1]}', "'answer' is [1]"),
    ('{"prompt": "a", "answer": true}', "'answer' is True"),
    ('["a", "1"]', "a list, not an object"),
    ("[" * 100_000, "RecursionError"),
    ('{"prompt": "a", "answer": ' + "9" * 5000 + "}", "ValueError"),
])
def test_jsonl_lines_that_are_not_problems_are_refused_naming_the_line(tmp_path, line, cause):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "answer": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"spec.task.dataset.path: .*bad.jsonl:2: ") as err:
        build_task(TaskSpec(name="jsonl", dataset={"path": str(f)}))
    assert cause in str(err.value)


def test_jsonl_file_errors_name_the_cause(tmp_path):
    with pytest.raises(ValueError, match="is not a regular file"):
        build_task(TaskSpec(name="jsonl", dataset={"path": str(tmp_path)}))
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8"):
        build_task(TaskSpec(name="jsonl", dataset={"path": str(f)}))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": "2"}\n')
    task = build_task(TaskSpec(name="jsonl", dataset={"path": str(bom)}))
    assert sorted(p.answer for p in task.problems()) == ["1", "2"]


def test_verifiers():
    assert exact_match(" 12", "12") == 1.0 and exact_match("13", "12") == 0.0
    assert numeric_match("x", "1") == 0.0 and numeric_match("1e0", "1") == 1.0
    assert contains_match("abc", "") == 0.0
