"""Running a plan: warm starts, then the cells on a pool of worker processes (each cell an
ordinary local run through the ``dcmdp.runners`` entry points), reference cells before the cells
whose tolerance they calibrate; resumable (a finished cell leaves ``cell.json``)."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dcmdp import yamlfile
from dcmdp.runners import runner
from dcmdp.spec import parse_run
from dcmdp.sweep.cells import cell_dir, cell_done, cell_metrics, mean_delta, warm_start_dir
from dcmdp.sweep.plan import Cell, Plan, merge, warm_start_manifest
from dcmdp.sweep.spec import DCMDPSweep


# ------------------------------------------------------------------------------------ the worker
def _worker_run(manifest: dict[str, Any], out_dir: str, threads: int, queue: Any, cid: str) -> dict[str, Any]:
    """Run one cell in a worker process: the in-process runner of the trainer package, or the
    process runner (trainer and rollout worker as child processes) for a ``vllm`` pool, whose
    worker runs under the vLLM venv's own Python."""
    run = parse_run(manifest, cid)
    out = Path(out_dir)

    def on_step(row: dict[str, Any]) -> None:
        if queue is not None:
            queue.put((cid, int(row["step"]) + 1, float(row.get("reward/mean", 0.0))))

    t0 = time.time()
    mode = "processes" if any(p.engine == "vllm" for p in run.spec.rollout.pools) else "inprocess"
    summary = runner(mode)(run, out, on_step=on_step, threads=threads)
    return {"wall_s": time.time() - t0, "steps": summary.get("steps")}


# ------------------------------------------------------------------------------------ the runner
def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def resolve_tolerance(out: Path, p: Plan, cell: Cell) -> float:
    """c of a relative cell: factor × mean δ̄ of its finished reference cells (mean over seeds)."""
    assert cell.relative is not None
    refs = [p.cell(d) for d in cell.deps]
    deltas = [mean_delta(out, r) for r in refs if cell_done(out, r, p.steps)]
    deltas = [d for d in deltas if math.isfinite(d)]
    if not deltas:
        raise RuntimeError(f"{cell.id}: no finished reference cell ({cell.relative.relative_to}) to derive c from")
    ref = sum(deltas) / len(deltas)
    c = max(cell.relative.factor * ref, 1e-12)
    calib = out / "calibration.json"
    table = json.loads(calib.read_text()) if calib.exists() else {}
    table.setdefault(cell.source, {})[cell.relative.relative_to] = {"mean_delta": ref, "seeds": len(deltas)}
    table[cell.source].setdefault("tolerance", {})[cell.algorithm] = c
    calib.write_text(json.dumps(table, indent=2))
    return c


class Runner:
    """Schedules the cells of a plan on a pool of worker processes, with a rich progress view."""

    def __init__(self, p: Plan, out: Path, *, parallel: Optional[int] = None, threads: Optional[int] = None,
                 quiet: bool = False, log: Any = None):
        self.p, self.out = p, out
        self.parallel = parallel or p.sweep.spec.parallel
        self.threads = threads or p.sweep.spec.threads
        self.quiet = quiet
        self.log = log or (lambda msg: None)
        self.failed: dict[str, str] = {}
        self.ran = 0
        self.t_start = time.time()

    def run(self) -> dict[str, Any]:
        out, p = self.out, self.p
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(p.sweep.model_dump(mode="json", by_alias=True), indent=2))
        t_start = self.t_start = time.time()
        todo = [c for c in p.cells if not cell_done(out, c, p.steps)]
        seeds_needed = sorted({self.ws_seed(c) for c in todo}) if p.sweep.spec.shared_warm_start else []
        self.warm = [s for s in seeds_needed if not (warm_start_dir(out, s) / "model" / "config.json").exists()]
        self.warm_pending = list(self.warm)
        self.pending = list(todo)
        self.done_ids = {c.id for c in p.cells} - {c.id for c in todo}
        self.running: dict[Future, tuple[str, Any]] = {}
        self.bars: dict[str, Any] = {}
        skipped = len(p.cells) - len(todo)
        ctx = mp.get_context("spawn")
        manager = ctx.Manager()
        self.queue = manager.Queue()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=self.quiet,
                                 console=Console(width=None if sys.stdout.isatty() else 200))
        title = f"[bold]{p.sweep.metadata.name}" + (f" ({p.part})" if p.part else "")
        self.overall = self.progress.add_task(title, total=len(p.cells), completed=skipped,
                                              info=f"{skipped} already done" if skipped else "")
        pool = ProcessPoolExecutor(self.parallel, mp_context=ctx)
        try:
            with self.progress:
                while self.pending or self.warm_pending or self.running:
                    self._submit(pool)
                    if not self.running:
                        for c in self.pending:  # nothing ready, nothing running: unsatisfiable
                            self._fail(c.id, "its reference cells failed")
                        break
                    finished, _ = wait(list(self.running), timeout=0.5, return_when=FIRST_COMPLETED)
                    self._drain()
                    for fut in finished:
                        self._collect(fut)
        except BaseException:
            # interrupted (Ctrl-C, SIGTERM): stop the running cells now instead of waiting for them;
            # they restart from scratch on the next invocation
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            manager.shutdown()
            self._state(time.time() - t_start, self.ran)
            raise
        pool.shutdown()
        manager.shutdown()
        wall = time.time() - t_start
        state = self._state(wall, self.ran)
        return {"cells": len(p.cells), "ran": self.ran, "skipped": skipped,
                "failed": dict(self.failed), "wall_s": wall, "total_wall_s": state["total_wall_s"]}

    def _submit(self, pool: ProcessPoolExecutor) -> None:
        """Start warm starts, then ready cells, until ``parallel`` are running."""
        out, p = self.out, self.p
        while len(self.running) < self.parallel and (self.warm_pending or self.pending):
            if self.warm_pending:
                seed = self.warm_pending.pop(0)
                d = warm_start_dir(out, seed)
                shutil.rmtree(d, ignore_errors=True)
                cid = f"warmstart/seed{seed}"
                fut = pool.submit(_worker_run, warm_start_manifest(p.sweep, seed), str(d), self.threads, None, cid)
                self.running[fut] = (cid, seed)
                self.bars[cid] = self.progress.add_task(f"  warm start seed {seed}", total=1, info="")
                continue
            cell = self._next_ready()
            if cell is None:
                return
            self.pending.remove(cell)
            try:
                manifest = self._finalise(cell)
            except RuntimeError as exc:
                self._fail(cell.id, str(exc))
                continue
            d = cell_dir(out, cell)
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            (d / "run.yaml").write_text(yamlfile.dumps(manifest))
            fut = pool.submit(_worker_run, manifest, str(d), self.threads, self.queue, cell.id)
            self.running[fut] = (cell.id, cell)
            self.bars[cell.id] = self.progress.add_task(f"  {cell.id}", total=p.steps, info="")

    def _collect(self, fut: Future) -> None:
        """A worker finished: record the cell (or the warm start), or its failure."""
        cid, what = self.running.pop(fut)
        self.progress.remove_task(self.bars.pop(cid))
        err = fut.exception()
        if isinstance(what, int):  # a warm start
            self.warm.remove(what)
            if err is not None:
                self._fail(cid, repr(err), count=False)
                for c in [c for c in self.pending if self.ws_seed(c) == what]:
                    self.pending.remove(c)
                    self._fail(c.id, f"the warm start of seed {what} failed")
            return
        if err is not None:
            self._fail(cid, repr(err))
            return
        res = fut.result()
        info = self._finish(what, res)
        self.done_ids.add(cid)
        self.ran += 1
        self._state(time.time() - self.t_start, self.ran, running=True)
        self.progress.advance(self.overall)
        self.progress.update(self.overall, info=f"last: {cid} {res['wall_s']:.0f}s")
        self.progress.console.print(
            f"{time.strftime('%H:%M:%S')} done {cid}: {res['wall_s']:.0f} s, greedy {_num(info.get('greedy'))}, "
            f"sampled {_num(info.get('sampled'))}, δ̄ {_num(info.get('delta_mean'), '.2e')}"
            + (", collapsed" if info.get("collapsed") else ""))

    # -- helpers ---------------------------------------------------------------------------
    def ws_seed(self, cell: Cell) -> int:
        """The seed of the warm start a cell starts from."""
        ws = self.p.sweep.spec.warm_start_seed
        return cell.seed if ws is None else ws

    def _next_ready(self) -> Optional[Cell]:
        for c in self.pending:
            if self.ws_seed(c) in self.warm:
                continue
            if all(d in self.done_ids for d in c.deps):
                return c
        return None

    def _finalise(self, cell: Cell) -> dict[str, Any]:
        m = copy.deepcopy(cell.manifest)
        spec = m["spec"]
        if self.p.sweep.spec.shared_warm_start:
            folder = (warm_start_dir(self.out, self.ws_seed(cell)) / "model").resolve()
            spec["model"] = merge(spec.get("model", {}), {"path": str(folder), "warmStart": {"steps": 0}})
        if cell.relative is not None:
            spec["algorithm"]["constraint"]["tolerance"] = resolve_tolerance(self.out, self.p, cell)
        parse_run(m, cell.id)
        return m

    def _finish(self, cell: Cell, res: dict[str, Any]) -> dict[str, Any]:
        d = cell_dir(self.out, cell)
        info = {"source": cell.source, "algorithm": cell.algorithm, "seed": cell.seed, "steps": res["steps"],
                "wall_s": res["wall_s"]}
        info.update(cell_metrics(d, self.p.sweep.spec.collapse))
        if res["steps"] == self.p.steps:
            # the sweep reads metrics/eval/summary only: drop the checkpoint (all lagged weight
            # versions) and the copy of the warm-started model, which are megabytes per cell
            for heavy in ("checkpoints", "model"):
                shutil.rmtree(d / heavy, ignore_errors=True)
            (d / "cell.json").write_text(json.dumps(info, indent=2))
        else:
            self._fail(cell.id, f"stopped after {res['steps']} of {self.p.steps} steps")
        return info

    def _fail(self, cid: str, why: str, count: bool = True) -> None:
        """Record a failure; a failed cell counts as settled (its dependents use the other seeds)."""
        if count:
            self.done_ids.add(cid)
            self.progress.advance(self.overall)
        self.failed[cid] = why
        self.log(f"cell {cid} failed: {why}")
        with (self.out / "failures.jsonl").open("a") as fh:
            fh.write(json.dumps({"cell": cid, "error": why, "time": time.time()}) + "\n")

    def _drain(self) -> None:
        """Move the running cells' bars to their latest step (the workers report every step)."""
        latest: dict[str, tuple[int, float]] = {}
        while True:
            try:
                cid, step, reward = self.queue.get_nowait()
            except Exception:  # queue.Empty (through the manager proxy)
                break
            latest[cid] = (step, reward)
        for cid, (step, reward) in latest.items():
            if cid in self.bars:
                self.progress.update(self.bars[cid], completed=step, info=f"reward {reward:.2f}")

    def _state(self, wall: float, ran: int, running: bool = False) -> dict[str, Any]:
        """Record this invocation's wall time in state.json (updated as cells finish, so a report
        written while the grid runs shows the time so far)."""
        f = self.out / "state.json"
        state = json.loads(f.read_text()) if f.exists() else {"invocations": []}
        entry = {"started": self.t_start, "part": self.p.part, "wall_s": wall, "cells_run": ran, "running": running,
                 "parallel": self.parallel, "threads": self.threads, "cpus": os.cpu_count()}
        state["invocations"] = [i for i in state["invocations"] if i.get("started") != self.t_start] + [entry]
        state["total_wall_s"] = sum(i["wall_s"] for i in state["invocations"])
        f.write_text(json.dumps(state, indent=2))
        return state


def default_out(sweep: DCMDPSweep, part: Optional[str], steps: Optional[int] = None) -> Path:
    """The cell folder: one for the whole grid and all its parts (a cell's id is unique in the grid,
    so parts share their reference cells); the quick grid and --steps overrides get their own."""
    suffix = "-quick" if part == "quick" else ""
    suffix += f"-steps{steps}" if steps else ""
    return Path("runs") / "sweeps" / (sweep.metadata.name + suffix)
