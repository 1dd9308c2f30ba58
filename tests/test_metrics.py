"""Metric sinks: JSONL (resume truncation, NaN → null), Prometheus names and pool labels."""

import math
import re
from pathlib import Path

from prometheus_client import generate_latest

from dcmdp.metrics import REQUIRED_KEYS, JsonlSink, PrometheusSink, prometheus_name, read_metrics, split_pool_key

TABLE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def documented_patterns() -> list[str]:
    """The key names of docs/metrics.md's table as regular expressions (``<pool>`` any pool name,
    ``…/x`` the previous name's folder + x)."""
    out = []
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        prev = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if name.startswith("…/"):
                name = prev.rsplit("/", 1)[0] + name[1:]
            prev = name
            out.append("^" + re.escape(name).replace(re.escape("<pool>"), "[^/]+") + "$")
    return out


def documented(key: str) -> bool:
    return any(re.match(p, key) for p in documented_patterns())


def test_the_metrics_table_names_the_required_keys():
    assert all(documented(k) for k in REQUIRED_KEYS)
    assert documented("pool/bf16/constraint/lambda") and documented("pool/int8/discrepancy/k3_kl")
    assert not documented("constraint/lambda") and not documented("pool/bf16/constraint/typo")


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
    sink.write({"step": 3, "constraint/run_lambda": 0.25, "pool/bf16/constraint/lambda": 0.5, "constraint/tolerance": None})
    text = generate_latest(sink.registry).decode()
    assert "dcmdp_constraint_run_lambda 0.25" in text
    assert 'dcmdp_pool_constraint_lambda{pool="bf16"} 0.5' in text
    assert "dcmdp_constraint_tolerance" not in text
