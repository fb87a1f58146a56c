"""``python -m fastfuse study``: run, continue, watch and report probing studies.

    python -m fastfuse study run STUDY.toml --out DIR [--launcher local|slurm] [--force] [--retry-failed]
    python -m fastfuse study run DIR                  (continue the study in DIR)
    python -m fastfuse study status DIR
    python -m fastfuse study report DIR
    python -m fastfuse study demo --out DIR
"""
from __future__ import annotations

import argparse
import sys


def _say(message: str) -> None:
    print(f"fastfuse study: {message}", file=sys.stderr, flush=True)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="redo units whose configuration changed (otherwise such a study is refused)")
    parser.add_argument("--retry-failed", action="store_true", help="run the cells that failed before again")
    parser.add_argument("--launcher", default="local", choices=("local", "slurm"),
                        help="local: this machine (default); slurm: one job array through submitit")
    parser.add_argument("--devices", default=None,
                        help="local launcher: comma-separated devices, one worker process each (default: "
                             "every visible GPU when there are several, else this process on the default device)")
    parser.add_argument("--cells-per-task", type=int, default=1, help="slurm: cells per array task (default: 1)")
    parser.add_argument("--slurm-partition", default=None)
    parser.add_argument("--slurm-gpus-per-task", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--slurm-cpus-per-task", type=int, default=None)
    parser.add_argument("--slurm-mem", type=float, default=None, metavar="GB", help="memory per task in GB")
    parser.add_argument("--slurm-time", type=int, default=240, metavar="MINUTES", help="(default: %(default)s)")
    parser.add_argument("--slurm-array-parallelism", type=int, default=256,
                        help="at most this many tasks at once (default: %(default)s)")
    parser.add_argument("--slurm-dry-run", action="store_true", help="print the sbatch script, submit nothing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in this process (default: torch's own choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="study_command", required=True)
    run = sub.add_parser("run", help="run a study file into --out, or continue the study folder given")
    run.add_argument("source", help="STUDY.toml, or a study folder to continue")
    run.add_argument("--out", default=None, help="the study folder (with a study file)")
    add_run_arguments(run)
    status = sub.add_parser("status", help="done / pending / failed per cell")
    status.add_argument("study_dir")
    report = sub.add_parser("report", help="write the table, the gain figure and the heatmaps")
    report.add_argument("study_dir")
    demo = sub.add_parser("demo", help="a small complete study with no download (random ViTs, digits, "
                                       "synthetic gratings)")
    demo.add_argument("--out", default="fastfuse_study_demo", help="the study folder (default: %(default)s)")
    add_run_arguments(demo)


def run(args: argparse.Namespace) -> int:
    from ..storage import FolderLockedError
    from .runner import StudyChangedError
    from .spec import StudyFileError

    try:
        if args.study_command == "status":
            return _status(args)
        if args.study_command == "report":
            return _report(args.study_dir)
        if args.study_command == "demo":
            from .demo import write_demo_study

            args.source = str(write_demo_study(args.out))
        return _run(args)
    except (StudyFileError, StudyChangedError, FolderLockedError, FileNotFoundError, ValueError) as error:
        _say(str(error))
        return 2


def _status(args) -> int:
    from .runner import format_status, open_study

    print(format_status(open_study(args.study_dir), args.study_dir))
    return 0


def _report(study_dir) -> int:
    from .report import write_report
    from .runner import open_study

    report = write_report(open_study(study_dir), study_dir)
    print(report["markdown"])
    if report["missing"]:
        print(f"not complete yet: {', '.join(report['missing'])}")
    print("wrote " + ", ".join(report["files"].values()))
    return 0


def _run(args) -> int:
    from . import launchers
    from .runner import cells_to_run, prepare_study

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    spec, study_dir = prepare_study(args.source, args.out, force=args.force)
    cells = cells_to_run(spec, study_dir, retry_failed=args.retry_failed)
    skipped_failures = [cell for cell in cells_to_run(spec, study_dir, retry_failed=True) if cell not in cells]
    if skipped_failures:
        _say(f"not retrying failed cell(s) {', '.join(skipped_failures)} (pass --retry-failed)")
    if args.launcher == "slurm":
        options = launchers.SlurmOptions(partition=args.slurm_partition, gpus_per_task=args.slurm_gpus_per_task,
                                         cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem,
                                         time_min=args.slurm_time, array_parallelism=args.slurm_array_parallelism,
                                         job_name=f"fastfuse-{spec.name}")
        if args.slurm_dry_run:
            print(launchers.job_script(study_dir, cells or ["(none)"], options, cells_per_task=args.cells_per_task))
            _say(f"dry run: {len(cells)} cell(s) to run, nothing submitted")
            return 0
        if not cells:
            _say("every cell is complete; nothing to submit")
            return 0
        jobs = launchers.submit(study_dir, cells, options, cells_per_task=args.cells_per_task)
        _say(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} task(s) for {len(cells)} cell(s)); "
             f"follow it with `python -m fastfuse study status {study_dir}`, then `study report {study_dir}`")
        return 0
    if not cells:
        _say("nothing to run")
    states = launchers.launch_local(study_dir, cells, devices=args.devices, progress=not args.no_progress)
    code = _report(study_dir)
    from .runner import cell_status

    unfinished = [status for status in cell_status(spec, study_dir) if status.state != "done"]
    if unfinished:
        _say(f"not complete: {', '.join(f'{status.cell} ({states.get(status.cell, status.state)})' for status in unfinished)}; "
             f"see `python -m fastfuse study status {study_dir}`")
        return 1
    return code
