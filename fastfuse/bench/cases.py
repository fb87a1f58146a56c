"""Benchmark cases: shapes, their FLOP / byte counts (SPEC §1-§2), the table and the scaling grids."""
from __future__ import annotations

import dataclasses

from ..composed_head import composed_is_cheaper


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    num_tokens: int          # N gathered tokens the probe attends over
    dim: int
    heads: int
    classes: int = 100
    layers: int = 0          # > 0: live layer activations (L, T tokens each) gathered by the op
    layer_tokens: int = 0
    tokens_spec: str | None = None

    @property
    def head_dim(self) -> int:
        return 2 * (self.dim // self.heads)

    def folded_flops(self, mode: str, composed_head: bool = True) -> float:
        """FLOPs of the folded probe (SPEC §2); training counts forward + backward (~3x).

        Inference counts the cheaper of the head after the pooling (W_v, W_o, classifier) and
        the composed eval-mode map (C x H*D, fastfuse/composed_head.py), as AttentiveFusion
        does (``composed_head=False``: always the former).
        """
        head = 4 * self.dim * self.heads * self.head_dim + 2 * self.dim * self.classes   # W_v, W_o, W_c
        if (composed_head and mode != "train"
                and composed_is_cheaper(self.classes, self.heads, self.head_dim, self.dim)):
            head = 2 * self.classes * self.heads * self.dim
        per_sample = 4 * self.num_tokens * self.dim * self.heads + head      # scores + weighted sum
        passes = 3 if mode == "train" else 1
        gather = self.layers * self.layer_tokens * self.dim  # one add per activation (AP means)
        return (per_sample * passes + gather) * self.batch

    def paper_flops(self, mode: str) -> float:
        """FLOPs of the paper's unfused probe: the K and V projections of every token dominate."""
        per_sample = 4 * self.num_tokens * self.dim * self.heads * self.head_dim
        return per_sample * self.batch * (3 if mode == "train" else 1) + self.folded_flops(mode, composed_head=False)

    def input_bytes(self, itemsize: int = 4) -> float:
        """Bytes of the tokens the probe reads (the layer activations for a gathering case)."""
        if self.layers:
            return self.batch * self.layers * self.layer_tokens * self.dim * itemsize
        return self.batch * self.num_tokens * self.dim * itemsize

    def floor_bytes(self, mode: str) -> float:
        """Bytes the roofline charges: inputs read once for inference, twice for training (the
        backward reads the tokens again). A gathering case's training step reads its layers once
        and its (B, N, D) stack of gathered tokens three times (written, then read by the
        forward and the backward): frozen training gathers once (fastfuse/ops.py)."""
        if mode != "train":
            return self.input_bytes()
        if self.layers:
            return self.input_bytes() + 3 * self.batch * self.num_tokens * self.dim * 4
        return 2 * self.input_bytes()


def _paper_shape(name: str, batch: int, layers: int, dim: int, heads: int) -> Case:
    return Case(name, batch, 2 * layers, dim, heads)  # N = 2L CLS + AP tokens


# The full table. Batches keep one paper training step to seconds on a small CPU; the
# ViT-B rows use the core benchmark's shapes (B=1024 at N=24, B=256 at N=197).
FULL_CASES = (
    _paper_shape("vits-cls+ap-n24", 1024, 12, 384, 6),
    _paper_shape("vitb-cls+ap-n24", 1024, 12, 768, 12),
    _paper_shape("vitl-cls+ap-n48", 256, 24, 1024, 16),
    Case("vitb-all-n197", 256, 197, 768, 12),                 # all tokens of one layer
    Case("vitb-all-layers-n2364", 16, 12 * 197, 768, 12),     # all tokens of all 12 layers
    Case("vitb-gather-cls+ap", 128, 24, 768, 12, layers=12, layer_tokens=197, tokens_spec="cls+ap"),
    Case("vitb-video-n1568", 16, 1568, 768, 12),              # video-like: V-JEPA's 16x224 clips, 8x14x14 tubelets
)

# The GPU shapes of issue 15 (bench --gpu-shapes; scripts/gpu_check.sh): (a) CLS+AP of 12 ViT-B
# layers, (b) the same for 16 probes x 12 heads in lockstep, (c) all tokens of one layer.
GPU_CASES = (
    Case("gpu-a-gather-h12", 2048, 24, 768, 12, layers=12, layer_tokens=197, tokens_spec="cls+ap"),
    Case("gpu-b-gather-h192", 2048, 24, 768, 192, layers=12, layer_tokens=197, tokens_spec="cls+ap"),
    Case("gpu-c-all-n197", 256, 197, 768, 12),
)

# --quick: the same cases at these batches (about 1/4 to 1/8 of the full ones).
QUICK_BATCH = {"vits-cls+ap-n24": 256, "vitb-cls+ap-n24": 256, "vitl-cls+ap-n48": 64,
               "vitb-all-n197": 32, "vitb-all-layers-n2364": 4, "vitb-gather-cls+ap": 32,
               "vitb-video-n1568": 4}
QUICK_CASES = tuple(dataclasses.replace(case, batch=QUICK_BATCH[case.name]) for case in FULL_CASES)

# --quick measures peak memory only for this case (one fresh process per implementation).
QUICK_MEMORY_CASES = ("vitb-cls+ap-n24",)


def table_cases(quick: bool) -> tuple[Case, ...]:
    return QUICK_CASES if quick else FULL_CASES


# Scaling: vary one of N, B, D around a ViT-B base point (H = D / 64, as ViT-S/B/L have).
SCALING_BASE = {"batch": 256, "num_tokens": 24, "dim": 768}
SCALING_GRID = {"num_tokens": (24, 48, 96, 197, 394, 788), "batch": (32, 64, 128, 256, 512, 1024),
                "dim": (384, 768, 1024, 1280)}
QUICK_SCALING_BASE = {"batch": 32, "num_tokens": 24, "dim": 768}
QUICK_SCALING_GRID = {"num_tokens": (24, 96, 384), "batch": (8, 32, 128), "dim": (384, 768, 1024)}
AXIS_LABEL = {"num_tokens": "N", "batch": "B", "dim": "D"}


def scaling_cases(quick: bool) -> dict[str, tuple[Case, ...]]:
    """For each axis ("num_tokens", "batch", "dim"), the cases of its sweep."""
    base = QUICK_SCALING_BASE if quick else SCALING_BASE
    grid = QUICK_SCALING_GRID if quick else SCALING_GRID
    sweeps = {}
    for axis, values in grid.items():
        cases = []
        for value in values:
            shape = {**base, axis: value}
            batch, num_tokens, dim = shape["batch"], shape["num_tokens"], shape["dim"]
            name = f"scale-{AXIS_LABEL[axis]}{value}-b{batch}-n{num_tokens}-d{dim}"
            cases.append(Case(name, batch, num_tokens, dim, dim // 64))
        sweeps[axis] = tuple(cases)
    return sweeps
