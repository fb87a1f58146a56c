"""Interleaved timing: every implementation runs once per round, rounds repeat, medians win.

Interleaving spreads drift (frequency, the other tenant of a shared core) evenly over the
implementations being compared, so their ratios are fair within one run.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved_median_ms(calls: dict[str, Callable[[], object]], *, device: str = "cpu",
                          warmup: int = 1, repeats: int = 5, budget_s: float | None = None
                          ) -> dict[str, float]:
    """Median milliseconds per call for each entry, timed round-robin after warm-up."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    started = time.perf_counter()
    for round_index in range(repeats):
        for name, call in calls.items():
            _sync(device)
            begin = time.perf_counter()
            call()
            _sync(device)
            samples[name].append((time.perf_counter() - begin) * 1e3)
        if budget_s is not None and round_index >= 2 and time.perf_counter() - started > budget_s:
            break
    return {name: statistics.median(values) for name, values in samples.items()}
