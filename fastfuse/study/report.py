"""``study report``: the paper-style table, the gain figure and each cell's attention heatmap.

    DIR/report/table.md         rows: dataset; columns: backbone x family; balanced test accuracy
                                (%) mean ± std over seeds at the best validation configuration
    DIR/report/table.csv        the same, one row per (dataset, backbone, family), with lr, wd, val
    DIR/report/gain.png         AttentiveFusion minus linear last-layer, per dataset and backbone
    DIR/report/heatmaps/CELL__FAMILY.png   the sweep's attention-over-layers heatmap
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

from ..storage import FolderLock, atomic_path, read_json, save_figure, write_text
from . import families as family_registry
from . import units
from .cells import cell_units
from .spec import StudySpec

CSV_FIELDS = ("dataset", "backbone", "family", "test_acc", "test_acc_std", "val_acc", "lr", "wd", "seeds")


def _sweep_results(spec: StudySpec, study_dir, cell, family: str) -> Optional[dict]:
    """The sweep results that hold ``family`` for ``cell`` when that sweep is complete."""
    holder = spec.fused_families[0] if family in family_registry.LINEAR_FAMILIES else family
    unit = f"sweeps/{holder}"
    if units.unit_state(study_dir, cell.id, unit, spec.sweep_hash(cell, holder)) != "done":
        return None
    return read_json(units.unit_dir(study_dir, cell.id, unit) / "results.json", what="sweep results")


def collect(spec: StudySpec, study_dir) -> list[dict]:
    """One entry per (dataset, backbone, family) whose sweep is complete."""
    entries = []
    for cell in spec.cells():
        for family in spec.families:
            results = _sweep_results(spec, study_dir, cell, family)
            if results is None:
                continue
            if family in family_registry.LINEAR_FAMILIES:
                best = results["baselines"][family_registry.LINEAR_FAMILIES[family]]["best"]
            else:
                best = results["best"]
            entries.append({"dataset": cell.dataset.label, "backbone": cell.backbone.label, "family": family,
                            "test_acc": best["test_acc"], "test_acc_std": best["test_acc_std"],
                            "val_acc": best["val_acc"], "lr": best["lr"], "wd": best["wd"],
                            "seeds": len(best["seeds"])})
    return entries


def markdown_table(spec: StudySpec, entries: list[dict]) -> str:
    found = {(entry["dataset"], entry["backbone"], entry["family"]): entry for entry in entries}
    columns = [(backbone.label, family) for backbone in spec.backbones for family in spec.families]
    header = ["dataset"] + [f"{backbone}: {family_registry.title(family)}" for backbone, family in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in spec.datasets:
        cells = [dataset.label]
        for backbone, family in columns:
            entry = found.get((dataset.label, backbone, family))
            cells.append("—" if entry is None else
                         f"{100 * entry['test_acc']:.1f} ± {100 * entry['test_acc_std']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(entries: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(entries)
    return buffer.getvalue()


def gains(entries: list[dict], fused: str = family_registry.ATTENTIVE_FUSION,
          baseline: str = "linear-last-cls") -> dict:
    """{(dataset, backbone): test accuracy of ``fused`` minus ``baseline``} where both are done."""
    found = {(entry["dataset"], entry["backbone"], entry["family"]): entry["test_acc"] for entry in entries}
    return {(dataset, backbone): found[(dataset, backbone, fused)] - accuracy
            for (dataset, backbone, family), accuracy in found.items()
            if family == baseline and (dataset, backbone, fused) in found}


def write_gain_figure(spec: StudySpec, gain: dict, path) -> Optional[Path]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    datasets = [dataset.label for dataset in spec.datasets if any(key[0] == dataset.label for key in gain)]
    backbones = [backbone.label for backbone in spec.backbones if any(key[1] == backbone.label for key in gain)]
    width = 0.8 / max(len(backbones), 1)
    figure = Figure(figsize=(1.6 + 1.3 * len(datasets) * max(1, len(backbones) / 2), 3.4), layout="constrained")
    axis = figure.subplots()
    for offset, backbone in enumerate(backbones):
        positions = [index + (offset - (len(backbones) - 1) / 2) * width for index in range(len(datasets))]
        values = [100 * gain.get((dataset, backbone), float("nan")) for dataset in datasets]
        axis.bar(positions, values, width=width * 0.95, label=backbone)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(datasets)), datasets)
    axis.set_ylabel("gain (balanced test accuracy, points)")
    axis.set_title("AttentiveFusion (all layers) minus linear probe (last-layer CLS)", fontsize=9)
    axis.legend(fontsize=8)
    path = Path(path)
    save_figure(figure, path, dpi=110)
    return path


def write_report(spec: StudySpec, study_dir) -> dict:
    """Writes the report files into DIR/report; returns {"markdown", "entries", "files", "missing"}."""
    from ..sweep.results import write_heatmap

    out = Path(study_dir) / "report"
    entries = collect(spec, study_dir)
    markdown = markdown_table(spec, entries)
    missing = [cell.id for cell in spec.cells()
               if not all(units.unit_state(study_dir, cell.id, unit, config_hash) == "done"
                          for unit, config_hash in cell_units(spec, cell))]
    files = {}
    with FolderLock(out, purpose="study report"):
        text = (f"# Study {spec.name}\n\nBalanced test accuracy (%), mean ± std over seeds, at the best "
                f"validation configuration of each probe family.\n\n{markdown}\n")
        if missing:
            text += f"\nNot complete yet: {', '.join(missing)}\n"
        write_text(out / "table.md", text)
        write_text(out / "table.csv", csv_table(entries))
        files.update(markdown=str(out / "table.md"), csv=str(out / "table.csv"))
        gain = gains(entries)
        if gain:
            figure = write_gain_figure(spec, gain, out / "gain.png")
            if figure is not None:
                files["gain"] = str(figure)
        for cell in spec.cells() if _have_matplotlib() else ():
            for family in spec.fused_families:
                results = _sweep_results(spec, study_dir, cell, family)
                if results is None or not results.get("best", {}).get("mean_attention"):
                    continue
                target = out / "heatmaps" / f"{cell.id}__{family}.png"
                with atomic_path(target, suffix=".png") as temp:
                    write_heatmap(results, temp)
                files[f"heatmap {cell.id} {family}"] = str(target)
    return {"markdown": markdown, "entries": entries, "files": files, "missing": missing}


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
