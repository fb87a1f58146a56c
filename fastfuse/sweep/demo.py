"""``python -m fastfuse.sweep.demo [--out DIR]``: a whole probing sweep on the embedded dataset.

1. Extract the paper's multi-layer features (CLS and patch-average tokens of every block's norm2
   and the final norm) of a small, randomly initialised timm ViT on scikit-learn's bundled 8x8
   digits (``python -m fastfuse extract``; no download).
2. Sweep a small grid of AttentiveFusion probes over all layers in lockstep, with the linear
   baselines (last layer's CLS token; all layers' tokens concatenated) in the same run.
3. Print the table, then train the same grid with the paper's probe one configuration at a time
   and print both times (measured, not estimated).

The backbone is randomly initialised from ``--seed`` (no weights to download), so the accuracies
show the pipeline working, not the paper's numbers; README gives the time measured on one machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..argtypes import positive_int, seed_int
from .data import SPLITS, load_sweep_data
from .grid import SweepGrid
from .paper_reference import train_paper_probes
from .results import choose_best, format_table
from .runner import run_sweep
from .train import TrainSettings


def extract_digits(features_dir: Path, model: str, img_size: int, seed: int = 0) -> None:
    """Features of ``model`` on digits into ``features_dir`` (kept when already complete)."""
    from .. import extract
    from ..features import complete_splits

    if set(SPLITS) <= set(complete_splits(features_dir)):
        print(f"features: reusing {features_dir}", file=sys.stderr)
        return
    parser = argparse.ArgumentParser()
    extract.add_arguments(parser)
    argv = ["--model", model, "--data", "digits", "--layers", "paper", "--tokens", "cls+ap",
            "--img-size", str(img_size), "--seed", str(seed), "--out", str(features_dir), "--resume"]
    code = extract.run(parser.parse_args(argv))
    if code != 0:
        raise SystemExit(f"feature extraction failed (exit code {code})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastfuse.sweep.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fastfuse_demo", help="working directory (default: %(default)s)")
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT (default: %(default)s)")
    parser.add_argument("--img-size", type=positive_int, default=64, help="input resolution (default: %(default)s)")
    parser.add_argument("--lr", default="1e-3,3e-3")
    parser.add_argument("--wd", default="1e-4,1e-2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--num-heads", type=positive_int, default=4)
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: as torch decides for this machine)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="the random backbone's init, recorded in the feature cache (default: %(default)s)")
    parser.add_argument("--skip-paper", action="store_true", help="do not time the paper's probe")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    features_dir = out / "features"
    extract_digits(features_dir, args.model, args.img_size, args.seed)
    grid = SweepGrid(args.lr, args.wd, args.seeds)
    settings = dict(num_heads=args.num_heads, epochs=args.epochs, batch_size=args.batch_size)
    results = run_sweep(features_dir, grid, out=out / "sweep", overwrite=True, progress=not args.no_progress,
                        **settings)
    sweep_seconds = results["timing"]["seconds"]
    print()
    print(f"digits, {results['features'].get('model')} (random init), {results['features']['num_tokens']} "
          f"tokens of {results['features']['dim']} dims (CLS+AP of every layer)")
    print(format_table(results))
    if not args.skip_paper:
        data = load_sweep_data(features_dir)
        paper_seconds, rows = train_paper_probes(data, grid.configs(), TrainSettings(**settings))
        best = choose_best(rows)
        print(f"{'paper probe (same grid)':<30} {best['lr']:>9.3g} {best['wd']:>9.3g} {best['val_acc']:>8.4f}  "
              f"{best['test_acc']:.4f}" + (f" ± {best['test_acc_std']:.4f}" if len(best["seeds"]) > 1 else ""))
        print(f"paper's probe, the same {len(rows)} configurations one at a time: {paper_seconds:.1f} s")
        print(f"fastfuse sweep, lockstep (the {len(rows)} probes plus {2 * len(rows)} linear baselines): "
              f"{sweep_seconds:.1f} s -> {paper_seconds / sweep_seconds:.1f}x faster")
    print(f"files: {', '.join(results.get('files', {}).values())}  (torch threads: {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
