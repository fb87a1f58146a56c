"""Feature cache: gathered tokens (n, N, D) of a split, saved once and memory-mapped for sweeps.

One directory holds any number of splits, each as three files:

    {split}_features.npy   (n, N, D) float16 / float32 / float64; bfloat16 as its uint16 bits
    {split}_labels.npy     (n,) int64
    {split}.json           metadata: shape, dtype, fastfuse version, plus the caller's
                           (model, layers, tokens, num_prefix_tokens, ...)

The JSON is written last, after the arrays are complete and renamed into place, so a split is
complete exactly when its JSON exists. The arrays are written to temporary files in the same
folder (``fastfuse.storage``), with their disk space reserved before any data is written; an
overwrite keeps the previous split loadable until the new arrays are complete, and only the
three renames that put them in place run without a loadable split.

Loading validates every file against the JSON (format version, dtype, shape, integer labels in
range; errors name the file) and checks the features for non-finite values once.
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

from . import storage
from .gather import FLOAT_DTYPES, gather_tokens, normalize_inputs, num_gathered_tokens

FORMAT = "fastfuse-features-v1"
NONFINITE_POLICIES = ("raise", "drop", "keep")
# Samples checked per step of the non-finite scan: bounds the memory of one step.
_SCAN_ELEMENTS = 1 << 24
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
        # Temporary names that storage.remove_temporaries recognises (a killed run's leftovers).
        self._partial = {key: path.with_name(storage.TEMP_PREFIX + path.name) for key, path in self.paths.items()}
        self._arrays = None
        self.shape = None

    def allocate(self, num_samples: int, num_tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is not None:
            raise RuntimeError(f"split {self.split!r} was already allocated")
        for name, value in (("num_samples", num_samples), ("num_tokens", num_tokens), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shape = (num_samples, num_tokens, dim)
        try:
            features = self._open(self._partial["features"], _numpy_storage_dtype(self.dtype), self.shape)
            labels = self._open(self._partial["labels"], np.dtype(np.int64), (num_samples,))
        except BaseException:
            self.abort()
            raise
        self._arrays = (features, labels)
        return _as_torch(features, self.dtype), torch.from_numpy(labels)

    @staticmethod
    def _open(path: Path, dtype: np.dtype, shape: tuple) -> np.memmap:
        # open_memmap leaves a sparse file: without the reservation a full disk would surface
        # as SIGBUS on the first write to an unbacked page. Reserved before any data is written.
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        try:
            storage.reserve_space(path, path.stat().st_size)
        except BaseException:
            del array
            raise
        return array

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
        # Everything that can fail runs before the previous split is touched.
        text = json.dumps(record, indent=2, default=_json_default, allow_nan=False)
        for array in self._arrays:
            array.flush()
        self._arrays = None
        for key in ("features", "labels"):
            storage.fsync_path(self._partial[key])
        # The split is incomplete (no JSON) only while the two arrays are renamed into place.
        self.paths["meta"].unlink(missing_ok=True)
        os.replace(self._partial["features"], self.paths["features"])
        os.replace(self._partial["labels"], self.paths["labels"])
        storage.write_text(self.paths["meta"], text + "\n")
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
    """The JSON record of a complete split, checked: known format, the fields the cache needs."""
    path = split_paths(directory, split)["meta"]
    if not path.exists():
        found = complete_splits(directory)
        raise FileNotFoundError(f"no complete split {split!r} in {directory} "
                                f"(complete splits: {', '.join(found) if found else 'none'})")
    meta = storage.read_json(path, what="feature metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"feature metadata {path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"feature metadata {path}: unknown format {meta.get('format')!r} (this fastfuse "
                         f"reads {FORMAT!r}); re-extract the features with this version")
    shape = meta.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in shape)):
        raise ValueError(f"feature metadata {path}: 'shape' must be three positive integers "
                         f"(samples, tokens, dim), got {shape!r}")
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"feature metadata {path}: unsupported dtype {meta.get('dtype')!r} "
                         f"(expected one of {[_dtype_name(d) for d in FLOAT_DTYPES]})")
    return meta


def num_classes_of(meta: dict) -> Optional[int]:
    """The class count the metadata records ('num_classes', else the length of 'classes'), or None."""
    if meta.get("num_classes") is not None:
        return meta["num_classes"]
    classes = meta.get("classes")
    return len(classes) if isinstance(classes, list) else None


def _open_array(path: Path, mmap_mode, what: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} is missing")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{what} file {path} is not a readable .npy array (truncated or "
                         f"corrupt?): {error}") from None


def nonfinite_samples(features: torch.Tensor) -> torch.Tensor:
    """Indices of the samples of (n, ...) ``features`` holding a NaN or an infinity, one pass."""
    rows = max(1, _SCAN_ELEMENTS // max(1, features[0].numel())) if len(features) else 1
    bad = [start + torch.nonzero(~torch.isfinite(features[start:start + rows]).flatten(1).all(1)).flatten()
           for start in range(0, features.shape[0], rows)]
    return torch.cat(bad) if bad else torch.zeros(0, dtype=torch.int64)


def apply_nonfinite_policy(features: torch.Tensor, labels: torch.Tensor, policy: str, where: str):
    """Checks ``features`` once for non-finite values: 'raise' names ``where`` and the samples,
    'drop' removes those samples (features become an in-memory copy), 'keep' skips the check."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    if policy == "keep":
        return features, labels
    bad = nonfinite_samples(features)
    if bad.numel() == 0:
        return features, labels
    if policy == "raise":
        shown = ", ".join(str(int(index)) for index in bad[:20]) + (", ..." if bad.numel() > 20 else "")
        raise ValueError(f"{where}: {bad.numel()} of {features.shape[0]} samples hold NaN or infinite "
                         f"values (sample indices {shown}); fix the data, or drop them "
                         f"(nonfinite='drop', sweep --drop-nonfinite)")
    keep = torch.ones(features.shape[0], dtype=torch.bool)
    keep[bad] = False
    print(f"fastfuse: {where}: dropped {bad.numel()} samples holding NaN or infinite values",
          file=sys.stderr)
    return features[keep], labels[keep]


def load_features(directory, split: str, *, nonfinite: str = "raise") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, N, D), labels (n,) int64) of one split; the features are memory-mapped.

    The features are mapped copy-on-write: reading pages them in from disk on demand, and writes
    to the tensor stay in this process, never reaching the file.

    Every file is checked against the JSON (format version, dtype, shape, integer labels, labels
    below the recorded class count); errors name the file. ``nonfinite``: 'raise' (default)
    reads the features once and raises naming the split and the samples holding NaN/infinity,
    'drop' removes those samples (the result is then an in-memory copy), 'keep' skips the check.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    meta = load_metadata(directory, split)
    paths = split_paths(directory, split)
    dtype = getattr(torch, meta["dtype"])
    array = _open_array(paths["features"], "c", "features")
    expected = _numpy_storage_dtype(dtype)
    if array.dtype != expected or list(array.shape) != list(meta["shape"]):
        raise ValueError(f"features file {paths['features']} holds {array.dtype} {tuple(array.shape)} but "
                         f"{paths['meta']} says {meta['dtype']} {tuple(meta['shape'])} (stored as {expected})")
    raw_labels = _open_array(paths["labels"], None, "labels")
    if raw_labels.dtype.kind not in "iu":
        raise ValueError(f"labels file {paths['labels']} holds {raw_labels.dtype} values; labels must be "
                         "integers (class indices)")
    if raw_labels.shape != (meta["shape"][0],):
        raise ValueError(f"labels file {paths['labels']} has shape {raw_labels.shape}, expected "
                         f"({meta['shape'][0]},) as {paths['meta']} says")
    if raw_labels.size and (raw_labels.min() < 0 or raw_labels.max() > np.iinfo(np.int64).max):
        raise ValueError(f"labels file {paths['labels']} holds labels outside [0, 2**63): class indices "
                         "must be non-negative")
    labels = torch.from_numpy(raw_labels.astype(np.int64, copy=False))
    num_classes = num_classes_of(meta)
    if num_classes is not None and labels.numel() and int(labels.max()) >= int(num_classes):
        raise ValueError(f"labels file {paths['labels']} holds label {int(labels.max())} but "
                         f"{paths['meta']} records {num_classes} classes (labels must be < {num_classes})")
    features = _as_torch(array, dtype)
    return apply_nonfinite_policy(features, labels, nonfinite, f"split {split!r} in {directory}")


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
