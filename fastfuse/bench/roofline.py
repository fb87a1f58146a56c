"""This machine's limits, measured in the same run: sgemm rate and streaming bandwidth."""
from __future__ import annotations

import dataclasses

import torch

from .timing import interleaved_median_ms


@dataclasses.dataclass(frozen=True)
class Machine:
    sgemm_gflops: float
    bandwidth_gbs: float

    def floor_ms(self, flops: float, bytes_moved: float) -> float:
        """The roofline: the larger of the compute time and the memory time."""
        return max(flops / (self.sgemm_gflops * 1e9), bytes_moved / (self.bandwidth_gbs * 1e9)) * 1e3

    def best(self, other: "Machine") -> "Machine":
        """The higher of two measurements of each rate (a busy moment only ever lowers them)."""
        return Machine(max(self.sgemm_gflops, other.sgemm_gflops),
                       max(self.bandwidth_gbs, other.bandwidth_gbs))


def measure_machine(device: str = "cpu", quick: bool = False) -> Machine:
    size = 2048 if device == "cpu" else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    # Streaming: read one large buffer, write another (beyond every cache).
    elements = (64 if quick else 128) * 2**20 // 4 * (4 if device != "cpu" else 1)
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    times = interleaved_median_ms({"mm": lambda: torch.mm(a, b), "copy": lambda: dst.copy_(src)},
                                  device=device, warmup=2, repeats=5 if quick else 9)
    gflops = 2 * size**3 / (times["mm"] * 1e-3) / 1e9
    bandwidth = 2 * src.numel() * 4 / (times["copy"] * 1e-3) / 1e9
    return Machine(sgemm_gflops=gflops, bandwidth_gbs=bandwidth)
