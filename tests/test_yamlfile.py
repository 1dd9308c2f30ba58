"""Manifests that cannot surprise: every hostile or broken file is a clear error naming the cause,
and every YAML the project writes reads back as what was written."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dcmdp import spec as S
from dcmdp import yamlfile
from dcmdp.cli import main as cli_main
from dcmdp.spec import SpecError, dump_run, load_run, parse_run

RUN = "apiVersion: dcmdp.io/v1alpha1\nkind: DCMDPRun\nmetadata:\n  name: demo\n"

BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _error(tmp_path: Path, content, name: str = "run.yaml") -> SpecError:
    f = tmp_path / name
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content)
    with pytest.raises(SpecError) as err:
        load_run(f)
    return err.value


@pytest.mark.parametrize("content, where, words", [
    (RUN + "spec:\n  algorithm: {steps: 3}\nspec:\n  algorithm: {steps: 4}\n", "(yaml)", "duplicate key 'spec'"),
    (RUN + "spec: {algorithm: {steps: 3, steps: 4}}\n", "(yaml)", "duplicate key 'steps'"),
    (RUN + "---\n" + RUN.replace("demo", "other"), "kind", "2 documents of kind DCMDPRun"),
    (RUN + "status: " + "[" * 200 + "]" * 200 + "\n", "(yaml)", "nested"),
    (RUN + "status:\n" + BOMB.replace("\n", "\n  ").replace("a: &a", "  a: &a", 1), "(yaml)", "alias bomb"),
    (RUN.encode() + b"spec:\n  task: {name: \xff\xfe}\n", "(file)", "not UTF-8"),
])
def test_hostile_files_are_clear_errors(tmp_path, content, where, words):
    t0 = time.perf_counter()
    err = _error(tmp_path, content)
    assert time.perf_counter() - t0 < 5
    assert where in dict(err.errors), err.errors
    assert words in dict(err.errors)[where], err.errors


def test_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="is a directory"):
        load_run(tmp_path)
    assert cli_main(["validate", "-f", str(tmp_path)]) == 2


def test_merge_keys_may_be_overridden():
    assert yamlfile.loads("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  q: 3\n") == [{"a": {"p": 1, "q": 2},
                                                                          "b": {"p": 1, "q": 3}}]


def test_metadata_is_validated_as_kubernetes_does():
    def errors(meta):
        with pytest.raises(SpecError) as err:
            parse_run({"apiVersion": S.API_VERSION, "kind": S.KIND, "metadata": meta})
        return dict(err.value.errors)

    assert "DNS-1035" in errors({"name": "1run"})["metadata.name"]
    assert "at most 51" in errors({"name": "a" * 52})["metadata.name"]
    assert "DNS-1123" in errors({"name": "ok", "namespace": "Bad_NS"})["metadata.namespace"]
    assert "name part" in errors({"name": "ok", "labels": {"bad key!": "v"}})["metadata.labels"]
    assert "value" in errors({"name": "ok", "labels": {"team": "has space"}})["metadata.labels"]
    assert "prefix" in errors({"name": "ok", "annotations": {"Bad_Prefix/x": "v"}})["metadata.annotations"]
    assert "string" in errors({"name": "ok", "annotations": {"n": 5}})["metadata.annotations.n"]
    assert "unknown field" in errors({"name": "ok", "lables": {}})["metadata.lables"]
    ok = parse_run({"apiVersion": S.API_VERSION, "kind": S.KIND, "metadata": {
        "name": "ok", "namespace": "team-a", "labels": {"app.kubernetes.io/name": "x", "empty": ""},
        "annotations": {"example.com/note": "any text at all"}, "uid": "u-1", "resourceVersion": "7",
        "generation": 2, "creationTimestamp": "2026-01-01T00:00:00Z"}})
    assert ok.metadata.labels == {"app.kubernetes.io/name": "x", "empty": ""}


def test_run_and_pool_names_must_fit_the_child_names():
    with pytest.raises(SpecError, match="together exceed 54"):
        parse_run({"apiVersion": S.API_VERSION, "kind": S.KIND, "metadata": {"name": "a" * 40},
                   "spec": {"rollout": {"pools": [{"name": "b" * 15}]}}})


TRICKY = ["2e3", "1e5", "123", "0x1f", "0o17", "true", "false", "null", "yes", "no", "on", "off", "1-0", "nan"]


@pytest.mark.parametrize("pool", TRICKY)
def test_number_bool_and_null_like_names_round_trip(tmp_path, pool):
    """What the launcher (run.yaml), the operator (ConfigMap) and ``validate --print`` write reads
    back with the same types."""
    run = parse_run({"apiVersion": S.API_VERSION, "kind": S.KIND,
                     "metadata": {"name": "r" + pool, "labels": {"pool": pool}, "annotations": {"a": pool}},
                     "spec": {"rollout": {"pools": [{"name": pool}]}}})
    manifest = dump_run(run)
    for text in (yamlfile.dumps(manifest), yamlfile.dumps(manifest, sort_keys=True)):
        assert yamlfile.loads(text) == [manifest]
        f = tmp_path / "back.yaml"
        f.write_text(text)
        assert dump_run(load_run(f)) == manifest


def test_operator_configmap_round_trips():
    from dcmdp_operator.children import CONFIG_KEY, read_accepted, run_config

    run = parse_run({"apiVersion": S.API_VERSION, "kind": S.KIND, "metadata": {"name": "r", "namespace": "ns"},
                     "spec": {"rollout": {"pools": [{"name": "2e3"}, {"name": "true"}]}}})
    data = run_config(run, {"name": "r", "namespace": "ns", "uid": "u"})
    cm = {"data": {CONFIG_KEY: yamlfile.dumps(data, sort_keys=True)}}
    back = read_accepted(cm)
    assert back == data
    assert [p["name"] for p in back["spec"]["rollout"]["pools"]] == ["2e3", "true"]


def test_a_dash_reads_standard_input(monkeypatch):
    import io
    import sys

    from dcmdp import yamlfile

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a: 1\n---\nb: [2]\n")))
    assert yamlfile.read_documents("-") == [{"a": 1}, {"b": [2]}]
