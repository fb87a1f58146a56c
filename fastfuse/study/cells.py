"""One cell of a study: its features (extracted once), then one lockstep sweep per fused family.

Each unit is redone from scratch unless its record says it is complete with the current
configuration hash; its record is written last, atomically, so a process killed at any moment
leaves the unit either complete or pending. A failure is written to the cell's failed.json with
its traceback; the caller goes on with the next cell.
"""
from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from ..storage import FolderLock, FolderLockedError, remove_temporaries, write_json
from . import families as family_registry
from . import units
from .spec import Cell, StudySpec

SPLITS = ("train", "val", "test")


def _say(message: str) -> None:
    print(f"fastfuse study: {message}", file=sys.stderr, flush=True)


def cell_units(spec: StudySpec, cell: Cell) -> list[tuple[str, str]]:
    """[(unit, configuration hash)] of a cell, in the order they run."""
    return [("features", spec.features_hash(cell))] + [
        (f"sweeps/{family}", spec.sweep_hash(cell, family)) for family in spec.fused_families]


def features_directory(study_dir, cell: Cell) -> Path:
    """Where the cell's sweeps read features: the study's own cache, or the dataset's existing one."""
    if cell.dataset.features is not None:
        return Path(cell.dataset.features)
    return units.unit_dir(study_dir, cell.id, "features")


def run_cell(spec: StudySpec, cell: Cell, study_dir, *, device: Optional[str] = None,
             progress: bool = True) -> str:
    """Runs the cell's pending units; returns 'done', 'failed' or 'busy' (another run holds it)."""
    folder = units.cell_dir(study_dir, cell.id)
    try:
        lock = FolderLock(folder, purpose=f"study cell {cell.id}").acquire()
    except FolderLockedError as error:
        _say(f"{cell.id}: skipped, {error}")
        return "busy"
    try:
        remove_temporaries(folder)
        remove_temporaries(folder / "sweeps")
        unit = None
        try:
            for unit, config_hash in cell_units(spec, cell):
                if units.unit_state(study_dir, cell.id, unit, config_hash) == "done":
                    continue
                units.remove_record(study_dir, cell.id, unit)
                start = time.perf_counter()
                facts = (_extract(spec, cell, study_dir, device, progress) if unit == "features"
                         else _sweep(spec, cell, unit.split("/", 1)[1], study_dir, device, progress))
                units.write_record(study_dir, cell.id, unit, config_hash,
                                   seconds=round(time.perf_counter() - start, 3), **facts)
                _say(f"{cell.id}: {unit} done ({time.perf_counter() - start:.1f} s)")
        except Exception as error:  # a failing cell must not stop the others
            write_json(units.failure_path(study_dir, cell.id),
                       {"cell": cell.id, "unit": unit, "error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            _say(f"{cell.id}: FAILED in {unit}: {type(error).__name__}: {error} "
                 f"(traceback in {units.failure_path(study_dir, cell.id)})")
            return "failed"
        units.failure_path(study_dir, cell.id).unlink(missing_ok=True)
        return "done"
    finally:
        lock.release()


def _extract(spec: StudySpec, cell: Cell, study_dir, device, progress) -> dict:
    if cell.dataset.features is not None:
        from ..features import complete_splits

        missing = sorted(set(SPLITS) - set(complete_splits(cell.dataset.features)))
        if missing:
            raise FileNotFoundError(f"dataset {cell.dataset.label}: feature cache {cell.dataset.features} "
                                    f"lacks complete splits {missing}")
        return {"directory": cell.dataset.features, "weights": "existing feature cache"}
    out = units.unit_dir(study_dir, cell.id, "features")
    shutil.rmtree(out, ignore_errors=True)  # a redo starts clean: no split of an older run survives
    return extract_features_into(out, spec, cell, device=device, progress=progress)


def extract_features_into(out: Path, spec: StudySpec, cell: Cell, *, device=None, progress=True) -> dict:
    """The cell's train/val/test features into the cache ``out`` (fastfuse.features format)."""
    import timm.data

    from ..extract import DTYPES, create_backbone, parse_layers
    from ..features import FeatureWriter, extract_features
    from ..taps import LayerTap
    from .datasets import dataset_splits

    settings = spec.features
    backbone = cell.backbone
    torch.manual_seed(spec.seed)  # a random backbone is the same in every cell, run and retry
    model, weights = create_backbone(backbone.name, pretrained=backbone.pretrained, img_size=backbone.img_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.eval().to(device)
    layers = settings["layers"] if isinstance(settings["layers"], list) else parse_layers(settings["layers"])
    tap = LayerTap(model, layers)
    config = timm.data.resolve_model_data_config(model)
    patch_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    img_size = backbone.img_size or (patch_size[0] if patch_size else config["input_size"][-1])
    config["input_size"] = (3, img_size, img_size)
    splits, classes = dataset_splits(cell.dataset, img_size, config)
    meta = {"model": backbone.name, "pretrained": backbone.pretrained, "weights": weights,
            "layers": tap.layer_names, "tokens": settings["tokens"], "num_prefix_tokens": tap.num_prefix_tokens,
            "img_size": img_size, "data": cell.dataset.label, "classes": classes,
            "num_classes": len(classes), "mean": list(config["mean"]), "std": list(config["std"])}
    dtype = DTYPES[settings["dtype"]]
    with tap, torch.inference_mode():
        for split in SPLITS:
            loader = torch.utils.data.DataLoader(splits[split], batch_size=settings["batch_size"], shuffle=False,
                                                 num_workers=settings["num_workers"])
            writer = FeatureWriter(out, split, dtype)
            try:
                extract_features(tap, loader, tokens=settings["tokens"], dtype=dtype, device=device,
                                 allocate=writer.allocate, progress=progress, desc=f"{cell.id} {split}")
                writer.finish(meta)
            except BaseException:
                writer.abort()
                raise
    return {"directory": str(out), "weights": str(weights), "img_size": img_size,
            "num_samples": {split: len(splits[split]) for split in SPLITS}}


def _sweep(spec: StudySpec, cell: Cell, family: str, study_dir, device, progress) -> dict:
    from ..sweep import run_sweep

    out = units.unit_dir(study_dir, cell.id, f"sweeps/{family}")
    shutil.rmtree(out, ignore_errors=True)
    probes, grid = spec.probes, spec.grid
    results = run_sweep(
        str(features_directory(study_dir, cell)), {"lr": grid["lr"], "wd": grid["wd"], "seed": grid["seeds"]},
        num_heads=probes["num_heads"], head_dim=probes["head_dim"], qkv_bias=probes["qkv_bias"],
        epochs=probes["epochs"], batch_size=probes["batch_size"], warmup_epochs=probes["warmup_epochs"],
        data_seed=probes["data_seed"], backend=probes["backend"], device=device,
        wd_search=grid["wd_search"], wd_search_rounds=grid["wd_search_rounds"],
        wd_search_min_step=grid["wd_search_min_step"], baselines=spec.trains_baselines(family),
        out=str(out), progress=progress, plots=True, **family_registry.sweep_kwargs(family))
    return {"directory": str(out), "best": {key: results["best"][key] for key in ("lr", "wd", "val_acc", "test_acc",
                                                                                 "test_acc_std")}}
