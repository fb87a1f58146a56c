"""Scaling plots (PNG): time against N, B or D, one line per implementation, log axes."""
from __future__ import annotations

import os

from .. import storage
from .cases import AXIS_LABEL


def plot_scaling(records: list[dict], cases: dict[str, dict], sweeps: dict[str, list[str]],
                 directory: str) -> list[str]:
    """One PNG per (axis, mode) under ``directory``; returns their paths.

    ``cases`` maps a case name to its fields (batch, num_tokens, dim, ...), ``sweeps`` an axis
    ("num_tokens", "batch", "dim") to the names of its cases, as the JSON file holds them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    os.makedirs(directory, exist_ok=True)
    paths = []
    modes = sorted({r["mode"] for r in records})
    impls = list(dict.fromkeys(r["impl"] for r in records))
    for axis, names in sweeps.items():
        for mode in modes:
            rows = [r for r in records if r["case"] in names and r["mode"] == mode]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(8.0, 4.4))
            for impl in impls:
                points = sorted((cases[r["case"]][axis], r["ms"]) for r in rows
                                if r["impl"] == impl and r["ms"] is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", label=impl)
            floor = sorted({(cases[r["case"]][axis], r["roofline_ms"]) for r in rows})
            ax.plot(*zip(*floor), linestyle="--", color="black", label="roofline")
            base = cases[names[0]]
            fixed = ", ".join(f"{AXIS_LABEL[key]}={base[key]}" for key in AXIS_LABEL if key != axis)
            ax.set(xscale="log", yscale="log", xlabel=AXIS_LABEL[axis], ylabel="ms",
                   title=f"{mode} step vs {AXIS_LABEL[axis]} ({fixed}, H=D/64)")
            ax.set_xticks(sorted({x for x, _ in floor}))  # label the measured points, plainly
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
            fig.tight_layout()
            path = os.path.join(directory, f"scaling_{AXIS_LABEL[axis]}_{mode}.png")
            storage.save_figure(fig, path, dpi=120)
            plt.close(fig)
            paths.append(path)
    return paths
