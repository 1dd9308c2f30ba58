"""The terminal view of a run: a rich progress bar with reward, δ̄ and λ, and a final summary table."""

from __future__ import annotations

import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class RunProgress:
    """The bar on a terminal. Elsewhere (a pipe, a CI log, ``make demo > log``) rich draws no live bar,
    so a plain line is printed when the run starts (with ``before``: what happens before the first
    step, e.g. the warm start) and every ``every`` steps, and the last step's line at the end."""

    def __init__(self, total: int, start: int = 0, console: Optional[Console] = None, enabled: bool = True,
                 *, before: str = "", every: int = 10, resuming: bool = False):
        self.console = console or Console(stderr=True)
        if not self.console.is_terminal:
            self.console.soft_wrap = True  # a log file gets whole lines, not 80-column fragments
        self.enabled = enabled
        self.total, self.start, self.before, self.every = total, start, before, max(1, every)
        self.resuming = resuming  # (the step it resumes from is the trainer's to find: the banner does not guess)
        self.plain = enabled and not self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, disable=not enabled or self.plain, transient=False,
        )
        self.task = self.progress.add_task("DC-GRPO", total=total, completed=start, stats="")
        self.last: dict[str, Any] = {}

    def __enter__(self) -> "RunProgress":
        self.progress.__enter__()
        if self.plain:
            steps = (f"resuming from its last checkpoint, up to step {self.total}" if self.resuming
                     else f"steps {self.start + 1}-{self.total}")
            self.console.print(f"run: {steps}" + (f"; first {self.before}" if self.before else ""), highlight=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.plain and self.last and (self.last["step"] + 1) % self.every:
            self._line(self.last)
        self.progress.__exit__(*exc)

    def step(self, row: dict[str, Any]) -> None:
        self.last = row
        self.progress.update(self.task, completed=row["step"] + 1, stats=step_stats(row))
        if self.plain and (row["step"] + 1) % self.every == 0:
            self._line(row)

    def _line(self, row: dict[str, Any]) -> None:
        self.console.print(f"{time.strftime('%H:%M:%S')} step {row['step'] + 1}/{self.total}: {step_stats(row)}",
                           highlight=False)

    def eval(self, row: dict[str, Any]) -> None:
        acc = {k.split("/")[-1]: v for k, v in row.items() if k.startswith("eval/")}
        self.progress.console.print(f"[dim]eval @ step {row['step']}: " +
                                    ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def step_stats(row: dict[str, Any]) -> str:
    """``reward 0.512 | bf16 δ̄ 1.2e-03 c 2.0e-03 λ 0.144 | int8 …``: the reward, then each pool's
    δ̄, c and the λ applied to its tokens (``—`` for c while ``auto`` calibrates)."""
    pools = sorted({k.split("/")[1] for k in row if k.startswith("pool/") and k.endswith("/discrepancy/prob_diff_mean")})
    parts = [f"reward {_num(row.get('reward/mean'), '.3f')}"]
    for p in pools:
        pre = f"pool/{p}/"
        parts.append(f"{p} δ̄ {_num(row.get(pre + 'discrepancy/prob_diff_mean'), '.1e')} "
                     f"c {_num(row.get(pre + 'constraint/tolerance'), '.1e')} λ {_num(row.get(pre + 'constraint/lambda'), '.3f')}")
    return " | ".join(parts)


def summary_table(summary: dict[str, Any], last: dict[str, Any], total_s: Optional[float] = None) -> Table:
    """The end-of-run table. ``total_s``: the whole command's seconds (start-up and warm start
    included); the summary's ``wall_s`` counts the RL steps only."""
    t = Table(title="dcmdp run summary")
    t.add_column("what"); t.add_column("value", justify="right")
    t.add_row("steps", str(summary.get("steps")))
    rl = f"{summary.get('wall_s', 0):.1f} s"
    t.add_row("wall time", f"{total_s:.1f} s in all, RL steps {rl}" if total_s is not None else f"RL steps {rl}")
    evals = summary.get("eval") or []
    if evals:
        first, final = evals[0], evals[-1]
        for key in ("eval/accuracy_greedy", "eval/accuracy_sampled"):
            if key in first and key in final:
                t.add_row(f"held-out {key.split('_')[-1]} accuracy", f"{first[key]:.3f} → {final[key]:.3f}")
    if "reward/mean" in last:
        t.add_row("last reward", f"{last['reward/mean']:.3f}")
    pools = [k.split("/")[1] for k in last if k.startswith("pool/") and k.endswith("/discrepancy/prob_diff_mean")]
    lambdas, tolerances = summary.get("lambdas") or {}, summary.get("tolerances") or {}
    for pool in pools:
        d = last[f"pool/{pool}/discrepancy/prob_diff_mean"]
        c = tolerances.get(pool)
        lam = lambdas.get(pool)
        t.add_row(f"pool {pool}, last step: δ̄ / c / updated λ", f"{d:.2e} / " + (f"{c:.2e}" if c is not None else "—") + " / "
                  + (f"{lam:.3f}" if lam is not None else "— (no constraint)"))
    return t
