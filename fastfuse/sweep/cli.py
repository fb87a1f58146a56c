"""``python -m fastfuse sweep``: train a hyper-parameter grid of probes in lockstep.

    python -m fastfuse sweep --features DIR --lr 1e-4,1e-3 --wd 1e-6,1e-4,1e-2 --seeds 0,1 \\
        --num-heads 12 --epochs 10 --batch-size 256 --out OUT [--sequential] [--wd-search]
    torchrun --nproc_per_node 2 -m fastfuse sweep ...      (grid split across ranks)
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, metavar="DIR",
                        help="feature cache with train/val/test splits (python -m fastfuse extract, "
                             "or fastfuse.features.save_features)")
    parser.add_argument("--lr", default="1e-4,1e-3", help="learning rates, comma separated (default: %(default)s)")
    parser.add_argument("--wd", default="1e-6,1e-4,1e-2",
                        help="weight decays, comma separated (default: %(default)s)")
    parser.add_argument("--seeds", default="0", help="probe init seeds, comma separated (default: %(default)s)")
    parser.add_argument("--probe", default="attentive-fusion",
                        choices=["attentive-fusion", "timm-map", "vjepa", "aim", "ep"],
                        help="probe family (fused poolers, docs/poolers.md; default: %(default)s)")
    parser.add_argument("--num-heads", type=int, default=12, help="attention heads per probe (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=None, help="per-head size (default: 2 * dim // num_heads)")
    parser.add_argument("--qkv-bias", action="store_true", help="learn q and v biases")
    parser.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0,
                        help="linear warmup before the cosine decay, in epochs (default: %(default)s)")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="minibatch order, shared by all probes (default: %(default)s)")
    parser.add_argument("--out", default="sweep_out", metavar="OUT", help="output directory (default: %(default)s)")
    parser.add_argument("--sequential", action="store_true",
                        help="train one probe at a time (same code path) instead of all in lockstep")
    parser.add_argument("--wd-search", action="store_true",
                        help="then refine the weight decay around the best, as the paper (every round in lockstep)")
    parser.add_argument("--wd-search-rounds", type=int, default=4,
                        help="at most this many refinement rounds (default: %(default)s)")
    parser.add_argument("--wd-search-min-step", type=float, default=0.1,
                        help="stop once the refinement step is below this many decades (default: %(default)s)")
    parser.add_argument("--backend", default=None, help="fused-op backend: auto, torch, cpu, triton, cuda "
                        "(default: $FASTFUSE_BACKEND, else auto)")
    parser.add_argument("--probes-per-call", type=int, default=None,
                        help="probes scored per fused-op call (default: all of a lockstep group in one call)")
    parser.add_argument("--device", default=None, help="training device (default: the local GPU if any, else cpu)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the linear-probe baselines")
    parser.add_argument("--eval-batch-size", type=int, default=1024, help="(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="no attention heatmap")


def run(args: argparse.Namespace) -> int:
    from .grid import SweepGrid
    from .runner import run_sweep

    try:
        grid = SweepGrid(args.lr, args.wd, args.seeds)
    except ValueError as error:
        print(f"fastfuse sweep: {error}", file=sys.stderr)
        return 2
    results = run_sweep(args.features, grid, num_heads=args.num_heads, head_dim=args.head_dim,
                        qkv_bias=args.qkv_bias, epochs=args.epochs, batch_size=args.batch_size,
                        warmup_epochs=args.warmup_epochs, data_seed=args.data_seed,
                        sequential=args.sequential, wd_search=args.wd_search,
                        wd_search_rounds=args.wd_search_rounds, wd_search_min_step=args.wd_search_min_step,
                        backend=args.backend, device=args.device, baselines=not args.no_baselines,
                        eval_batch_size=args.eval_batch_size, probes_per_call=args.probes_per_call,
                        probe=args.probe,
                        out=args.out, progress=not args.no_progress,
                        plots=not args.no_plots, verbose=True)
    if "files" in results:
        print("wrote " + ", ".join(results["files"].values()))
    return 0
