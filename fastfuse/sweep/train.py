"""The epoch loop: P probes (and their linear baselines) trained in lockstep on each minibatch.

Training follows the paper: AdamW with each probe's own lr and weight decay, a cosine schedule
with linear warmup (per optimizer step), class-weighted cross-entropy (weights from the train
label frequencies), balanced accuracy on val and test after every epoch; a probe's test accuracy
is the one at its best validation epoch (the first epoch reaching its best).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Optional, Sequence

import torch

from . import graphs
from .data import SweepData, balanced_accuracy, batch_indices, steps_per_epoch
from .grid import ProbeConfig
from .optim import StackedAdamW, cosine_with_warmup
from .stacked import ProbeBank, StackedLinearProbe

ATTENTIVE = "attentive"
# Baselines as the paper compares them: name -> what the linear probe reads.
BASELINES = {
    "last_cls": "linear probe on the last layer's CLS token",
    "concat": "linear probe on the concatenated CLS+AP tokens of all layers",
}


@dataclasses.dataclass
class TrainSettings:
    num_heads: int = 12
    head_dim: Optional[int] = None
    qkv_bias: bool = False
    epochs: int = 10
    batch_size: int = 256
    warmup_epochs: float = 1.0
    data_seed: int = 0
    backend: Optional[str] = None
    device: str = "cpu"
    baselines: bool = True
    eval_batch_size: int = 1024
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    fused_adamw: bool = True     # torch's fused AdamW kernel per probe (see optim.StackedAdamW)
    probes_per_call: Optional[int] = None   # probes per fused-op call; None: all in one call

    def __post_init__(self):
        for name in ("num_heads", "epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm trains on batch statistics), got {self.batch_size}")
        if not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.probes_per_call is not None and (isinstance(self.probes_per_call, bool)
                                                 or not isinstance(self.probes_per_call, int)
                                                 or self.probes_per_call < 1):
            raise ValueError(f"probes_per_call must be a positive int or None, got {self.probes_per_call!r}")

    def as_dict(self) -> dict:
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class GroupResult:
    """What training one group of probes produced."""

    rows: dict                   # model name -> one row per config (ATTENTIVE first)
    snapshots: dict              # config index -> AttentiveFusion state_dict at its best epoch
    probe_kwargs: dict
    seconds: float


def baseline_inputs(name: str, tokens: torch.Tensor, data: SweepData) -> torch.Tensor:
    layout = data.layout
    if name == "last_cls":
        return tokens[:, layout.last_cls]
    if layout.tokens == "all":  # one layer, every token: its CLS and the average of its patches
        prefix = max(1, int(data.meta.get("num_prefix_tokens", 1)))
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1)
    return tokens.reshape(tokens.shape[0], -1)


def baseline_features(name: str, data: SweepData) -> int:
    if name == "last_cls":
        return data.dim
    return 2 * data.dim if data.layout.tokens == "all" else data.num_tokens * data.dim


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """Per-probe class-weighted cross-entropy, (B, P, C) logits -> (P,) (as F.cross_entropy(weight=))."""
    log_probs = logits.log_softmax(dim=-1)
    picked = log_probs.gather(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(-1)
    sample_weight = class_weight[labels]
    # Each probe's sum runs over a contiguous row, in the same order whatever P is.
    return -(picked.transpose(0, 1).contiguous() * sample_weight).sum(1) / sample_weight.sum()


def build_models(data: SweepData, configs: Sequence[ProbeConfig], settings: TrainSettings) -> dict:
    seeds = [config.seed for config in configs]
    models = {ATTENTIVE: ProbeBank.from_seeds(
        seeds, data.dim, settings.num_heads, data.num_classes, probes_per_call=settings.probes_per_call,
        head_dim=settings.head_dim, qkv_bias=settings.qkv_bias, backend=settings.backend)}
    if settings.baselines:
        for name in BASELINES:
            models[name] = StackedLinearProbe(seeds, baseline_features(name, data), data.num_classes)
    return {name: model.to(settings.device) for name, model in models.items()}


@dataclasses.dataclass
class _Unit:
    """What one backward and optimizer step covers: a chunk of attentive probes, or a baseline."""

    name: str
    model: torch.nn.Module
    probes: slice                # which of the group's P probes
    optimizer: StackedAdamW


def _units(models: dict, configs: Sequence[ProbeConfig], settings: TrainSettings) -> list:
    def unit(name, model, start, stop):
        members = configs[start:stop]
        optimizer = StackedAdamW(model.parameters(), [c.lr for c in members], [c.wd for c in members],
                                 betas=settings.betas, eps=settings.eps, fused=settings.fused_adamw)
        return _Unit(name, model, slice(start, stop), optimizer)

    units, start = [], 0
    for chunk in models[ATTENTIVE].chunks:
        units.append(unit(ATTENTIVE, chunk, start, start + chunk.num_probes))
        start += chunk.num_probes
    units += [unit(name, model, 0, len(configs)) for name, model in models.items() if name != ATTENTIVE]
    return units


@torch.no_grad()
def evaluate(models: dict, data: SweepData, split: str, settings: TrainSettings):
    """Balanced accuracy (P,) per model on a split, and the attentive probes' mean attention (P, H, N)."""
    for model in models.values():
        model.eval()
    predictions = {name: [] for name in models}
    attention_sum = None
    target = data.splits[split]
    for tokens, _labels in target.chunks(settings.eval_batch_size, settings.device):
        for name, model in models.items():
            if name == ATTENTIVE:
                logits, attention = model(tokens, return_attention=True)
                total = attention.sum(0, dtype=torch.float64)
                attention_sum = total if attention_sum is None else attention_sum + total
            else:
                logits = model(baseline_inputs(name, tokens, data))
            predictions[name].append(logits.argmax(-1))
    accuracy = {name: balanced_accuracy(torch.cat(values), target.labels, data.num_classes)
                for name, values in predictions.items()}
    mean_attention = (attention_sum / max(len(target), 1)).float().cpu()
    return accuracy, mean_attention


def train_group(data: SweepData, configs: Sequence[ProbeConfig], settings: TrainSettings, *,
                progress: bool = True, desc: str = "lockstep") -> GroupResult:
    """Train the probes of ``configs`` together (P = len(configs)); every minibatch read once."""
    if not configs:
        raise ValueError("configs is empty")
    start_time = time.perf_counter()
    num_probes = len(configs)
    models = build_models(data, configs, settings)
    units = _units(models, configs, settings)
    # The attentive chunks' forward + backward replayed as CUDA graphs on GPU (sweep/graphs.py).
    forwards = [graphs.wrap(unit.model, settings.device) if unit.name == ATTENTIVE else unit.model
                for unit in units]
    class_weight = data.class_weights().to(settings.device)
    train = data.splits["train"]
    steps = steps_per_epoch(len(train), settings.batch_size)
    total_steps = steps * settings.epochs
    warmup_steps = round(settings.warmup_epochs * steps)
    history = {name: {"val_acc": [], "test_acc_per_epoch": [], "train_loss": []} for name in models}
    best = {name: {"val": [-1.0] * num_probes, "epoch": [0] * num_probes, "test": [0.0] * num_probes}
            for name in models}
    best_attention = [None] * num_probes
    snapshots = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
    step = 0
    try:
        for epoch in range(settings.epochs):
            for model in models.values():
                model.train()
            # On the device: adding a step's losses must not wait for the step (no host sync).
            loss_sums = {name: torch.zeros(num_probes, dtype=torch.float64, device=settings.device)
                         for name in models}
            batches = batch_indices(len(train), settings.batch_size, settings.data_seed, epoch)
            for indices in batches:
                tokens, labels = train.batch(indices, settings.device)
                factor = cosine_with_warmup(step, total_steps, warmup_steps)
                # Each unit's forward, backward and update run back to back while its weights
                # are still in cache; probes share no parameter, so the order changes nothing.
                for unit, forward in zip(units, forwards):
                    unit.optimizer.set_lr_factor(factor)
                    unit.optimizer.zero_grad()
                    inputs = tokens if unit.name == ATTENTIVE else baseline_inputs(unit.name, tokens, data)
                    per_probe = weighted_cross_entropy(forward(inputs), labels, class_weight)
                    per_probe.sum().backward()
                    unit.optimizer.step()
                    loss_sums[unit.name][unit.probes] += per_probe.detach().to(torch.float64)
                step += 1
                if bar is not None:
                    bar.update(1)
            val_acc, _ = evaluate(models, data, "val", settings)
            test_acc, test_attention = evaluate(models, data, "test", settings)
            for name in models:
                history[name]["val_acc"].append(val_acc[name].tolist())
                history[name]["test_acc_per_epoch"].append(test_acc[name].tolist())
                history[name]["train_loss"].append((loss_sums[name].cpu() / len(batches)).tolist())
                record = best[name]
                for p in range(num_probes):
                    if float(val_acc[name][p]) > record["val"][p]:  # first epoch reaching the best wins
                        record["val"][p], record["epoch"][p] = float(val_acc[name][p]), epoch + 1
                        record["test"][p] = float(test_acc[name][p])
                        if name == ATTENTIVE:
                            snapshots[configs[p].index] = models[ATTENTIVE].unstack(p)
                            best_attention[p] = test_attention[p].tolist()
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, best_val=f"{max(best[ATTENTIVE]['val']):.3f}")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start_time
    rows = {}
    for name in models:
        rows[name] = []
        for p, config in enumerate(configs):
            row = {"index": config.index, "lr": config.lr, "wd": config.wd, "seed": config.seed,
                   "round": config.round,
                   "val_acc": [values[p] for values in history[name]["val_acc"]],
                   "test_acc_per_epoch": [values[p] for values in history[name]["test_acc_per_epoch"]],
                   "train_loss": [values[p] for values in history[name]["train_loss"]],
                   "best_val_acc": best[name]["val"][p], "best_epoch": best[name]["epoch"][p],
                   "test_acc": best[name]["test"][p],
                   "seconds": seconds / num_probes, "group_size": num_probes, "group_seconds": seconds}
            if name == ATTENTIVE:
                row["mean_attention"] = best_attention[p]
            rows[name].append(row)
    return GroupResult(rows, snapshots, models[ATTENTIVE].probe_kwargs(), seconds)
