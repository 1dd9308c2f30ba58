"""``dcmdp``: run, validate and inspect DCMDPRun manifests on one machine.

    dcmdp run -f run.yaml [--steps N] [--out DIR] [--resume] [--inprocess]
    dcmdp validate -f run.yaml
    dcmdp plot DIR
    dcmdp sweep -f sweep.yaml [--quick | --part NAME] [--out DIR] [--parallel N] [--report-only]

The runners are found through the ``dcmdp.runners`` entry points, so the core never imports the
trainer or the rollout packages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import yaml

from dcmdp.plots import plot_run
from dcmdp.progress import RunProgress, summary_table
from dcmdp.runners import installed, runner
from dcmdp.spec import SpecError, dump_run, load_run
from dcmdp.sweep import cli as sweep_cli


def cmd_validate(args: argparse.Namespace) -> int:
    run = load_run(args.file)
    if args.print:
        print(yaml.safe_dump(dump_run(run), sort_keys=False))
    else:
        pools = ", ".join(f"{p.name} ({p.engine}/{p.precision}×{p.replicas})" for p in run.spec.rollout.pools)
        print(f"{args.file}: valid {run.kind} {run.metadata.name!r}: {run.spec.algorithm.name}, "
              f"{run.spec.algorithm.steps} steps, pools {pools}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    run = load_run(args.file)
    out = Path(args.out or f"runs/{run.metadata.name}")
    total = args.steps or run.spec.algorithm.steps
    mode = "inprocess" if args.inprocess else "processes"
    if mode not in installed():
        mode = "inprocess"
    fn = runner(mode)
    with RunProgress(total, enabled=not args.quiet) as bar:
        summary = fn(run, out, steps=args.steps, resume=args.resume, on_step=bar.step, on_eval=bar.eval,
                     threads=args.threads)
    plots = plot_run(out)
    bar.console.print(summary_table(summary, bar.last))
    bar.console.print(f"metrics: {out / 'metrics.jsonl'}  plots: {', '.join(p.name for p in plots)}  "
                      f"tensorboard: {out / 'tensorboard'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    for p in plot_run(Path(args.dir)):
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dcmdp", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a DCMDPRun manifest on this machine")
    r.add_argument("-f", "--file", required=True, help="DCMDPRun manifest (YAML)")
    r.add_argument("--steps", type=int, default=None, help="override spec.algorithm.steps")
    r.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    r.add_argument("--inprocess", action="store_true", help="trainer and engines in this process (no gRPC)")
    r.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = default)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="check a manifest without running it")
    v.add_argument("-f", "--file", required=True)
    v.add_argument("--print", action="store_true", help="print the resolved manifest (defaults filled in)")
    v.set_defaults(fn=cmd_validate)

    p = sub.add_parser("plot", help="(re)draw the PNG plots of a run folder")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_plot)

    sweep_cli.add_parser(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", None) is not None and args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
