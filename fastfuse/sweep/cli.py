"""``python -m fastfuse sweep``: train a hyper-parameter grid of probes in lockstep.

    python -m fastfuse sweep --features DIR --lr 1e-4,1e-3 --wd 1e-6,1e-4,1e-2 --seeds 0,1 \\
        --num-heads 12 --epochs 10 --batch-size 256 --out OUT [--sequential] [--wd-search]
    torchrun --nproc_per_node 2 -m fastfuse sweep ...      (grid split across ranks)
"""
from __future__ import annotations

import argparse
import sys

from ..argtypes import float_at_least, int_at_least, parsed_with, positive_int


def _grid_list(kind: str):
    from .grid import SweepGrid

    def check(text):
        SweepGrid(**{"lr": "1", "wd": "0", "seed": "0", kind: text})
    return parsed_with(check, f"{kind} list")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, metavar="DIR",
                        help="feature cache with train/val/test splits (python -m fastfuse extract, "
                             "or fastfuse.features.save_features)")
    parser.add_argument("--lr", type=_grid_list("lr"), default="1e-4,1e-3", help="learning rates, comma separated (default: %(default)s)")
    parser.add_argument("--wd", type=_grid_list("wd"), default="1e-6,1e-4,1e-2",
                        help="weight decays, comma separated (default: %(default)s)")
    parser.add_argument("--seeds", type=_grid_list("seed"), default="0", help="probe init seeds, comma separated (default: %(default)s)")
    parser.add_argument("--probe", default="attentive-fusion",
                        choices=["attentive-fusion", "timm-map", "vjepa", "aim", "ep"],
                        help="probe family (fused poolers, docs/poolers.md; default: %(default)s)")
    parser.add_argument("--num-heads", type=positive_int, default=12, help="attention heads per probe (default: %(default)s)")
    parser.add_argument("--head-dim", type=positive_int, default=None, help="per-head size (default: 2 * dim // num_heads)")
    parser.add_argument("--qkv-bias", action="store_true", help="learn q and v biases")
    parser.add_argument("--epochs", type=positive_int, default=10, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int_at_least(2), default=256, help="(default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=float_at_least(0.0), default=1.0,
                        help="linear warmup before the cosine decay, in epochs (default: %(default)s)")
    parser.add_argument("--data-seed", type=int_at_least(0), default=0,
                        help="minibatch order, shared by all probes (default: %(default)s)")
    parser.add_argument("--out", default="sweep_out", metavar="OUT", help="output directory (default: %(default)s)")
    parser.add_argument("--sequential", action="store_true",
                        help="train one probe at a time (same code path) instead of all in lockstep")
    parser.add_argument("--wd-search", action="store_true",
                        help="then refine the weight decay around the best, as the paper (every round in lockstep)")
    parser.add_argument("--wd-search-rounds", type=int_at_least(0), default=4,
                        help="at most this many refinement rounds (default: %(default)s)")
    parser.add_argument("--wd-search-min-step", type=float_at_least(0.0, inclusive=False), default=0.1,
                        help="stop once the refinement step is below this many decades (default: %(default)s)")
    parser.add_argument("--backend", default=None, help="fused-op backend: auto, torch, cpu, triton, cuda "
                        "(default: $FASTFUSE_BACKEND, else auto)")
    parser.add_argument("--probes-per-call", type=positive_int, default=None,
                        help="probes scored per fused-op call (default: all of a lockstep group in one call)")
    parser.add_argument("--device", default=None, help="training device (default: the local GPU if any, else cpu)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the linear-probe baselines")
    parser.add_argument("--eval-batch-size", type=positive_int, default=1024, help="(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="no attention heatmap")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue the sweep in --out from the last completed epoch of every probe")
    existing.add_argument("--overwrite", action="store_true", help="remove the previous sweep's files from --out")
    parser.add_argument("--drop-nonfinite", action="store_true",
                        help="drop samples whose features hold NaN/infinity (default: refuse, naming them)")


def run(args: argparse.Namespace) -> int:
    from ..storage import FolderLockedError
    from .grid import SweepGrid
    from .runner import SweepOutputError, run_sweep

    try:
        grid = SweepGrid(args.lr, args.wd, args.seeds)
    except ValueError as error:
        print(f"fastfuse sweep: {error}", file=sys.stderr)
        return 2
    try:
        results = _run(args, grid, run_sweep)
    except (SweepOutputError, FolderLockedError, FileNotFoundError, ValueError) as error:
        # --out in use or holding another sweep; a feature cache that fails validation
        print(f"fastfuse sweep: {error}", file=sys.stderr)
        return 2
    if "files" in results:
        print("wrote " + ", ".join(results["files"].values()))
    if results["best"] is None:
        print("fastfuse sweep: every configuration diverged (non-finite loss); try smaller learning rates",
              file=sys.stderr)
        return 1
    return 0


def _run(args, grid, run_sweep):
    return run_sweep(args.features, grid, num_heads=args.num_heads, head_dim=args.head_dim,
                     qkv_bias=args.qkv_bias, epochs=args.epochs, batch_size=args.batch_size,
                     warmup_epochs=args.warmup_epochs, data_seed=args.data_seed,
                     sequential=args.sequential, wd_search=args.wd_search,
                     wd_search_rounds=args.wd_search_rounds, wd_search_min_step=args.wd_search_min_step,
                     backend=args.backend, device=args.device, baselines=not args.no_baselines,
                     eval_batch_size=args.eval_batch_size, probes_per_call=args.probes_per_call,
                     probe=args.probe, out=args.out, resume=args.resume, overwrite=args.overwrite,
                     nonfinite="drop" if args.drop_nonfinite else "raise", progress=not args.no_progress,
                     plots=not args.no_plots, verbose=True)
