"""The cached features a sweep reads: splits, minibatch order, baseline inputs, metrics.

Features stay memory-mapped (``fastfuse.features.load_features``); each minibatch is gathered
and converted to float32 once and then feeds every probe. The order of the minibatches comes
from a data seed shared by all probes, so lockstep, sequential and distributed runs see the same
batches.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..features import apply_nonfinite_policy, load_features, load_metadata, num_classes_of

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class TokenLayout:
    """Where the baselines' inputs lie among the N cached tokens (SPEC §1 paper order)."""

    tokens: str                  # "cls+ap", "cls", "ap" or "all"
    num_tokens: int
    num_layers: int              # L (1 for "all")
    last_cls: int                # index of the last layer's CLS token (or the last token)

    @classmethod
    def from_meta(cls, meta: dict, num_tokens: int) -> "TokenLayout":
        tokens = meta.get("tokens") or ("cls+ap" if num_tokens % 2 == 0 else "all")
        if tokens == "cls+ap":
            if num_tokens % 2:
                raise ValueError(f"features say tokens='cls+ap' but hold an odd number of tokens ({num_tokens})")
            return cls(tokens, num_tokens, num_tokens // 2, num_tokens - 2)
        if tokens in ("cls", "ap"):
            return cls(tokens, num_tokens, num_tokens, num_tokens - 1)
        if tokens == "all":
            return cls(tokens, num_tokens, 1, 0)
        raise ValueError(f"features metadata has an unknown token spec {tokens!r}")

    def token_names(self) -> list[str]:
        if self.tokens == "cls+ap":
            return [f"{kind}_{layer}" for layer in range(self.num_layers) for kind in ("cls", "ap")]
        if self.tokens in ("cls", "ap"):
            return [f"{self.tokens}_{layer}" for layer in range(self.num_layers)]
        return [f"token_{index}" for index in range(self.num_tokens)]


@dataclasses.dataclass
class Split:
    features: torch.Tensor       # (n, N, D), memory-mapped, any float dtype
    labels: torch.Tensor         # (n,) int64

    def __len__(self) -> int:
        return self.features.shape[0]

    def batch(self, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.features[indices].to(device=device, dtype=torch.float32, non_blocking=True)
        return tokens, self.labels[indices].to(device, non_blocking=True)

    def chunks(self, batch_size: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield (self.features[start:stop].to(device=device, dtype=torch.float32, non_blocking=True),
                   self.labels[start:stop].to(device, non_blocking=True))


@dataclasses.dataclass
class SweepData:
    splits: dict                 # name -> Split
    num_classes: int
    layout: TokenLayout
    meta: dict
    directory: Optional[str] = None

    @property
    def dim(self) -> int:
        return self.splits["train"].features.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.splits["train"].features.shape[1]

    def class_weights(self) -> torch.Tensor:
        """n / (C * count_c) from the train labels (0 for a class absent from train)."""
        labels = self.splits["train"].labels
        counts = torch.bincount(labels, minlength=self.num_classes).to(torch.float64)
        weights = torch.where(counts > 0, labels.numel() / (self.num_classes * counts.clamp(min=1)),
                              torch.zeros_like(counts))
        return weights.to(torch.float32)


def from_tensors(train, val, test, *, meta: Optional[dict] = None,
                 num_classes: Optional[int] = None, nonfinite: str = "raise") -> SweepData:
    """SweepData from in-memory (features, labels) pairs, e.g. for tests.

    ``nonfinite``: what to do with samples holding NaN/infinity ('raise', 'drop', 'keep'; see
    :func:`fastfuse.features.load_features`)."""
    splits = {}
    for name, pair in zip(SPLITS, (train, val, test)):
        labels = torch.as_tensor(pair[1])
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"split {name!r}: labels must be integers (class indices), got {labels.dtype}")
        features, labels = apply_nonfinite_policy(torch.as_tensor(pair[0]), labels.to(torch.int64),
                                                  nonfinite, f"split {name!r}")
        splits[name] = Split(features, labels)
    return _finish(splits, dict(meta or {}), num_classes, None)


def load_sweep_data(directory, *, nonfinite: str = "raise") -> SweepData:
    """The train, val and test splits of a feature cache written by save_features / extract.

    Every file is validated and the features are checked once for non-finite values
    (``nonfinite``: 'raise', 'drop' or 'keep', see :func:`fastfuse.features.load_features`)."""
    directory = Path(directory)
    splits, meta = {}, {}
    for name in SPLITS:
        features, labels = load_features(directory, name, nonfinite=nonfinite)
        splits[name] = Split(features, labels)
        if not meta:
            meta = load_metadata(directory, name)
    return _finish(splits, meta, num_classes_of(meta), str(directory))


def _finish(splits: dict, meta: dict, num_classes: Optional[int], directory) -> SweepData:
    shapes = {name: tuple(split.features.shape[1:]) for name, split in splits.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"splits must share (tokens, dim), got {shapes}")
    for name, split in splits.items():
        if split.features.dim() != 3 or split.labels.shape != split.features.shape[:1]:
            raise ValueError(f"split {name!r}: features must be (n, N, D) with labels (n,), got "
                             f"{tuple(split.features.shape)} and {tuple(split.labels.shape)}")
        if len(split) < 2 and name == "train":
            raise ValueError("the train split needs at least 2 samples (BatchNorm)")
        if split.labels.numel() and split.labels.min() < 0:
            raise ValueError(f"split {name!r} has negative labels")
    seen = max(int(split.labels.max()) + 1 for split in splits.values() if split.labels.numel())
    total = sum(len(split) for split in splits.values())
    if num_classes is None and seen > total:
        # Labels are class indices 0..C-1; a label far above the sample count is not one (and
        # would size every one-hot and classifier by it).
        raise ValueError(f"labels go up to {seen - 1} but the splits hold only {total} samples: labels must "
                         "be class indices 0..C-1 (record 'num_classes' in the metadata if that is intended)")
    num_classes = seen if num_classes is None else int(num_classes)
    if num_classes < seen:
        raise ValueError(f"metadata says num_classes={num_classes} but labels go up to {seen - 1}")
    present = torch.unique(splits["train"].labels).numel() if "train" in splits else 0
    if num_classes < 2 or present < 2:
        raise ValueError(f"a probe needs at least 2 classes to tell apart; the train split holds "
                         f"{present} distinct label(s) (num_classes={num_classes})")
    layout = TokenLayout.from_meta(meta, next(iter(shapes.values()))[0])
    return SweepData(splits, num_classes, layout, meta, directory)


def batch_indices(num_samples: int, batch_size: int, data_seed: int, epoch: int) -> list[torch.Tensor]:
    """The minibatches of one epoch: a permutation from (data_seed, epoch), cut into batches.

    A last batch of a single sample is dropped (BatchNorm cannot train on it). Indices are sorted
    inside each batch so the memory-mapped reads go forward through the file.
    """
    generator = torch.Generator().manual_seed(int(data_seed) * 1_000_003 + int(epoch))
    order = torch.randperm(num_samples, generator=generator)
    batches = [batch.sort().values for batch in order.split(batch_size)]
    if len(batches) > 1 and batches[-1].numel() < 2:
        batches.pop()
    return batches


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest >= 2 or full == 0 else 0)


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean per-class recall over the classes present in ``labels``, for (n, P) predictions -> (P,)."""
    if predictions.dim() == 1:
        predictions = predictions.unsqueeze(1)
    labels = labels.to(predictions.device)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)    # (n, C)
    counts = one_hot.sum(0)
    correct = (predictions == labels.unsqueeze(1)).to(torch.float64)                 # (n, P)
    recalls = (one_hot.T @ correct)[counts > 0] / counts[counts > 0].unsqueeze(1)    # (C', P)
    return recalls.mean(0).cpu()
