"""``python -m fastfuse.study.worker DIR --cells A,B [--device D]``: one local worker process
of ``study run --launcher local`` with several devices (see launchers.launch_local)."""
from __future__ import annotations

import argparse
import sys

from .launchers import run_task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastfuse.study.worker")
    parser.add_argument("study_dir")
    parser.add_argument("--cells", required=True, help="comma-separated cell ids")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    states = run_task(args.study_dir, [cell for cell in args.cells.split(",") if cell], device=args.device,
                      progress=not args.no_progress)
    return 0 if all(state == "done" for state in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
