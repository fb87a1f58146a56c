"""The study file (TOML): what to run, validated before anything runs, and its cells.

    [study]       name, seed (the random init of backbones without pretrained weights)
    [[backbones]] name (timm), pretrained (false | true | "path/to/checkpoint"), img_size, label
    [[datasets]]  name + one of: builtin ("digits", "synthetic-gratings"), path (ImageFolder),
                  features (an existing feature cache, with backbone = "<label>")
    [features]    layers, tokens, dtype, batch_size, num_workers
    [probes]      families, num_heads, head_dim, qkv_bias, epochs, batch_size, warmup_epochs,
                  data_seed, backend
    [grid]        lr, wd, seeds, wd_search, wd_search_rounds, wd_search_min_step

A cell is (backbone, dataset). Every unit of work has a configuration hash: the features of a
cell hash what decides them; a family's sweep hashes the features' hash and the probe settings.
See docs/studies.md for a full example.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Optional

from . import families as family_registry

BUILTIN_DATASETS = ("digits", "synthetic-gratings")
TOKEN_SPECS = ("cls+ap", "cls", "ap", "all")
DTYPES = ("float16", "bfloat16", "float32")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

_SECTIONS = {
    "study": {"name", "seed"},
    "backbones": {"name", "pretrained", "img_size", "label"},
    "datasets": {"name", "builtin", "path", "features", "backbone"},
    "features": {"layers", "tokens", "dtype", "batch_size", "num_workers"},
    "probes": {"families", "num_heads", "head_dim", "qkv_bias", "epochs", "batch_size", "warmup_epochs",
               "data_seed", "backend"},
    "grid": {"lr", "wd", "seeds", "wd_search", "wd_search_rounds", "wd_search_min_step"},
}


class StudyFileError(ValueError):
    """The study file is malformed; the message names the file, the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    label: str                      # short name used in folders and the report
    name: str                       # timm model name
    pretrained: Any = False         # False, True (timm's hub / cache) or a checkpoint path
    img_size: Optional[int] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Dataset:
    label: str
    builtin: Optional[str] = None   # "digits" | "synthetic-gratings"
    path: Optional[str] = None      # ImageFolder tree
    features: Optional[str] = None  # an existing feature cache (train/val/test)
    backbone: Optional[str] = None  # the backbone label a feature cache belongs to

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Cell:
    backbone: Backbone
    dataset: Dataset

    @property
    def id(self) -> str:
        return f"{self.backbone.label}__{self.dataset.label}"


@dataclasses.dataclass(frozen=True)
class StudySpec:
    name: str
    seed: int
    backbones: tuple
    datasets: tuple
    features: dict
    probes: dict
    grid: dict
    source: str = ""                 # the TOML text, copied into the study folder

    @property
    def families(self) -> tuple:
        return tuple(self.probes["families"])

    @property
    def fused_families(self) -> tuple:
        return tuple(name for name in self.families if name not in family_registry.LINEAR_FAMILIES)

    def cells(self) -> list[Cell]:
        """Backbones x datasets in file order; a feature-cache dataset pairs only with its backbone."""
        return [Cell(backbone, dataset) for dataset in self.datasets for backbone in self.backbones
                if dataset.features is None or dataset.backbone == backbone.label]

    def cell(self, cell_id: str) -> Cell:
        for cell in self.cells():
            if cell.id == cell_id:
                return cell
        raise KeyError(f"no cell {cell_id!r} in study {self.name!r}; cells: {[c.id for c in self.cells()]}")

    def features_hash(self, cell: Cell) -> str:
        return config_hash({"backbone": cell.backbone.as_dict(), "dataset": cell.dataset.as_dict(),
                            "features": self.features, "seed": self.seed})

    def sweep_hash(self, cell: Cell, family: str) -> str:
        return config_hash({"features": self.features_hash(cell), "family": family,
                            "baselines": self.trains_baselines(family), "probes": _without(self.probes, "families"),
                            "grid": self.grid})

    def trains_baselines(self, family: str) -> bool:
        """The linear probes train in the first fused family's sweep, when the study asks for them."""
        wanted = any(name in family_registry.LINEAR_FAMILIES for name in self.families)
        return wanted and family == self.fused_families[0]


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys), first 16 hex digits."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _without(mapping: dict, key: str) -> dict:
    return {name: value for name, value in mapping.items() if name != key}


def load_study(path) -> StudySpec:
    """Read and validate a study file; raises StudyFileError naming the field on bad input."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise StudyFileError(f"cannot read study file {path}: {error.strerror or error}") from None
    return parse_study(text, where=str(path), base=path.parent)


def parse_study(text: str, *, where: str = "study file", base=None) -> StudySpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise StudyFileError(f"{where} is not valid TOML: {error}") from None
    check = _Checker(where)
    root = data.pop("root", None)  # written by `study run` into its copy: where relative paths resolve
    if root is not None:
        base = Path(check.string("root", root))
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        check.fail("", f"unknown section(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
    for section in ("study", "features", "probes", "grid"):
        value = data.get(section, {})
        if not isinstance(value, dict):
            check.fail(section, "must be a table ([section])")
        check.keys(section, value)
    study = data.get("study", {})
    name = check.string("study.name", study.get("name", "study"))
    seed = check.integer("study.seed", study.get("seed", 0), minimum=0)
    base = Path(base) if base is not None else Path.cwd()
    backbones = _backbones(check, data.get("backbones"), base)
    datasets = _datasets(check, data.get("datasets"), base, {backbone.label for backbone in backbones})
    spec = StudySpec(name=name, seed=seed, backbones=tuple(backbones), datasets=tuple(datasets),
                     features=_features(check, data.get("features", {})),
                     probes=_probes(check, data.get("probes", {})), grid=_grid(check, data.get("grid", {})),
                     source=text)
    if not spec.cells():
        check.fail("datasets", "the study has no cells (a feature-cache dataset pairs only with its backbone)")
    return spec


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, message: str):
        raise StudyFileError(f"{self.where}: {field + ': ' if field else ''}{message}")

    def keys(self, section: str, table: dict) -> None:
        unknown = set(table) - _SECTIONS[section.split("[")[0]]
        if unknown:
            self.fail(section, f"unknown key(s) {sorted(unknown)}; expected some of {sorted(_SECTIONS[section.split('[')[0]])}")

    def string(self, field: str, value) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"must be a non-empty string, got {value!r}")
        return value

    def label(self, field: str, value) -> str:
        value = self.string(field, value)
        if not _LABEL.match(value) or "__" in value:
            self.fail(field, f"must be a plain name (letters, digits, '_', '.', '+', '-'; no '__', no "
                             f"path separators), got {value!r}")
        return value

    def integer(self, field: str, value, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(field, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, field: str, value, minimum: float = 0.0) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
            self.fail(field, f"must be a number >= {minimum}, got {value!r}")
        return float(value)

    def boolean(self, field: str, value) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, got {value!r}")
        return value

    def choice(self, field: str, value, choices) -> str:
        if value not in choices:
            self.fail(field, f"must be one of {list(choices)}, got {value!r}")
        return value


def _resolve(base: Path, text: str) -> str:
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _unique(check: _Checker, field: str, labels: list) -> None:
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        check.fail(field, f"labels must be unique; repeated: {repeated} (set 'label' to tell them apart)")


def _tables(check: _Checker, section: str, entries, needs: str):
    """(field name, table) of each [[section]] entry; at least one, each a table of known keys."""
    if not isinstance(entries, list) or not entries:
        check.fail(section, needs)
    for index, entry in enumerate(entries):
        field = f"{section}[{index}]"
        if not isinstance(entry, dict):
            check.fail(field, "must be a table")
        check.keys(field, entry)
        yield field, entry


def _backbones(check: _Checker, entries, base: Path) -> list[Backbone]:
    backbones = []
    for field, entry in _tables(check, "backbones", entries,
                                "needs at least one [[backbones]] entry with a timm 'name'"):
        name = check.string(f"{field}.name", entry.get("name"))
        pretrained = entry.get("pretrained", False)
        if isinstance(pretrained, str):
            pretrained = _resolve(base, check.string(f"{field}.pretrained", pretrained))
        elif not isinstance(pretrained, bool):
            check.fail(f"{field}.pretrained", f"must be true, false or a checkpoint path, got {pretrained!r}")
        img_size = entry.get("img_size")
        if img_size is not None:
            img_size = check.integer(f"{field}.img_size", img_size)
        label = check.label(f"{field}.label", entry.get("label", name))
        backbones.append(Backbone(label, name, pretrained, img_size))
    _unique(check, "backbones", [backbone.label for backbone in backbones])
    return backbones


def _datasets(check: _Checker, entries, base: Path, backbone_labels: set) -> list[Dataset]:
    datasets = []
    for field, entry in _tables(check, "datasets", entries, "needs at least one [[datasets]] entry"):
        name = entry.get("name")
        sources = [key for key in ("builtin", "path", "features") if key in entry]
        if not sources and name in BUILTIN_DATASETS:
            entry, sources = dict(entry, builtin=name), ["builtin"]
        if len(sources) != 1:
            check.fail(field, f"needs exactly one of builtin ({list(BUILTIN_DATASETS)}), path (an ImageFolder "
                              f"tree) or features (a feature cache); got {sources or 'none'}")
        label = check.label(f"{field}.name", name if name is not None else entry.get("builtin"))
        builtin = path = features = backbone = None
        if "builtin" in entry:
            builtin = check.choice(f"{field}.builtin", entry["builtin"], BUILTIN_DATASETS)
        if "path" in entry:
            path = _resolve(base, check.string(f"{field}.path", entry["path"]))
        if "features" in entry:
            features = _resolve(base, check.string(f"{field}.features", entry["features"]))
            backbone = check.choice(f"{field}.backbone", entry.get("backbone"), sorted(backbone_labels))
        elif "backbone" in entry:
            check.fail(f"{field}.backbone", "only a feature-cache dataset (features = ...) names its backbone")
        datasets.append(Dataset(label, builtin, path, features, backbone))
    _unique(check, "datasets", [dataset.label for dataset in datasets])
    return datasets


def _features(check: _Checker, table: dict) -> dict:
    layers = table.get("layers", "paper")
    if isinstance(layers, list):
        if not layers or not all(isinstance(item, (int, str)) and not isinstance(item, bool) for item in layers):
            check.fail("features.layers", f"must be 'paper', 'blocks' or a list of block indices / module "
                                          f"names, got {layers!r}")
    else:
        check.string("features.layers", layers)
    return {"layers": layers,
            "tokens": check.choice("features.tokens", table.get("tokens", "cls+ap"), TOKEN_SPECS),
            "dtype": check.choice("features.dtype", table.get("dtype", "float32"), DTYPES),
            "batch_size": check.integer("features.batch_size", table.get("batch_size", 64)),
            "num_workers": check.integer("features.num_workers", table.get("num_workers", 0), minimum=0)}


def _probes(check: _Checker, table: dict) -> dict:
    try:
        chosen = family_registry.validate(list(table.get("families", family_registry.DEFAULT_FAMILIES)))
    except ValueError as error:
        check.fail("", str(error))
    head_dim = table.get("head_dim")
    backend = table.get("backend")
    if backend is not None:
        check.string("probes.backend", backend)
    return {"families": list(chosen),
            "num_heads": check.integer("probes.num_heads", table.get("num_heads", 12)),
            "head_dim": None if head_dim is None else check.integer("probes.head_dim", head_dim),
            "qkv_bias": check.boolean("probes.qkv_bias", table.get("qkv_bias", False)),
            "epochs": check.integer("probes.epochs", table.get("epochs", 10)),
            "batch_size": check.integer("probes.batch_size", table.get("batch_size", 256), minimum=2),
            "warmup_epochs": check.number("probes.warmup_epochs", table.get("warmup_epochs", 1.0)),
            "data_seed": check.integer("probes.data_seed", table.get("data_seed", 0), minimum=0),
            "backend": backend}


def _grid(check: _Checker, table: dict) -> dict:
    from ..sweep import SweepGrid

    try:
        grid = SweepGrid(table.get("lr", [1e-4, 1e-3]), table.get("wd", [1e-6, 1e-4, 1e-2]), table.get("seeds", [0]))
    except ValueError as error:
        check.fail("grid", str(error))
    wd_search = check.boolean("grid.wd_search", table.get("wd_search", False))
    if wd_search and any(wd <= 0 for wd in grid.wd):
        check.fail("grid.wd", f"the weight-decay search works on a log scale: values must be > 0, got {list(grid.wd)}")
    return {"lr": list(grid.lr), "wd": list(grid.wd), "seeds": list(grid.seed), "wd_search": wd_search,
            "wd_search_rounds": check.integer("grid.wd_search_rounds", table.get("wd_search_rounds", 4)),
            "wd_search_min_step": check.number("grid.wd_search_min_step", table.get("wd_search_min_step", 0.1))}
