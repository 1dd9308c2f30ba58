"""The progress bar's line: each pool's δ̄, c and applied λ (never the run-level multiplier)."""

from dcmdp.progress import step_stats


def test_the_bar_shows_each_pools_applied_lambda():
    row = {"step": 4, "reward/mean": 0.5, "constraint/run_lambda": 0.281,
           "pool/bf16/discrepancy/prob_diff_mean": 0.0012, "pool/bf16/constraint/tolerance": 0.002,
           "pool/bf16/constraint/lambda": 0.144,
           "pool/int8/discrepancy/prob_diff_mean": 0.0031, "pool/int8/constraint/tolerance": None,
           "pool/int8/constraint/lambda": 0.118}
    assert step_stats(row) == ("reward 0.500 | bf16 δ̄ 1.2e-03 c 2.0e-03 λ 0.144 | "
                               "int8 δ̄ 3.1e-03 c — λ 0.118")  # c while `auto` calibrates: —
    assert "0.281" not in step_stats(row)
