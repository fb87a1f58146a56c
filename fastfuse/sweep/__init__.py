"""Probing sweeps: whole hyper-parameter grids trained in one pass over cached features.

    from fastfuse.sweep import run_sweep, SweepGrid
    results = run_sweep("features/", SweepGrid(lr=[1e-4, 1e-3], wd=[1e-6, 1e-4, 1e-2], seed=[0, 1]),
                        num_heads=12, epochs=10, batch_size=256, out="sweep_out")

Modules: grid (configurations, weight-decay search), stacked (P probes, stacked parameters;
their value/output/key products with a hand-written backward live in fastfuse/projections.py,
shared with AttentiveFusion), optim (per-probe
AdamW, schedule), data (cached splits, batches, metrics), train (epoch loop), results (files,
table, heatmaps), distributed (torchrun), runner (run_sweep), cli, paper_reference (the paper's
probe one configuration at a time, for timing), demo (``python -m fastfuse.sweep.demo``).
"""
from .cli import add_arguments, run
from .grid import ProbeConfig, SweepGrid
from .optim import StackedAdamW, cosine_with_warmup
from .results import load_best_probe
from .runner import run_sweep
from .stacked import StackedAttentiveFusion, StackedLinearProbe, build_probe
from .train import TrainSettings, train_group

__all__ = ["run_sweep", "SweepGrid", "ProbeConfig", "StackedAttentiveFusion", "StackedLinearProbe",
           "build_probe", "StackedAdamW", "cosine_with_warmup", "TrainSettings", "train_group",
           "load_best_probe", "add_arguments", "run"]
