"""A sweep's outputs: results.json, results.csv, the printed table, attention heatmaps, checkpoint.

    OUT/results.json       {"probes": [...], "baselines": {...}, "best": {...}, "configs": [...], ...}
    OUT/results.csv        one row per probe (AttentiveFusion and baselines), same fields
    OUT/attention.png      the best probe's mean test attention per head, layers x (CLS, AP)
    OUT/best_probe.pt      the best probe's state_dict at its best epoch, the paper's keys

Every file is written atomically (``fastfuse.storage``), results.json last: it is the index of
the others. JSON is strict: a non-finite number (the loss of a diverged probe) is written as null.
A configuration where any seed diverged is marked so and never chosen as the best; when every
configuration diverged, "best" is null and no checkpoint or heatmap is written.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import storage
from .grid import config_scores, eligible

CSV_FIELDS = ("model", "index", "lr", "wd", "seed", "round", "best_val_acc", "best_epoch", "test_acc",
              "diverged", "diverged_epoch", "seconds", "group_size", "val_acc", "test_acc_per_epoch",
              "train_loss")
MODEL_TITLES = {
    "attentive": "AttentiveFusion, all layers",
    "last_cls": "linear, last layer CLS",
    "concat": "linear, all layers CLS+AP",
}
CHECKPOINT = "best_probe.pt"
HEATMAP = "attention.png"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
# What one sweep writes into its --out (--overwrite removes exactly these).
OUTPUTS = (RESULTS_JSON, RESULTS_CSV, HEATMAP, CHECKPOINT)


def strict(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN/Infinity)."""
    return storage.without_nonfinite(value)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / len(values)
    return mean, math.sqrt(variance)


def config_table(rows: Sequence[dict]) -> list[dict]:
    """One entry per (lr, wd): mean / std over seeds of best val and test accuracy."""
    table = []
    for (lr, wd), _score in config_scores(rows).items():
        members = [row for row in rows if row["lr"] == lr and row["wd"] == wd]
        val_mean, val_std = _mean_std([row["best_val_acc"] for row in members])
        test_mean, test_std = _mean_std([row["test_acc"] for row in members])
        table.append({"lr": lr, "wd": wd, "seeds": [row["seed"] for row in members],
                      "val_acc": val_mean, "val_acc_std": val_std, "test_acc": test_mean,
                      "test_acc_std": test_std, "diverged": any(row.get("diverged") for row in members)})
    return table


def choose_best(rows: Sequence[dict]) -> Optional[dict]:
    """The configuration with the best mean val accuracy over seeds, reported on test; and, within
    it, the single best probe (highest val, ties to the earlier index), whose weights are saved.
    Configurations where a seed diverged are never chosen; None when all of them diverged."""
    rows = eligible(rows)
    if not rows:
        return None
    table = config_table(rows)
    top = max(table, key=lambda entry: entry["val_acc"])  # first of equals
    members = sorted((row for row in rows if row["lr"] == top["lr"] and row["wd"] == top["wd"]),
                     key=lambda row: row["index"])
    probe = max(members, key=lambda row: row["best_val_acc"])
    return dict(top, probe_index=probe["index"], seed=probe["seed"], best_epoch=probe["best_epoch"],
                probe_val_acc=probe["best_val_acc"], probe_test_acc=probe["test_acc"])


def assemble(rows: dict, *, probe_kwargs: dict, settings: dict, grid: dict, meta: dict,
             token_names: list, timing: dict, wd_search: Optional[dict] = None) -> dict:
    """The results dict (what results.json holds) from every model's rows."""
    from .train import ATTENTIVE, BASELINES

    attentive = sorted(rows[ATTENTIVE], key=lambda row: row["index"])
    best = choose_best(attentive)
    if best is not None:
        attention = next(row["mean_attention"] for row in attentive if row["index"] == best["probe_index"])
        best.update(mean_attention=attention, token_names=token_names, probe=probe_kwargs, checkpoint=CHECKPOINT)
    results = {
        "probes": [{key: value for key, value in row.items() if key != "mean_attention"} for row in attentive],
        "baselines": {},
        "best": best,
        "configs": config_table(attentive),
        "settings": settings,
        "grid": grid,
        "features": {key: meta[key] for key in ("model", "layers", "tokens", "num_prefix_tokens", "dim",
                                                "num_tokens", "dtype", "directory") if key in meta},
        "timing": timing,
    }
    for name, description in BASELINES.items():
        if name in rows:
            baseline_rows = sorted(rows[name], key=lambda row: row["index"])
            results["baselines"][name] = {"description": description, "probes": baseline_rows,
                                          "best": choose_best(baseline_rows), "configs": config_table(baseline_rows)}
    if wd_search is not None:
        results["wd_search"] = wd_search
    return results


def csv_text(results: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    groups = [("attentive", results["probes"])]
    groups += [(name, entry["probes"]) for name, entry in results["baselines"].items()]
    for model, rows in groups:
        for row in rows:
            record = dict(strict(row), model=model)
            for key in ("val_acc", "test_acc_per_epoch", "train_loss"):
                record[key] = json.dumps(record[key], allow_nan=False)
            writer.writerow(record)
    return buffer.getvalue()


def format_table(results: dict) -> str:
    """The summary: each model's best configuration (chosen on val), val and test accuracy."""
    def line(title, entry):
        if entry is None:
            return f"{title:<30} every configuration diverged"
        test = f"{entry['test_acc']:.4f}"
        if len(entry["seeds"]) > 1:
            test += f" ± {entry['test_acc_std']:.4f}"
        return f"{title:<30} {entry['lr']:>9.3g} {entry['wd']:>9.3g} {entry['val_acc']:>8.4f}  {test}"

    header = f"{'model':<30} {'lr':>9} {'wd':>9} {'val':>8}  test (balanced accuracy, mean over seeds)"
    lines = [header, "-" * len(header)]
    for name, entry in results["baselines"].items():
        lines.append(line(MODEL_TITLES.get(name, name), entry["best"]))
    lines.append(line(MODEL_TITLES["attentive"], results["best"]))
    diverged = [row["index"] for row in results["probes"] if row.get("diverged")]
    if diverged:
        lines.append(f"diverged (non-finite loss; never chosen): probes {', '.join(map(str, diverged))}")
    timing = results.get("timing", {})
    if timing:
        lines.append(f"{len(results['probes'])} probes, {timing.get('mode', '?')}, "
                     f"{timing.get('world_size', 1)} process(es): {timing.get('seconds', 0.0):.1f} s")
    return "\n".join(lines)


def write_heatmap(results: dict, path) -> Optional[Path]:
    """The best probe's mean test attention, heads x layers, for CLS and AP tokens (as the paper's
    Figure 4). Returns None when matplotlib is missing."""
    try:  # the object API renders with Agg and leaves the user's pyplot backend alone
        from matplotlib.figure import Figure
    except ImportError:
        return None
    best = results["best"]
    if best is None:
        return None
    attention = torch.tensor(best["mean_attention"])           # (H, N)
    heads, num_tokens = attention.shape
    tokens = results["features"].get("tokens", "cls+ap")
    if tokens == "cls+ap" and num_tokens % 2 == 0:              # paper order: cls_0, ap_0, cls_1, ...
        panels = {"CLS": attention[:, 0::2], "AP": attention[:, 1::2]}
        x_label = "layer"
    else:
        panels = {tokens: attention}
        x_label = "layer" if tokens in ("cls", "ap") else "token"
    width = 1.5 + sum(0.32 * panel.shape[1] + 0.6 for panel in panels.values())
    figure = Figure(figsize=(width, 1.4 + 0.28 * heads), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)
    vmax = float(attention.max())
    for axis, (name, panel) in zip(axes[0], panels.items()):
        image = axis.imshow(panel.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                            interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel(x_label, fontsize=8)
        axis.set_xticks(range(panel.shape[1]))
        axis.set_yticks(range(heads))
        axis.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("head", fontsize=8)
    figure.colorbar(image, ax=axes[0].tolist(), label="mean attention", shrink=0.9)
    figure.suptitle(f"AttentiveFusion attention over tokens (test mean)\n"
                    f"lr={best['lr']:.3g}  wd={best['wd']:.3g}  seed={best['seed']}", fontsize=9)
    path = Path(path)
    storage.save_figure(figure, path, dpi=110)
    return path


def write(results: dict, out_dir, *, checkpoint: Optional[dict] = None, plots: bool = True) -> dict:
    """Write the checkpoint, the heatmap, results.csv and (last) results.json, each atomically;
    return {kind: path}. A file this sweep does not produce (no best probe, no plots) is removed,
    so none of a previous run's stays beside the new results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = strict(results)
    json_text = json.dumps(payload, indent=1, allow_nan=False)  # fails before any file is touched
    paths = {}
    if checkpoint is not None:
        paths["checkpoint"] = out / CHECKPOINT
        storage.torch_save(checkpoint, paths["checkpoint"])
    heatmap = write_heatmap(results, out / HEATMAP) if plots else None
    if heatmap is not None:
        paths["heatmap"] = heatmap
    paths["csv"] = out / RESULTS_CSV
    storage.write_text(paths["csv"], csv_text(results))
    paths["json"] = out / RESULTS_JSON
    storage.write_text(paths["json"], json_text + "\n")
    for kind, name in (("checkpoint", CHECKPOINT), ("heatmap", HEATMAP)):
        if kind not in paths:  # only once the new results are in place
            (out / name).unlink(missing_ok=True)
    return {kind: paths[kind] for kind in ("json", "csv", "checkpoint", "heatmap") if kind in paths}


def read_results(out_dir) -> dict:
    """results.json of a finished sweep, checked to be a sweep's results (errors name the file)."""
    path = Path(out_dir) / RESULTS_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: no finished sweep in {out_dir}")
    results = storage.read_json(path, what="sweep results")
    if not isinstance(results, dict) or not {"probes", "best"} <= set(results):
        raise ValueError(f"sweep results {path} must be a JSON object with 'probes' and 'best'")
    return results


def load_best_probe(out_dir, *, paper: bool = False, backend: Optional[str] = None):
    """The best probe of a finished sweep as an AttentiveFusion (or the paper's probe), eval mode."""
    out = Path(out_dir)
    best = read_results(out)["best"]
    if best is None:
        raise ValueError(f"the sweep in {out} has no best probe: every configuration diverged")
    kwargs = dict(best["probe"])
    if paper:
        from ..paper import PaperAttentiveProbe
        probe = PaperAttentiveProbe(**kwargs)
    else:
        from ..module import AttentiveFusion
        probe = AttentiveFusion(**kwargs, backend=backend)
    probe.load_state_dict(torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True), strict=True)
    return probe.eval()
