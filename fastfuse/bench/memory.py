"""Peak memory of one step, measured in a fresh process.

CUDA: torch.cuda.max_memory_allocated around the step. CPU: the kernel's resident-set
high-water mark (VmHWM), reset through /proc/self/clear_refs just before the step, minus the
resident set before it: what the step itself added on top of its inputs and parameters.
The child fixes glibc's mmap threshold so that large buffers freed by the warm-up step go back
to the kernel instead of staying resident and hiding the measured step's own peak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def _read_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_step_mb(step, device: str) -> float:
    """Peak extra memory (MiB) of ``step()`` in this process; call it in a fresh process."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _read_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    step()
    return max(_read_status_kb("VmHWM") - before, 0) / 1024


def peak_mb_in_subprocess(impl: str, case_fields: dict, mode: str, device: str) -> float | None:
    """Run one step of (impl, case, mode) in a child process and return its peak MiB."""
    code = ("import json,sys; from fastfuse.bench.runner import peak_memory_child; "
            "case = json.loads(sys.argv[1]); "
            f"print(json.dumps(peak_memory_child({impl!r}, case, {mode!r}, {device!r})))")
    # A fixed threshold also turns off glibc's dynamic raising of it after large frees.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run([sys.executable, "-c", code, json.dumps(case_fields)],
                            capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        sys.stderr.write(f"peak memory of {impl}/{case_fields['name']} failed:\n"
                         f"{result.stderr[-2000:]}\n")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])
