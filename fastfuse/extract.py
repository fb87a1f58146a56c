"""``python -m fastfuse extract``: multi-layer features of a timm ViT, cached per split.

    python -m fastfuse extract --model vit_small_patch16_224 --data digits --out feats/
    python -m fastfuse extract --model vit_base_patch16_224 --pretrained --data ~/imagenette \\
        --layers paper --tokens cls+ap --dtype float16 --out feats/imagenette

Writes the train, val and test splits of ``--data`` (see :mod:`fastfuse.features` for the
files). ``--data digits`` is scikit-learn's bundled 8x8 digits (1797 images, no download);
``--data DIR`` an ImageFolder tree, either with train/val/test subfolders or one folder of class
folders split by a fixed seed. ``--pretrained`` loads weights as timm does (downloaded into the
Hugging Face / torch hub cache on first use, ``HF_HUB_OFFLINE=1`` honoured); ``--pretrained FILE``
loads a local checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from . import storage
from .argtypes import nonnegative_int, positive_int, seed_int
from .features import FeatureWriter, complete_splits, extract_features, load_metadata
from .gather import TOKEN_SPECS
from .taps import LAYER_PRESETS, LayerTap

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
SPLIT_SEED = 0
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Facts that must agree before --resume may add splits to an existing cache.
# init_seed and backbone_digest make a resumed random backbone the one that wrote the cache.
_RESUME_KEYS = ("model", "pretrained", "layers", "tokens", "num_prefix_tokens", "img_size", "data", "dtype",
                "init_seed", "backbone_digest")


class WeightsNotFound(RuntimeError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="timm model name, e.g. vit_small_patch16_224")
    parser.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="load pretrained weights as timm does (from the hub cache, downloading them "
                             "when missing; HF_HUB_OFFLINE=1 keeps to the cache), or from a local "
                             "CHECKPOINT file; without it the model is randomly initialised")
    parser.add_argument("--data", required=True,
                        help="'digits' (scikit-learn's 8x8 digits) or an ImageFolder directory")
    parser.add_argument("--layers", default="paper",
                        help="'paper' (every block's norm2 + final norm), 'blocks', or comma-separated "
                             "module names or block indices (default: paper)")
    parser.add_argument("--tokens", default="cls+ap", choices=TOKEN_SPECS, help="token spec (default: cls+ap)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="storage dtype (default: float32)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="input resolution; default the model's own (ViT position embeddings are resampled)")
    parser.add_argument("--num-workers", type=nonnegative_int, default=0,
                        help="DataLoader worker processes (default: 0)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="initialisation seed of a randomly initialised backbone, recorded in the "
                             "cache so --resume rebuilds the same backbone (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="keep the splits already complete in --out and write the rest")
    existing.add_argument("--overwrite", action="store_true", help="rewrite every split in --out")


def parse_layers(text: str):
    """'paper' / 'blocks' as they are; 'a,b' as module names; '0,5,-1' as block indices."""
    if text in LAYER_PRESETS:
        return text
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [int(item) for item in items]
    except ValueError:
        return items


def find_cached_weights(pretrained_cfg: dict, cache_dir=None) -> Optional[tuple[str, object]]:
    """(path, custom_load) of weights for ``pretrained_cfg`` already on this machine, or None.

    Looks where timm would download to (the Hugging Face hub cache, then the torch hub cache),
    without touching the network. ``custom_load`` is what timm needs to read that file.
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = hub_id.partition("@")
        filename = pretrained_cfg.get("hf_hub_filename") or "pytorch_model.bin"
        names = [filename]
        if filename.endswith(".bin"):  # timm prefers the safetensors twin of a .bin file
            safe = filename.replace("pytorch_model.bin", "model.safetensors")
            names.insert(0, safe if safe != filename else filename[:-4] + ".safetensors")
        for name in names:
            path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision or None)
            if isinstance(path, str):
                # Hub files are state dicts; only the 'hf' custom loader applies to them.
                return path, pretrained_cfg.get("custom_load") == "hf"
    url = pretrained_cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return str(path), pretrained_cfg.get("custom_load", False)
    file = pretrained_cfg.get("file")
    if file and Path(file).is_file():
        return str(file), pretrained_cfg.get("custom_load", False)
    return None


def create_backbone(name: str, *, pretrained=False, img_size: Optional[int] = None, cache_dir=None):
    """(timm model without its classifier, where its weights came from).

    ``pretrained``: False (random init), True (timm's own loading: the Hugging Face or torch hub
    cache, downloading what is not cached; ``HF_HUB_OFFLINE=1`` keeps it to the cache), or the
    path of a local checkpoint file (a state dict, ``.safetensors`` or ``torch.save``d; timm adapts
    position embeddings and drops the classifier as for its own weights).
    """
    import timm

    kwargs = {"num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if cache_dir is not None:  # timm's override of the hub / torch cache folder
        kwargs["cache_dir"] = cache_dir
    if pretrained is False or pretrained is None:
        kwargs.pop("cache_dir", None)
        return timm.create_model(name, pretrained=False, **kwargs), "random init"
    if not isinstance(pretrained, (bool, str, Path)):
        raise TypeError(f"pretrained must be True, False or a checkpoint path, got {pretrained!r}")
    if pretrained is not True:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsNotFound(f"pretrained checkpoint {path} is not a file")
        # A state dict, whatever the model's own weights need (some load from .npz through custom_load).
        overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return model, str(path)
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        # Unknown names stay timm's error; a failed download or an offline miss becomes ours.
        if "Unknown model" in str(error) or "Invalid pretrained tag" in str(error):
            raise
        cfg = timm.models.get_pretrained_cfg(name) or {}
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        source = cfg.get("hf_hub_id") or cfg.get("url") or "none known"
        raise WeightsNotFound(
            f"cannot load pretrained weights for {name} (from {source}): {type(error).__name__}: {error}. "
            "They download into the Hugging Face / torch hub cache on first use; with HF_HUB_OFFLINE=1 "
            "they must already be there. Or pass a local checkpoint file.") from error
    found = find_cached_weights(dict(model.pretrained_cfg), cache_dir=cache_dir)
    source = found[0] if found else (model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url"))
    return model, str(source)


def split_indices(labels, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Stratified train/val/test indices (SPLIT_FRACTIONS), fixed by ``seed``, sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = {name: [] for name in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_test = round(len(members) * SPLIT_FRACTIONS["test"])
        num_val = round(len(members) * SPLIT_FRACTIONS["val"])
        parts["test"].append(members[:num_test])
        parts["val"].append(members[num_test:num_test + num_val])
        parts["train"].append(members[num_test + num_val:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


class DigitsDataset(torch.utils.data.Dataset):
    """8x8 digit images, upsampled to the model's input, grey as 3 channels, normalised."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, img_size: int, mean, std):
        self.images = torch.as_tensor(images, dtype=torch.float32) / 16.0  # pixels are 0..16
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        image = F.interpolate(self.images[index][None, None], size=(self.img_size, self.img_size),
                              mode="bilinear", align_corners=False, antialias=True)[0]
        return (image.expand(3, -1, -1) - self.mean) / self.std, self.labels[index]


def digits_splits(img_size: int, mean, std) -> tuple[dict, list]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = split_indices(digits.target)
    splits = {name: DigitsDataset(digits.images[idx], digits.target[idx], img_size, mean, std)
              for name, idx in indices.items()}
    return splits, [str(label) for label in digits.target_names]


def image_folder_splits(root: Path, transform) -> tuple[dict, list]:
    from torchvision.datasets import ImageFolder

    present = [name for name in SPLITS if (root / name).is_dir()]
    folders = [root / name for name in present] or [root]
    # One class list for all splits, so a class missing from one split keeps every index.
    classes = sorted({entry.name for folder in folders for entry in folder.iterdir() if entry.is_dir()})
    if not classes:
        raise ValueError(f"--data {root}: no class folders found (expected an ImageFolder tree)")

    class FixedClassesFolder(ImageFolder):
        def find_classes(self, directory):
            return classes, {name: index for index, name in enumerate(classes)}

    if present:
        return {name: FixedClassesFolder(root / name, transform, allow_empty=True) for name in present}, classes
    dataset = FixedClassesFolder(root, transform, allow_empty=True)
    return {name: torch.utils.data.Subset(dataset, idx.tolist())
            for name, idx in split_indices(dataset.targets).items()}, classes


def _say(message: str) -> None:
    print(f"fastfuse extract: {message}", file=sys.stderr)


def backbone_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the backbone's parameters and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        _say(f"--out {out} exists and is not a directory")
        return 2
    try:
        lock = storage.FolderLock(out, purpose="fastfuse extract").acquire()
    except storage.FolderLockedError as error:
        _say(str(error))
        return 2
    try:
        storage.remove_temporaries(out)  # what a killed run left behind
        return _run_locked(args, out)
    finally:
        lock.release()


def _run_locked(args, out: Path) -> int:
    if storage.folder_entries(out) and not (args.resume or args.overwrite):
        _say(f"--out {out} already exists and is not empty; pass --resume to keep its complete "
             "splits and write the rest, or --overwrite to rewrite them")
        return 2
    try:
        import timm.data
    except ImportError:
        _say("needs timm: pip install timm")
        return 1
    try:
        # A random backbone is built from --seed (recorded below), whatever the global RNG holds.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(args, "seed", 0))
            model, weights = create_backbone(args.model, pretrained=args.pretrained, img_size=args.img_size)
    except WeightsNotFound as error:
        _say(str(error))
        return 1
    except (RuntimeError, TypeError) as error:  # timm: unknown name, or no img_size argument
        _say(f"cannot create --model {args.model}: {error}")
        return 2
    if not args.pretrained:
        _say(f"{args.model} is randomly initialised from --seed {getattr(args, 'seed', 0)} (no --pretrained): "
             "the features suit pipeline tests, not probing results")
    else:
        _say(f"{args.model}: pretrained weights from {weights}")
    digest = backbone_digest(model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.eval().to(device)
    try:
        tap = LayerTap(model, parse_layers(args.layers))
    except (ValueError, TypeError) as error:
        _say(f"--layers {args.layers}: {error}")
        return 2

    config = timm.data.resolve_model_data_config(model)
    patch_embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    img_size = args.img_size or (patch_embed_size[0] if patch_embed_size else config["input_size"][-1])
    config["input_size"] = (3, img_size, img_size)  # timm's config keeps the pretrained size
    if args.data == "digits":
        data_name = "digits"
        splits, classes = digits_splits(img_size, config["mean"], config["std"])
    else:
        root = Path(args.data).expanduser()
        if not root.is_dir():
            _say(f"--data must be 'digits' or an ImageFolder directory; {root} is not a directory")
            return 2
        data_name = str(root.resolve())
        try:
            splits, classes = image_folder_splits(root, timm.data.create_transform(**config, is_training=False))
        except (ValueError, FileNotFoundError) as error:
            _say(str(error))
            return 2

    meta = {"model": args.model, "pretrained": args.pretrained, "weights": weights,
            "layers": tap.layer_names, "tokens": args.tokens, "num_prefix_tokens": tap.num_prefix_tokens,
            "img_size": img_size, "data": data_name, "classes": classes, "split_seed": SPLIT_SEED,
            "mean": list(config["mean"]), "std": list(config["std"]),
            "init_seed": None if args.pretrained else getattr(args, "seed", 0), "backbone_digest": digest}
    done = set(complete_splits(out)) if args.resume else set()
    with tap:
        return _write_splits(tap, splits, meta, done, args, out, device)


def _write_splits(tap, splits, meta, done, args, out, device) -> int:
    expected = dict(meta, dtype=args.dtype)
    for split in sorted(done & set(splits)):  # check them all before writing anything
        previous = load_metadata(out, split)
        differs = [key for key in _RESUME_KEYS if previous.get(key) != expected[key]]
        if differs:
            details = "; ".join(f"{key}: {previous.get(key)!r} there, {expected[key]!r} now" for key in differs)
            _say(f"--resume: split {split} in {out} was written with another backbone or settings "
                 f"({details}); use --overwrite or another --out")
            return 2
    for split, dataset in splits.items():
        if split in done:
            _say(f"{split}: already complete, skipped")
            continue
        if len(dataset) == 0:
            _say(f"{split}: no images, skipped")
            continue
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.num_workers)
        writer = FeatureWriter(out, split, DTYPES[args.dtype])
        try:
            extract_features(tap, loader, tokens=args.tokens, dtype=DTYPES[args.dtype], device=device,
                             allocate=writer.allocate, progress=True, desc=split)
            record = writer.finish(meta)
        except BaseException:
            writer.abort()
            raise
        print(f"{split}: {record['num_samples']} x {record['num_tokens']} x {record['dim']} "
              f"{record['dtype']} -> {writer.paths['features']}")
    return 0
