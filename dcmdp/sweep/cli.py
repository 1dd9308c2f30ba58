"""``dcmdp sweep -f sweep.yaml [--quick | --part NAME] [--only SRC/ALGO] [--report-only] ...``:
plan the grid, run what is not finished, write the report."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from dcmdp.cli_args import MAX_THREADS, at_least
from dcmdp.spec import SpecError
from dcmdp.sweep.cells import cell_done
from dcmdp.sweep.plan import filter_cells, load_sweep, plan
from dcmdp.sweep.report import table_markdown, write_report
from dcmdp.sweep.run import Runner, default_out


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``sweep`` subcommand of ``dcmdp`` (``sub``: the parser's subparsers)."""
    w = sub.add_parser("sweep", help="run a grid of local runs (DCMDPSweep) and aggregate it (resumable)")
    w.add_argument("-f", "--file", required=True, help="DCMDPSweep file (YAML)")
    w.add_argument("--quick", action="store_true", help="the sweep's quick variant (fewer steps/seeds/cells)")
    w.add_argument("--part", default=None, help="run one named part of the grid (spec.parts)")
    w.add_argument("--out", default=None, help="cell folder (default runs/sweeps/<name>[-<part>|-quick])")
    w.add_argument("--parallel", type=at_least(1), default=None, help="cells at once (default spec.parallel)")
    w.add_argument("--threads", type=at_least(1, MAX_THREADS), default=None, help="torch threads per cell (default spec.threads)")
    w.add_argument("--steps", type=int, default=None, help="override the steps per cell (smoke tests)")
    w.add_argument("--only", default=None, help="comma-separated SOURCE/ALGORITHM filters (either may be *)")
    w.add_argument("--report-dir", default=None, help="where the tables and PNGs go (default spec.report.dir)")
    w.add_argument("--no-doc", action="store_true", help="do not rewrite the section of spec.report.doc")
    w.add_argument("--report-only", action="store_true", help="aggregate the finished cells; run nothing")
    w.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(fn=sweep_main)
    return w


def sweep_main(args: Any) -> int:
    console = Console(stderr=True)
    sweep = load_sweep(args.file)
    if args.steps is not None and args.steps < 1:
        raise SpecError([("--steps", "must be >= 1")], "command line")
    if args.quick and args.part:
        raise SpecError([("--part", "give --quick or --part, not both")], "command line")
    part = "quick" if args.quick else args.part
    p = filter_cells(plan(sweep, part=part, source=args.file, steps=args.steps), args.only)
    out = Path(args.out) if args.out else default_out(sweep, part, args.steps)
    if args.dry_run:
        for c in p.cells:
            mark = "done" if cell_done(out, c, p.steps) else ("after " + ", ".join(c.deps) if c.deps else "ready")
            print(f"{c.id:50s} {mark}")
        print(f"{len(p.cells)} cells, {p.steps} steps each, out {out}")
        return 0
    official = not (args.quick or args.only or args.steps) and sweep.spec.report is not None
    here = Path(args.file).parent
    if args.report_dir:
        dest = Path(args.report_dir)
    elif official:
        dest = here / sweep.spec.report.dir / (part or "all")
    else:
        dest = out / "report"
    doc = here / sweep.spec.report.doc if official and sweep.spec.report.doc and not args.no_doc else None
    # the command that (re)produces the report: as typed, less the flags that only change the view
    if sys.argv[1:2] == ["sweep"]:
        argv = [a for a in sys.argv[2:] if a not in ("--report-only", "--quiet", "--no-doc")]
        command = "dcmdp sweep " + " ".join(shlex.quote(a) for a in argv)
    else:
        command = f"dcmdp sweep -f {args.file}" + (" --quick" if args.quick else f" --part {part}" if part else "")
    if not args.report_only:
        def _stop(signum: int, frame: Any) -> None:  # `kill PID` stops the workers too
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
        res = Runner(p, out, parallel=args.parallel, threads=args.threads, quiet=args.quiet,
                     log=lambda m: console.print(f"[red]{m}")).run()
        console.print(f"{res['ran']} cells run, {res['skipped']} already done, {len(res['failed'])} failed; "
                      f"{res['wall_s'] / 60:.1f} min (total {res['total_wall_s'] / 60:.1f} min)")
    data = write_report(out, p, dest, doc, command)
    console.print(f"report: {dest}" + (f"; section of {doc} rewritten" if doc else "") +
                  f" ({len(data['cells'])} of {len(p.cells)} cells finished)")
    print(table_markdown(p, data, "greedy"))
    return 1 if (not args.report_only and res["failed"]) else 0
