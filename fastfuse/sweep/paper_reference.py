"""The comparison the sweep is measured against: the paper's probe, one configuration at a time.

Each configuration trains a :class:`fastfuse.paper.PaperAttentiveProbe` (unfused, SPEC §1)
initialised exactly as the sweep's probe of that seed, with ``torch.optim.AdamW`` and everything
else as :func:`fastfuse.sweep.train.train_group` does it: the same minibatches, schedule,
class-weighted loss and per-epoch val/test evaluation. The epoch loop and the best-epoch choice
are the sweep's own (:func:`~fastfuse.sweep.train.run_epochs`, :class:`~fastfuse.sweep.train.BestEpochs`);
only the probe and its optimizer differ. Used by the demo and the benchmark to measure (never
estimate) the time a sweep saves.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from ..paper import PaperAttentiveProbe
from .data import SweepData, balanced_accuracy
from .grid import ProbeConfig
from .stacked import build_probe
from .train import BestEpochs, TrainSettings, run_epochs


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
        best = BestEpochs(1)

        def train_step(tokens, labels, factor):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(probe(tokens), labels, weight=class_weight)
            loss.backward()
            optimizer.step()
            return torch.tensor([loss.item()], dtype=torch.float64)

        def end_epoch(epoch, mean_losses):
            val_acc = _accuracy(probe, data, "val", settings)
            test_acc = _accuracy(probe, data, "test", settings)
            row["train_loss"].append(float(mean_losses[0]))
            row["val_acc"].append(val_acc)
            row["test_acc_per_epoch"].append(test_acc)
            best.update(epoch, [val_acc], [test_acc], mean_losses)

        run_epochs(train, settings, begin_epoch=probe.train, train_step=train_step, end_epoch=end_epoch)
        row.update(best_val_acc=best.val[0], best_epoch=best.epoch[0], test_acc=best.test[0],
                   diverged=best.diverged_epoch[0] is not None, diverged_epoch=best.diverged_epoch[0])
        rows.append(row)
    return time.perf_counter() - start, rows
