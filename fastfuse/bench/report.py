"""What a run leaves behind: the printed table and the JSON file (machine, cases, records)."""
from __future__ import annotations

import dataclasses
import os
import platform
import sys

import torch

from .. import storage


def machine_info(device: str, machine, quick: bool) -> dict:
    """Where and how the numbers were taken, including the load (a shared machine skews them)."""
    from .. import __version__

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = _cpu_name()
    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    return {"device": device, "device_name": name, "sgemm_gflops": machine.sgemm_gflops,
            "bandwidth_gbs": machine.bandwidth_gbs, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "timm": timm_version,
            "fastfuse": __version__, "python": platform.python_version(), "quick": quick,
            "command": " ".join(sys.argv)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def case_shapes(cases) -> dict[str, dict]:
    return {case.name: dataclasses.asdict(case) for case in cases}


def write_json(path: str, machine: dict, cases, records: list[dict], wall_s: float,
               sweeps: dict[str, list[str]] | None = None) -> None:
    """{"machine": {...}, "cases": {name: shape}, "records": [{impl, case, mode, ms, ...}]},
    plus "sweeps" {axis: [case names]} for a scaling run."""
    machine = {**machine, "loadavg_end": load_average(), "wall_s": wall_s}
    payload = {"machine": machine, "cases": case_shapes(cases), "records": records}
    if sweeps is not None:
        payload["sweeps"] = sweeps
    storage.write_json(path, storage.without_nonfinite(payload), indent=2)
    print(f"wrote {path}")


def print_table(records: list[dict]) -> None:
    header = (f"{'case':<22} {'mode':<5} {'impl':<24} {'ms':>9} {'x paper':>8} "
              f"{'roofline ms':>11} {'/roofline':>9} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for r in records:
        if r["ms"] is None:
            print(f"{r['case']:<22} {r['mode']:<5} {r['impl']:<24} {'unavailable':>9}")
            continue
        speed = f"{r['speedup_vs_paper']:.1f}" if r["speedup_vs_paper"] else "-"
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        print(f"{r['case']:<22} {r['mode']:<5} {r['impl']:<24} {r['ms']:>9.1f} {speed:>8} "
              f"{r['roofline_ms']:>11.2f} {r['ms'] / r['roofline_ms']:>9.1f} {peak:>9}")
