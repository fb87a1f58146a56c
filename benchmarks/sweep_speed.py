"""Sweep speed: P probes trained in lockstep vs one at a time, vs the paper's probe one at a time.

All three train the same P configurations (lr x wd x seed) on the same synthetic feature cache
(float16 on disk, memory-mapped), the same minibatches (one data seed), the same schedule,
loss and per-epoch val/test evaluation, with the same optimizer kernel (torch's fused AdamW):

    lockstep     fastfuse.sweep: every minibatch read once for all P probes (P*H keys, one fused op)
    sequential   fastfuse.sweep --sequential: the same code path, P = 1, P times over the data
    paper        fastfuse.paper.PaperAttentiveProbe + torch.optim.AdamW, P times over the data

Every number is measured: wall clock after an untimed warm-up, the modes interleaved over
``--repeats`` rounds (medians reported), the load average recorded beside each run.
Results are compared too: per-epoch train losses and val accuracies of the three.

    python benchmarks/sweep_speed.py                     # D=768, N=24, P=16, n=2048, 2 epochs
    python benchmarks/sweep_speed.py --quick             # small and fast: checks that it runs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastfuse
from fastfuse import storage
from fastfuse.features import save_features
from fastfuse.sweep.data import load_sweep_data, steps_per_epoch
from fastfuse.sweep.grid import configs_for
from fastfuse.sweep.paper_reference import train_paper_probes
from fastfuse.sweep.train import TrainSettings, train_group


def make_features(directory: Path, args) -> None:
    """Class-dependent token means plus noise, so the probes learn something; float16 on disk."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.tokens, args.dim, generator=generator)
    sizes = {"train": args.samples, "val": args.eval_samples, "test": args.eval_samples}
    for split, size in sizes.items():
        labels = torch.arange(size) % args.classes
        features = 0.3 * centres[labels] + torch.randn(size, args.tokens, args.dim, generator=generator)
        save_features(directory, split, features.to(torch.float16), labels,
                      meta={"model": "synthetic", "tokens": "cls+ap"})


def grid(args):
    lrs = [1e-4, 3e-4, 1e-3, 3e-3][: max(1, min(4, args.probes))]
    wds = [1e-4, 1e-2]
    seeds = list(range(math.ceil(args.probes / (len(lrs) * len(wds)))))
    return configs_for(lrs, wds, seeds)[: args.probes]


def run_fastfuse(data, configs, settings, *, sequential: bool):
    """Wall seconds and rows of the fastfuse sweep, all probes together or one at a time."""
    start = time.perf_counter()
    groups = [[config] for config in configs] if sequential else [list(configs)]
    rows = []
    for group in groups:
        rows.extend(train_group(data, group, settings, progress=False).rows["attentive"])
    return time.perf_counter() - start, rows


def compare(rows_a, rows_b) -> dict:
    loss = max(abs(a - b) for ra, rb in zip(rows_a, rows_b) for a, b in zip(ra["train_loss"], rb["train_loss"]))
    val = max(abs(a - b) for ra, rb in zip(rows_a, rows_b) for a, b in zip(ra["val_acc"], rb["val_acc"]))
    return {"max_abs_train_loss_diff": loss, "max_abs_val_acc_diff": val}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=2048, help="train samples")
    parser.add_argument("--eval-samples", type=int, default=256, help="val and test samples each")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-paper", action="store_true", help="only lockstep vs sequential")
    parser.add_argument("--probes-per-call", type=int, default=None,
                        help="also time lockstep with this many probes per fused-op call (a 'lockstep-chunked' row)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved rounds; medians reported (default 1, 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="D=192, P=8, n=256, 1 epoch: checks that it runs")
    parser.add_argument("--out", default="benchmarks/results/sweep_speed.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.probes, args.samples, args.eval_samples, args.batch_size, args.epochs = 192, 8, 256, 64, 64, 1
        args.repeats = max(args.repeats, 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(num_heads=args.heads, epochs=args.epochs, batch_size=args.batch_size,
                             warmup_epochs=0.5, backend=args.backend, baselines=False)
    configs = grid(args)
    with tempfile.TemporaryDirectory(prefix="sweep_speed_") as directory:
        make_features(Path(directory), args)
        data = load_sweep_data(directory)
        # Warm-up, untimed: kernels loaded, every mode's shapes (P*H heads, H heads) seen once.
        warm = dataclasses.replace(settings, epochs=1)
        run_fastfuse(data, configs, warm, sequential=False)
        run_fastfuse(data, configs[:1], warm, sequential=True)
        modes = (["lockstep"] + (["lockstep-chunked"] if args.probes_per_call else []) + ["sequential"]
                 + ([] if args.skip_paper else ["paper"]))
        samples, loads, rows = {mode: [] for mode in modes}, {mode: [] for mode in modes}, {}
        for repeat in range(args.repeats):  # interleaved, so drift and neighbours hit every mode alike
            for mode in modes:
                load_before = os.getloadavg()[0]
                print(f"{mode} ...", file=sys.stderr, flush=True)
                if mode == "paper":
                    seconds, mode_rows = train_paper_probes(data, configs, settings)
                elif mode == "lockstep-chunked":
                    chunked = dataclasses.replace(settings, probes_per_call=args.probes_per_call)
                    seconds, mode_rows = run_fastfuse(data, configs, chunked, sequential=False)
                else:
                    seconds, mode_rows = run_fastfuse(data, configs, settings, sequential=mode == "sequential")
                samples[mode].append(seconds)
                rows[mode] = mode_rows
                loads[mode].append([load_before, os.getloadavg()[0]])
                print(f"{mode:<16} {seconds:8.2f} s   (load average {load_before:.2f} -> {os.getloadavg()[0]:.2f})")
    timings = {mode: statistics.median(values) for mode, values in samples.items()}
    ratios = {"sequential_over_lockstep": timings["sequential"] / timings["lockstep"]}
    if "lockstep-chunked" in timings:
        ratios["sequential_over_lockstep_chunked"] = timings["sequential"] / timings["lockstep-chunked"]
    if "paper" in timings:
        ratios["paper_over_lockstep"] = timings["paper"] / timings["lockstep"]
        if "lockstep-chunked" in timings:
            ratios["paper_over_lockstep_chunked"] = timings["paper"] / timings["lockstep-chunked"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    agreement = {"lockstep_vs_sequential": compare(rows["lockstep"], rows["sequential"])}
    if "paper" in rows:
        agreement["lockstep_vs_paper"] = compare(rows["lockstep"], rows["paper"])
    print("agreement:", json.dumps(agreement))
    report = {
        "benchmark": "sweep_speed",
        "shape": {"dim": args.dim, "tokens": args.tokens, "probes": args.probes, "heads": args.heads,
                  "classes": args.classes, "train_samples": args.samples, "eval_samples": args.eval_samples,
                  "batch_size": args.batch_size, "epochs": args.epochs,
                  "steps": steps_per_epoch(args.samples, args.batch_size) * args.epochs},
        "configs": [{"lr": c.lr, "wd": c.wd, "seed": c.seed} for c in configs],
        "seconds": timings, "seconds_per_repeat": samples, "ratios": ratios, "load_average": loads,
        "agreement": agreement,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__, "fastfuse": fastfuse.__version__,
                    "backend": args.backend or os.environ.get("FASTFUSE_BACKEND", "auto"),
                    "probes_per_call": args.probes_per_call},
        "quick": args.quick,
    }
    out = Path(args.out)
    storage.write_json(out, storage.without_nonfinite(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
