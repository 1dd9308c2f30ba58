"""Metric sinks: JSONL (resume truncation, NaN → null), Prometheus names and pool labels."""

import math

from prometheus_client import generate_latest

from dcmdp.metrics import JsonlSink, PrometheusSink, prometheus_name, read_metrics, split_pool_key


def test_jsonl_writes_null_for_non_finite_and_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(5):
        sink.write({"step": step, "x": math.nan if step == 1 else float(step)})
    sink.close()
    assert read_metrics(path)[1]["x"] is None
    JsonlSink(path, truncate_from_step=3).close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    JsonlSink(path).close()  # a fresh run starts a fresh file
    assert read_metrics(path) == []


def test_prometheus_names_and_pool_labels():
    assert prometheus_name("discrepancy/prob_diff_mean") == "dcmdp_discrepancy_prob_diff_mean"
    assert split_pool_key("pool/bf16/constraint/lambda") == ("bf16", "constraint/lambda")
    assert split_pool_key("constraint/lambda") == (None, "constraint/lambda")
    sink = PrometheusSink()
    sink.write({"step": 3, "constraint/lambda": 0.25, "pool/bf16/constraint/lambda": 0.5, "constraint/tolerance": None})
    text = generate_latest(sink.registry).decode()
    assert "dcmdp_constraint_lambda 0.25" in text
    assert 'dcmdp_pool_constraint_lambda{pool="bf16"} 0.5' in text
    assert "dcmdp_constraint_tolerance" not in text
