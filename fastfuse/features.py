"""Feature cache: gathered tokens (n, N, D) of a split, saved once and memory-mapped for sweeps.

One directory holds any number of splits, each as three files:

    {split}_features.npy   (n, N, D) float16 / float32 / float64; bfloat16 as its uint16 bits
    {split}_labels.npy     (n,) int64
    {split}.json           metadata: shape, dtype, fastfuse version, plus the caller's
                           (model, layers, tokens, num_prefix_tokens, ...)

The JSON is written last, after the arrays are complete and renamed into place, so a split is
complete exactly when its JSON exists; an interrupted write leaves only ``*.partial`` files.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .gather import FLOAT_DTYPES, gather_tokens, normalize_inputs, num_gathered_tokens

FORMAT = "fastfuse-features-v1"
_RESERVED_KEYS = ("format", "split", "num_samples", "num_tokens", "dim", "shape", "dtype",
                  "labels_dtype", "fastfuse_version")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _numpy_storage_dtype(dtype: torch.dtype) -> np.dtype:
    # numpy has no bfloat16: store its 16 bits as uint16 and view them back on load.
    return np.dtype(np.uint16) if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype


def _as_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def _check_split(split) -> str:
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
        raise ValueError(f"split must be a plain name such as 'train' (letters, digits, '_', '.', "
                         f"'-'; no path separators), got {split!r}")
    return split


def split_paths(directory, split: str) -> dict[str, Path]:
    """The files of one split: {'features', 'labels', 'meta'} -> path."""
    directory = Path(directory)
    split = _check_split(split)
    return {"features": directory / f"{split}_features.npy",
            "labels": directory / f"{split}_labels.npy",
            "meta": directory / f"{split}.json"}


def complete_splits(directory) -> list[str]:
    """Names of the splits in ``directory`` whose write finished (their JSON exists)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(path.stem for path in directory.glob("*.json")
                  if _SPLIT_NAME.match(path.stem) and (directory / f"{path.stem}_features.npy").exists())


def _json_default(value):
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"meta values must be JSON serialisable (str, numbers, lists, dicts); "
                    f"got {type(value).__name__}: {value!r}")


class FeatureWriter:
    """Writes one split into preallocated memory-mapped arrays, batch by batch.

    ``features, labels = writer.allocate(n, N, D)`` creates the (partial) files and returns
    writable tensors backed by them; fill them, then ``writer.finish(meta)`` moves the files into
    place and writes the JSON. ``writer.abort()`` removes the partial files.
    """

    def __init__(self, directory, split: str, dtype: torch.dtype = torch.float32):
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[_dtype_name(d) for d in FLOAT_DTYPES]}, got {dtype}")
        self.directory = Path(directory)
        self.split = _check_split(split)
        self.dtype = dtype
        self.paths = split_paths(directory, split)
        self._partial = {key: path.with_name(path.name + ".partial") for key, path in self.paths.items()}
        self._arrays = None
        self.shape = None

    def allocate(self, num_samples: int, num_tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is not None:
            raise RuntimeError(f"split {self.split!r} was already allocated")
        for name, value in (("num_samples", num_samples), ("num_tokens", num_tokens), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths["meta"].unlink(missing_ok=True)  # the split is incomplete from here on
        self.shape = (num_samples, num_tokens, dim)
        features = np.lib.format.open_memmap(self._partial["features"], mode="w+",
                                             dtype=_numpy_storage_dtype(self.dtype), shape=self.shape)
        labels = np.lib.format.open_memmap(self._partial["labels"], mode="w+", dtype=np.int64,
                                           shape=(num_samples,))
        self._arrays = (features, labels)
        return _as_torch(features, self.dtype), torch.from_numpy(labels)

    def finish(self, meta: Optional[dict] = None) -> dict:
        """Flush, move the arrays into place, write and return the metadata."""
        if self._arrays is None:
            raise RuntimeError(f"split {self.split!r}: finish() before allocate()")
        from . import __version__

        meta = dict(meta or {})
        num_samples, num_tokens, dim = self.shape
        record = {"format": FORMAT, "split": self.split, "num_samples": num_samples,
                  "num_tokens": num_tokens, "dim": dim, "shape": list(self.shape),
                  "dtype": _dtype_name(self.dtype), "labels_dtype": "int64",
                  "fastfuse_version": __version__}
        clashes = {key: meta[key] for key in _RESERVED_KEYS if key in meta and meta[key] != record[key]}
        if clashes:
            raise ValueError(f"meta sets keys that the cache itself records, with other values: {clashes}")
        record.update({key: value for key, value in meta.items() if key not in record})
        text = json.dumps(record, indent=2, default=_json_default)  # fail before moving files
        for array in self._arrays:
            array.flush()
        self._arrays = None
        os.replace(self._partial["features"], self.paths["features"])
        os.replace(self._partial["labels"], self.paths["labels"])
        self._partial["meta"].write_text(text + "\n")
        os.replace(self._partial["meta"], self.paths["meta"])
        return record

    def abort(self) -> None:
        self._arrays = None
        for path in self._partial.values():
            path.unlink(missing_ok=True)


def save_features(directory, split: str, features, labels, meta: Optional[dict] = None) -> dict:
    """Save the (n, N, D) tokens of one split and their (n,) integer labels; return the metadata.

    ``features``: a floating tensor or array (float16, bfloat16, float32, float64), stored in its
    dtype. ``labels``: integers, stored as int64. ``meta``: JSON-serialisable facts to keep beside
    them (model, layers, tokens, num_prefix_tokens, ...); shape, dtype and the fastfuse version
    are added. An existing split of the same name is replaced.
    """
    features = torch.as_tensor(features)
    labels = torch.as_tensor(labels)
    if features.dtype not in FLOAT_DTYPES:
        raise TypeError(f"features must be floating (float16, bfloat16, float32 or float64), got {features.dtype}")
    if features.dim() != 3:
        raise ValueError(f"features must have shape (samples, tokens, dim), got {tuple(features.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must have shape ({features.shape[0]},) to match features "
                         f"{tuple(features.shape)}, got {tuple(labels.shape)}")
    writer = FeatureWriter(directory, split, features.dtype)
    out_features, out_labels = writer.allocate(*features.shape)
    try:
        out_features.copy_(features)
        out_labels.copy_(labels)
        return writer.finish(meta)
    except BaseException:
        writer.abort()
        raise


def load_metadata(directory, split: str) -> dict:
    """The JSON record of a complete split."""
    path = split_paths(directory, split)["meta"]
    if not path.exists():
        found = complete_splits(directory)
        raise FileNotFoundError(f"no complete split {split!r} in {directory} "
                                f"(complete splits: {', '.join(found) if found else 'none'})")
    return json.loads(path.read_text())


def load_features(directory, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, N, D), labels (n,) int64) of one split; the features are memory-mapped.

    The features are mapped copy-on-write: reading pages them in from disk on demand, and writes
    to the tensor stay in this process, never reaching the file.
    """
    meta = load_metadata(directory, split)
    paths = split_paths(directory, split)
    dtype = getattr(torch, meta["dtype"], None)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{paths['meta']}: unsupported dtype {meta['dtype']!r}")
    features = _as_torch(np.load(paths["features"], mmap_mode="c"), dtype)
    labels = torch.from_numpy(np.load(paths["labels"]).astype(np.int64, copy=False))
    if list(features.shape) != list(meta["shape"]) or labels.shape != features.shape[:1]:
        raise ValueError(f"split {split!r} in {directory} is inconsistent: features "
                         f"{tuple(features.shape)}, labels {tuple(labels.shape)}, metadata {meta['shape']}")
    return features, labels


def extract_features(tap, loader, *, tokens: str = "cls+ap", dtype: torch.dtype = torch.float32,
                     device=None, allocate: Optional[Callable] = None, num_samples: Optional[int] = None,
                     progress: bool = False, desc: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream ``loader`` through a :class:`~fastfuse.LayerTap` and gather tokens into arrays.

    Args:
        tap: the LayerTap; ``tap.num_prefix_tokens`` decides which rows "ap" averages.
        loader: iterable of ``(images, labels)`` batches, e.g. a DataLoader, visiting each sample
            once; the stored order is the iteration order.
        tokens: token spec ("cls", "ap", "cls+ap", "all"), see :mod:`fastfuse.gather`.
        dtype: storage dtype; tokens are gathered in float32 (float64 for float64 activations)
            and rounded once.
        device: where images go; default the device of the model's first parameter.
        allocate: ``allocate(n, N, D) -> (features, labels)`` preallocates the outputs, e.g.
            ``FeatureWriter.allocate`` to write to disk; default in-memory tensors.
        num_samples: n; default ``len(loader.dataset)``.
        progress: show a tqdm bar on stderr, labelled ``desc``.

    Returns the filled (features (n, N, D), labels (n,) int64).
    """
    if num_samples is None:
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise TypeError("num_samples is needed when loader has no sized `dataset` attribute")
        num_samples = len(dataset)
    if device is None:
        parameter = next(tap.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    if allocate is None:
        def allocate(n, num_tokens, dim):
            return torch.empty((n, num_tokens, dim), dtype=dtype), torch.empty(n, dtype=torch.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_samples, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    features = labels = None
    filled = 0
    try:
        for batch in loader:
            images, batch_labels = batch[0], torch.as_tensor(batch[1])
            layers, spec, prefix = normalize_inputs(tap(images.to(device)), tokens, tap.num_prefix_tokens)
            compute_dtype = torch.float64 if layers[0].dtype == torch.float64 else torch.float32
            gathered = gather_tokens(layers, spec, prefix, compute_dtype).to(dtype)
            if features is None:
                num_tokens = num_gathered_tokens([layer.shape[1] for layer in layers], spec)
                features, labels = allocate(num_samples, num_tokens, gathered.shape[-1])
            size = gathered.shape[0]
            if filled + size > num_samples:
                raise RuntimeError(f"loader yielded more than num_samples={num_samples} samples")
            if batch_labels.shape != (size,):
                raise ValueError(f"a batch of {size} images came with labels of shape {tuple(batch_labels.shape)}")
            features[filled:filled + size].copy_(gathered)
            labels[filled:filled + size].copy_(batch_labels)
            filled += size
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()
    if filled != num_samples:
        raise RuntimeError(f"loader yielded {filled} samples but num_samples={num_samples} "
                           "(a drop_last loader or a sampler that skips samples?)")
    if features is None:  # empty loader
        raise ValueError("loader yielded no batches")
    return features, labels
