"""The comparison the sweep is measured against: the paper's probe, one configuration at a time.

Each configuration trains a :class:`fastfuse.paper.PaperAttentiveProbe` (unfused, SPEC §1)
initialised exactly as the sweep's probe of that seed, with ``torch.optim.AdamW`` and everything
else as :func:`fastfuse.sweep.train.train_group` does it: the same minibatches, schedule,
class-weighted loss and per-epoch val/test evaluation. Used by the demo and the benchmark to
measure (never estimate) the time a sweep saves.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from ..paper import PaperAttentiveProbe
from .data import SweepData, balanced_accuracy, batch_indices, steps_per_epoch
from .grid import ProbeConfig
from .optim import cosine_with_warmup
from .stacked import build_probe
from .train import TrainSettings


@torch.no_grad()
def _accuracy(probe, data: SweepData, split: str, settings: TrainSettings) -> float:
    probe.eval()
    target = data.splits[split]
    predictions = torch.cat([probe(tokens).argmax(-1) for tokens, _ in
                             target.chunks(settings.eval_batch_size, settings.device)])
    return float(balanced_accuracy(predictions.unsqueeze(1), target.labels, data.num_classes)[0])


def train_paper_probes(data: SweepData, configs: Sequence[ProbeConfig], settings: TrainSettings,
                       *, fused_adamw: bool = True) -> tuple[float, list[dict]]:
    """Train one PaperAttentiveProbe per configuration, one after the other.

    Returns (wall seconds, one row per configuration with the sweep's fields: index, lr, wd, seed,
    train_loss, val_acc and test_acc_per_epoch per epoch, best_val_acc, best_epoch, test_acc).
    ``fused_adamw`` picks torch's fused AdamW kernel, as the sweep's default optimizer does, so
    the comparison measures the probes rather than the optimizer.
    """
    start = time.perf_counter()
    train, class_weight = data.splits["train"], data.class_weights().to(settings.device)
    steps = steps_per_epoch(len(train), settings.batch_size)
    total_steps, warmup_steps = steps * settings.epochs, round(settings.warmup_epochs * steps)
    rows = []
    for config in configs:
        reference = build_probe(config.seed, data.dim, settings.num_heads, data.num_classes,
                                head_dim=settings.head_dim, qkv_bias=settings.qkv_bias)
        probe = PaperAttentiveProbe(data.dim, settings.num_heads, data.num_classes, head_dim=reference.head_dim,
                                    qkv_bias=settings.qkv_bias)
        probe.load_state_dict(reference.state_dict(), strict=True)
        probe.to(settings.device)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.wd,
                                      betas=settings.betas, eps=settings.eps, fused=fused_adamw or None)
        row = {"index": config.index, "lr": config.lr, "wd": config.wd, "seed": config.seed,
               "train_loss": [], "val_acc": [], "test_acc_per_epoch": []}
        step = 0
        for epoch in range(settings.epochs):
            probe.train()
            loss_sum, batches = 0.0, batch_indices(len(train), settings.batch_size, settings.data_seed, epoch)
            for indices in batches:
                tokens, labels = train.batch(indices, settings.device)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * cosine_with_warmup(step, total_steps, warmup_steps)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(probe(tokens), labels, weight=class_weight)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item()
                step += 1
            row["train_loss"].append(loss_sum / len(batches))
            row["val_acc"].append(_accuracy(probe, data, "val", settings))
            row["test_acc_per_epoch"].append(_accuracy(probe, data, "test", settings))
        best_epoch = row["val_acc"].index(max(row["val_acc"]))  # the first epoch reaching the best
        row.update(best_val_acc=row["val_acc"][best_epoch], best_epoch=best_epoch + 1,
                   test_acc=row["test_acc_per_epoch"][best_epoch])
        rows.append(row)
    return time.perf_counter() - start, rows
