"""The progress bar's line: each pool's δ̄, c and applied λ (never the run-level multiplier); off a
terminal (a pipe, a CI log) plain lines replace the live bar."""

import io

from rich.console import Console

from dcmdp.progress import RunProgress, step_stats, summary_table


def test_the_bar_shows_each_pools_applied_lambda():
    row = {"step": 4, "reward/mean": 0.5, "constraint/run_lambda": 0.281,
           "pool/bf16/discrepancy/prob_diff_mean": 0.0012, "pool/bf16/constraint/tolerance": 0.002,
           "pool/bf16/constraint/lambda": 0.144,
           "pool/int8/discrepancy/prob_diff_mean": 0.0031, "pool/int8/constraint/tolerance": None,
           "pool/int8/constraint/lambda": 0.118}
    assert step_stats(row) == ("reward 0.500 | bf16 δ̄ 1.2e-03 c 2.0e-03 λ 0.144 | "
                               "int8 δ̄ 3.1e-03 c — λ 0.118")  # c while `auto` calibrates: —
    assert "0.281" not in step_stats(row)


def row(step: int) -> dict:
    return {"step": step, "reward/mean": 0.5, "pool/bf16/discrepancy/prob_diff_mean": 1.2e-3,
            "pool/bf16/constraint/tolerance": 2e-3, "pool/bf16/constraint/lambda": 0.144}


def test_off_a_terminal_it_prints_the_start_every_tenth_step_and_the_last():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=40)  # narrower than a line
    with RunProgress(25, console=console, before="a 130-step supervised warm start") as bar:
        for k in range(25):
            bar.step(row(k))
    import re

    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in out.getvalue().splitlines()]
    stats = step_stats(row(0))
    assert lines == ["run: steps 1-25; first a 130-step supervised warm start",
                     f"step 10/25: {stats}", f"step 20/25: {stats}", f"step 25/25: {stats}"]  # no bar, no wrap


def test_quiet_prints_nothing():
    out = io.StringIO()
    with RunProgress(5, console=Console(file=out, force_terminal=False), enabled=False) as bar:
        bar.step(row(0))
    assert out.getvalue() == ""


def test_a_resumed_run_does_not_claim_to_start_at_step_one():
    out = io.StringIO()
    with RunProgress(15, console=Console(file=out, force_terminal=False), resuming=True):
        pass
    assert out.getvalue().splitlines() == ["run: resuming from its last checkpoint, up to step 15"]


def test_the_summary_says_which_wall_time_is_which():
    out = io.StringIO()
    Console(file=out, force_terminal=False, width=120).print(summary_table({"steps": 3, "wall_s": 12.5}, {},
                                                                          total_s=80.25))
    assert "80.2 s in all, RL steps 12.5 s" in out.getvalue() or "80.3 s in all, RL steps 12.5 s" in out.getvalue()
