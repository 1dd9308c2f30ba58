"""``dcmdp``: run, validate and inspect DCMDPRun manifests on one machine.

    dcmdp run -f run.yaml [--steps N] [--out DIR] [--resume | --overwrite] [--inprocess]
    dcmdp validate -f run.yaml
    dcmdp plot DIR
    dcmdp export RUN_DIR --to DIR [--step N] [--dtype auto|bf16|fp16|fp32] [--overwrite]
    dcmdp sweep -f sweep.yaml [--quick | --part NAME] [--out DIR] [--parallel N] [--report-only]

The runners are found through the ``dcmdp.runners`` entry points, so the core never imports the
trainer or the rollout packages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from dcmdp import yamlfile
from dcmdp.cli_args import threads
from dcmdp.plots import plot_run
from dcmdp.preflight import check_inputs, check_paths
from dcmdp.progress import RunProgress, summary_table
from dcmdp.ranks import gpus_per_replica
from dcmdp.runners import installed, runner, tool
from dcmdp.spec import SpecError, dump_run, load_run
from dcmdp.sweep import cli as sweep_cli


# Files that mark a folder as holding a run (written by the trainer in --out), and everything else a
# run writes there: --overwrite deletes exactly these, never other files of the folder.
RUN_MARKERS = ("run.json", "metrics.jsonl", "summary.json", "checkpoints")
RUN_FILES = RUN_MARKERS + ("eval.jsonl", "model", "tensorboard", "logs", "run.yaml", ".token",
                           ".trainer-ready.json", "reward.png", "discrepancy.png", "lambda.png")


def holds_run(out: Path) -> bool:
    return any((out / m).exists() for m in RUN_MARKERS)


def remove_run(out: Path) -> None:
    """Delete what a run wrote in ``out`` (see RUN_FILES); other files stay."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def finished_summary(out: Path, total: int) -> Optional[dict[str, Any]]:
    """The summary of a run in ``out`` that already reached ``total`` steps, else None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and int(summary.get("steps", 0)) >= total else None


def cmd_validate(args: argparse.Namespace) -> int:
    run = load_run(args.file)
    found = check_inputs(run, cluster=args.cluster)
    if found.problems:
        error = SpecError(found.problems, str(args.file))
        if not args.cluster and set(check_paths(run)) & set(found.problems):
            error.hint = ("paths are read on this machine; for a manifest whose paths are mounted in the "
                          "cluster's pods, use `dcmdp validate --cluster`")
        raise error
    for warning in found.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.print:
        print(yamlfile.dumps(dump_run(run)))
    else:
        pools = ", ".join(f"{p.name} ({p.engine}/{p.precision}×{p.replicas})" for p in run.spec.rollout.pools)
        t = run.spec.trainer
        print(f"{args.file}: valid {run.kind} {run.metadata.name!r}: {run.spec.algorithm.name}, "
              f"{run.spec.algorithm.steps} steps, trainer {t.replicas}×{gpus_per_replica(t)} ranks, pools {pools}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    run = load_run(args.file)
    found = check_inputs(run)  # the dataset and tokenizer the run loads: refused here, not in a traceback
    if found.problems:
        raise SpecError(found.problems, str(args.file))
    out = Path(args.out or f"runs/{run.metadata.name}")
    total = args.steps or run.spec.algorithm.steps
    if holds_run(out) and not (args.resume or args.overwrite):
        done = finished_summary(out, total)
        what = f"a run that finished ({done.get('steps')} steps)" if done is not None else "a run"
        print(f"error: {out} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
              "or choose another --out", file=sys.stderr)
        return 2
    if args.overwrite:
        remove_run(out)
    if args.resume:
        done = finished_summary(out, total)
        if done is not None:
            print(f"{out}: the run already finished ({done.get('steps')} of {total} steps); nothing to do "
                  "(pass --steps N to train further)")
            return 0
    mode = "inprocess" if args.inprocess else "processes"
    if mode not in installed():
        mode = "inprocess"
    fn = runner(mode)
    warm = run.spec.model.warm_start_steps
    before = (f"a {warm}-step supervised warm start of the model (no output until it ends)"
              if warm and not args.resume else "")
    t0 = time.monotonic()
    with RunProgress(total, enabled=not args.quiet, before=before, resuming=bool(args.resume)) as bar:
        summary = fn(run, out, steps=args.steps, resume=args.resume, on_step=bar.step, on_eval=bar.eval,
                     threads=args.threads)
    plots = plot_run(out)
    bar.console.print(summary_table(summary, bar.last, total_s=time.monotonic() - t0))
    bar.console.print(f"metrics: {out / 'metrics.jsonl'}  plots: {', '.join(p.name for p in plots)}  "
                      f"tensorboard: {out / 'tensorboard'}")
    bar.console.print(f"trained weights: {out / 'checkpoints'} (as a Hugging Face folder: dcmdp export {out} --to DIR)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    for p in plot_run(Path(args.dir)):
        print(p)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    export_run = tool("export")
    try:
        result = export_run(Path(args.run_dir), Path(args.to), step=args.step, dtype=args.dtype,
                            overwrite=args.overwrite)
    except RuntimeError as exc:  # ExportError: the message names the cause
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for why in result.skipped:
        print(f"warning: skipped {why}", file=sys.stderr)
    for note in result.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"{result.folder}: step {result.step} ({result.checkpoint}), {result.parameters:,} parameters in "
          f"{result.dtype}, {result.bytes / 2**20:.1f} MiB of safetensors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dcmdp", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a DCMDPRun manifest on this machine")
    r.add_argument("-f", "--file", required=True, help="DCMDPRun manifest (YAML)")
    r.add_argument("--steps", type=int, default=None, help="override spec.algorithm.steps")
    r.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    again = r.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    again.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start afresh")
    r.add_argument("--inprocess", action="store_true", help="trainer and engines in this process (no gRPC)")
    r.add_argument("--threads", type=threads(), default=0, help="torch threads per process (0 = default)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="check a manifest without running it")
    v.add_argument("-f", "--file", required=True, help="DCMDPRun manifest (YAML; - for standard input)")
    v.add_argument("--print", action="store_true", help="print the resolved manifest (defaults filled in)")
    v.add_argument("--cluster", action="store_true",
                   help="the manifest runs in a cluster: its paths are mounted in the pods, not checked here")
    v.set_defaults(fn=cmd_validate)

    p = sub.add_parser("plot", help="(re)draw the PNG plots of a run folder")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_plot)

    e = sub.add_parser("export", help="write a run's trained weights as a Hugging Face model folder")
    e.add_argument("run_dir", help="the run's output folder (what `dcmdp run --out` wrote)")
    e.add_argument("--to", required=True, help="the model folder to write")
    e.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest intact)")
    e.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weight dtype (auto: the starting model's)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export at --to")
    e.set_defaults(fn=cmd_export)

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
        if getattr(exc, "hint", None):
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:  # the run failed: a verifier, a dataset, NaN weights…
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = ""
        if args.fn is cmd_run:  # (the run loop checkpoints on the way out)
            try:
                out = args.out or f"runs/{load_run(args.file).metadata.name}"
                hint = f": continue with  dcmdp run -f {args.file} --out {out} --resume"
            except Exception:  # noqa: BLE001 - only a hint
                pass
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
