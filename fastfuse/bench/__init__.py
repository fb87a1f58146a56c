"""``python -m fastfuse bench``: fastfuse against the paper's probe and its peers, in one run.

Every implementation of a case is timed interleaved (median of repeats after a warm-up that
also compiles), the roofline comes from this machine's sgemm rate and bandwidth measured in the
same run, and the peak memory of a training step from a fresh process per implementation.
``--scaling`` (or ``--plots DIR``) sweeps N, B and D instead of the table; see docs/benchmarks.md.
"""
from __future__ import annotations

import sys
import time

from ..argtypes import positive_int


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smaller batches, 3 repeats, memory of one case")
    parser.add_argument("--json", metavar="FILE", help="write machine, cases and records to FILE")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed rounds per case (3 / 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--system-allocator", action="store_true",
                        help="keep glibc's default malloc thresholds (see ALLOCATOR_ENV)")
    parser.add_argument("--impls", default=None, help="comma-separated subset of implementations")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the table's cases")
    parser.add_argument("--modes", default=None,
                        help="train and/or infer, comma-separated (default both; --scaling: train)")
    parser.add_argument("--scaling", action="store_true",
                        help="sweep N, B and D instead of the table")
    parser.add_argument("--traffic", action="store_true",
                        help="print the modelled memory traffic of the Triton and CUDA launches (bench/traffic.py, "
                             "traffic_cuda.py) and exit")
    parser.add_argument("--gpu-shapes", action="store_true",
                        help="add issue 15's GPU shapes (cases.GPU_CASES) to the table")
    parser.add_argument("--gpu-model", default="h100", choices=("h100", "a100"),
                        help="--traffic: the GPU whose SM count and L2 size the model uses")
    parser.add_argument("--plots", metavar="DIR",
                        help="write the scaling plots (PNG) to DIR; implies --scaling")


def _subset(option: str, given: str | None, known: list[str]) -> list[str] | None:
    if not given:
        return None
    wanted = given.split(",")
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"--{option}: unknown {unknown}; known: {', '.join(known)}")
    return wanted


# glibc hands large freed buffers straight back to the kernel, so every step of every row pays
# page faults to zero its fresh (B, H, D) and (B, N, D) buffers again (measured here: 135-260 ms
# vs 104 ms for fastfuse-cpu's training step at the paper's shape). The benchmark keeps them in
# the heap, for every implementation alike; --system-allocator measures without.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def _reexec_with_allocator_env(args) -> None:
    """Restart ``python -m fastfuse bench ...`` with ALLOCATOR_ENV (glibc reads it at start)."""
    import os

    if args.system_allocator or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return
    if len(sys.argv) < 2 or sys.argv[1] != "bench":  # called in-process (tests): leave it be
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fastfuse", *sys.argv[1:]],
              {**os.environ, **ALLOCATOR_ENV})


def run(args) -> int:
    if getattr(args, "traffic", False):
        from .traffic import GPUS, print_report

        print_report(GPUS[args.gpu_model])
        return 0
    _reexec_with_allocator_env(args)
    import torch

    from . import cases as case_lists
    from .impls import available, names
    from .report import case_shapes, load_average, machine_info, print_table, write_json
    from .runner import MODES, run_cases

    started, load_at_start = time.perf_counter(), load_average()
    if args.json:  # before the run, not after it
        from ..storage import check_writable
        try:
            check_writable(args.json, what="--json file")
        except OSError as error:
            print(f"fastfuse bench: {error}", file=sys.stderr)
            return 2
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible here", file=sys.stderr)
        return 2
    scaling = args.scaling or bool(args.plots)
    impls, skipped = available(device, _subset("impls", args.impls, names()))
    for name, reason in skipped.items():
        print(f"# skipping {name}: {reason}", file=sys.stderr)
    modes = _subset("modes", args.modes, list(MODES)) or (["train"] if scaling else list(MODES))
    sweeps = case_lists.scaling_cases(args.quick) if scaling else None
    if scaling:
        cases = [case for sweep in sweeps.values() for case in sweep]
    else:
        cases = list(case_lists.table_cases(args.quick))
        if getattr(args, "gpu_shapes", False):
            cases += list(case_lists.GPU_CASES)
        wanted = _subset("cases", args.cases, [case.name for case in cases])
        cases = [case for case in cases if wanted is None or case.name in wanted]
    if args.no_memory or scaling:
        memory_cases = ()
    else:
        memory_cases = [case.name for case in cases
                        if not args.quick or case.name in case_lists.QUICK_MEMORY_CASES]
    records, machine = run_cases(cases, impls, device, modes=modes,
                                 repeats=args.repeats or (3 if args.quick else 5),
                                 budget_s=15 if args.quick else 60, memory_cases=memory_cases,
                                 quick=args.quick)
    print_table(records)
    wall_s = time.perf_counter() - started
    sweep_names = ({axis: [case.name for case in sweep] for axis, sweep in sweeps.items()}
                   if scaling else None)
    if args.json:
        info = {**machine_info(device, machine, args.quick), "loadavg_start": load_at_start,
                "skipped": skipped}
        write_json(args.json, info, cases, records, wall_s, sweep_names)
    if args.plots:
        from .plots import plot_scaling

        for path in plot_scaling(records, case_shapes(cases), sweep_names, args.plots):
            print(f"wrote {path}")
    print(f"# {wall_s:.0f} s in all")
    return 0
