"""The epoch loop: P probes (and their linear baselines) trained in lockstep on each minibatch.

Training follows the paper: AdamW with each probe's own lr and weight decay, a cosine schedule
with linear warmup (per optimizer step), class-weighted cross-entropy (weights from the train
label frequencies), balanced accuracy on val and test after every epoch; a probe's test accuracy
is the one at its best validation epoch (the first epoch reaching its best).

:func:`run_epochs` (the minibatch order, the schedule, the epoch loop) and :class:`BestEpochs`
(the best-epoch choice) are shared with the paper-probe comparison
(:mod:`fastfuse.sweep.paper_reference`), so both train exactly the same way.

A probe whose epoch loss is not finite is marked diverged (its best epoch stays the last one
before), and the others go on. With a checkpoint path, the whole group's state is saved
atomically after every epoch and a later call resumes from it, bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import storage
from . import families, graphs
from .data import Split, SweepData, balanced_accuracy, batch_indices, steps_per_epoch
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
    probe: str = "attentive-fusion"          # the probe family (fastfuse.sweep.families)

    def __post_init__(self):
        if self.probe not in (families.DEFAULT, *families.FAMILIES):
            raise ValueError(f"probe must be one of {', '.join((families.DEFAULT, *families.FAMILIES))}, "
                             f"got {self.probe!r}")
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
    if settings.probe != families.DEFAULT:   # another pooler family (one op call for all P probes)
        attentive = families.FamilyBank.from_seeds(settings.probe, seeds, data.dim, settings.num_heads,
                                                   data.num_classes, backend=settings.backend)
    else:
        attentive = ProbeBank.from_seeds(
            seeds, data.dim, settings.num_heads, data.num_classes, probes_per_call=settings.probes_per_call,
            head_dim=settings.head_dim, qkv_bias=settings.qkv_bias, backend=settings.backend)
    models = {ATTENTIVE: attentive}
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


def run_epochs(train: Split, settings: TrainSettings, *, begin_epoch: Callable, train_step: Callable,
               end_epoch: Callable, start_epoch: int = 0, bar=None) -> None:
    """The training loop every probe trainer shares.

    Epochs ``start_epoch .. settings.epochs - 1``; each epoch's minibatches come from
    (``data_seed``, epoch) and each optimizer step's lr factor from the cosine schedule with
    warmup. ``train_step(tokens, labels, factor)`` trains on one minibatch and returns the
    per-probe losses (P,) in float64 (on the device: summing them never waits for the step); ``begin_epoch()`` puts the models in training
    mode, ``end_epoch(epoch, mean_losses)`` evaluates.
    """
    steps = steps_per_epoch(len(train), settings.batch_size)
    total_steps = steps * settings.epochs
    warmup_steps = round(settings.warmup_epochs * steps)
    step = start_epoch * steps
    for epoch in range(start_epoch, settings.epochs):
        begin_epoch()
        batches = batch_indices(len(train), settings.batch_size, settings.data_seed, epoch)
        loss_sum = None
        for indices in batches:
            tokens, labels = train.batch(indices, settings.device)
            losses = train_step(tokens, labels, cosine_with_warmup(step, total_steps, warmup_steps))
            loss_sum = losses if loss_sum is None else loss_sum + losses
            step += 1
            if bar is not None:
                bar.update(1)
        end_epoch(epoch, (loss_sum / len(batches)).cpu())


class BestEpochs:
    """Per probe: the first epoch reaching the best val accuracy, its test accuracy, divergence."""

    def __init__(self, num_probes: int):
        self.val = [-1.0] * num_probes
        self.epoch = [0] * num_probes
        self.test = [0.0] * num_probes
        self.diverged_epoch: list = [None] * num_probes

    def update(self, epoch: int, val_acc, test_acc, losses) -> list[int]:
        """Records epoch ``epoch`` (0-based); returns the probes whose best it became."""
        improved = []
        for p in range(len(self.val)):
            if self.diverged_epoch[p] is not None:
                continue
            if not math.isfinite(float(losses[p])):
                self.diverged_epoch[p] = epoch + 1
                continue
            if float(val_acc[p]) > self.val[p]:  # the first epoch reaching the best wins
                self.val[p], self.epoch[p], self.test[p] = float(val_acc[p]), epoch + 1, float(test_acc[p])
                improved.append(p)
        return improved

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, list(value))


def checkpoint_identity(configs: Sequence[ProbeConfig], settings: TrainSettings) -> dict:
    """What a group checkpoint must match to be resumed: its probes and the training settings."""
    kept = {key: value for key, value in settings.as_dict().items() if key not in ("device", "backend")}
    return {"configs": [dataclasses.asdict(config) for config in configs], "settings": kept}


def _load_checkpoint(path: Path, identity: dict) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"sweep checkpoint {path} cannot be read ({error}); remove it to retrain "
                         "its probes, or start over with --overwrite") from None
    if state.get("identity") != identity:
        raise ValueError(f"sweep checkpoint {path} was written for other probes or settings; "
                         "use --overwrite or another --out")
    return state


def train_group(data: SweepData, configs: Sequence[ProbeConfig], settings: TrainSettings, *,
                progress: bool = True, desc: str = "lockstep", checkpoint: Optional[Path] = None) -> GroupResult:
    """Train the probes of ``configs`` together (P = len(configs)); every minibatch read once.

    ``checkpoint``: a file that holds the group's state after every epoch (written atomically);
    when it exists, training continues from it (same probes and settings, else ValueError).
    """
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
    history = {name: {"val_acc": [], "test_acc_per_epoch": [], "train_loss": []} for name in models}
    best = {name: BestEpochs(num_probes) for name in models}
    best_attention = [None] * num_probes
    snapshots = {}
    start_epoch, previous_seconds = 0, 0.0
    identity = checkpoint_identity(configs, settings)
    state = _load_checkpoint(Path(checkpoint), identity) if checkpoint is not None else None
    if state is not None:
        for name, model in models.items():
            model.load_state_dict(state["models"][name])
        for unit, optimizer_state in zip(units, state["optimizers"]):
            unit.optimizer.load_state_dict(optimizer_state)
        history, snapshots, best_attention = state["history"], state["snapshots"], state["best_attention"]
        for name, record in state["best"].items():
            best[name].load_state_dict(record)
        start_epoch, previous_seconds = state["epoch"], state["seconds"]

    def begin_epoch():
        for model in models.values():
            model.train()

    def train_step(tokens, labels, factor):
        # On the device: adding a step's losses must not wait for the step (no host sync).
        losses = {name: torch.zeros(num_probes, dtype=torch.float64, device=settings.device)
                  for name in models}
        # Each unit's forward, backward and update run back to back while its weights are
        # still in cache; probes share no parameter, so the order changes nothing.
        for unit, forward in zip(units, forwards):
            unit.optimizer.set_lr_factor(factor)
            unit.optimizer.zero_grad()
            inputs = tokens if unit.name == ATTENTIVE else baseline_inputs(unit.name, tokens, data)
            per_probe = weighted_cross_entropy(forward(inputs), labels, class_weight)
            per_probe.sum().backward()
            unit.optimizer.step()
            losses[unit.name][unit.probes] += per_probe.detach().to(torch.float64)
        return torch.stack([losses[name] for name in models])

    def end_epoch(epoch, mean_losses):
        val_acc, _ = evaluate(models, data, "val", settings)
        test_acc, test_attention = evaluate(models, data, "test", settings)
        for row, name in enumerate(models):
            history[name]["val_acc"].append(val_acc[name].tolist())
            history[name]["test_acc_per_epoch"].append(test_acc[name].tolist())
            history[name]["train_loss"].append(mean_losses[row].tolist())
            for p in best[name].update(epoch, val_acc[name], test_acc[name], mean_losses[row]):
                if name == ATTENTIVE:
                    snapshots[configs[p].index] = models[ATTENTIVE].unstack(p)
                    best_attention[p] = test_attention[p].tolist()
        if checkpoint is not None:
            storage.torch_save({
                "identity": identity, "epoch": epoch + 1,
                "seconds": previous_seconds + time.perf_counter() - start_time,
                "models": {name: model.state_dict() for name, model in models.items()},
                "optimizers": [unit.optimizer.state_dict() for unit in units],
                "history": history, "best": {name: record.state_dict() for name, record in best.items()},
                "snapshots": snapshots, "best_attention": best_attention}, checkpoint)
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, best_val=f"{max(best[ATTENTIVE].val):.3f}")

    bar = None
    if progress:
        from tqdm.auto import tqdm
        steps = steps_per_epoch(len(train), settings.batch_size)
        bar = tqdm(total=steps * settings.epochs, initial=steps * start_epoch, desc=desc, unit="step",
                   file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        run_epochs(train, settings, begin_epoch=begin_epoch, train_step=train_step, end_epoch=end_epoch,
                   start_epoch=start_epoch, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    seconds = previous_seconds + time.perf_counter() - start_time
    rows = {}
    for name in models:
        rows[name] = []
        record = best[name]
        for p, config in enumerate(configs):
            row = {"index": config.index, "lr": config.lr, "wd": config.wd, "seed": config.seed,
                   "round": config.round,
                   "val_acc": [values[p] for values in history[name]["val_acc"]],
                   "test_acc_per_epoch": [values[p] for values in history[name]["test_acc_per_epoch"]],
                   "train_loss": [values[p] for values in history[name]["train_loss"]],
                   "best_val_acc": record.val[p], "best_epoch": record.epoch[p], "test_acc": record.test[p],
                   "diverged": record.diverged_epoch[p] is not None, "diverged_epoch": record.diverged_epoch[p],
                   "seconds": seconds / num_probes, "group_size": num_probes, "group_seconds": seconds}
            if name == ATTENTIVE:
                row["mean_attention"] = best_attention[p]
            rows[name].append(row)
    return GroupResult(rows, snapshots, models[ATTENTIVE].probe_kwargs(), seconds)
