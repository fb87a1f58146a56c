"""The CUDA kernels of csrc/cuda, executed on the CPU by tests/cuda_emulation, against the float64
oracle of tests/reference.py: so that every submission runs the kernels' code, not only compiles it.

The emulator runs each CUDA thread as a fiber with real barriers and warp shuffles, in a
random order between barriers, with NaN-filled shared memory, a canary after it and alignment
checks on 16-byte accesses (tests/cuda_emulation/emulator.h). It compiles the kernel headers with
the host compiler; the tile sizes are given here, covering every path (tiles of 8 to 32 tokens,
head tiles, dw in shared or global memory, dw-only backward, fewer backward blocks than samples,
vector and scalar loads), or taken from the host planner (csrc/common/launch_plan.h) for a
GPU's shared-memory limits, as fused_pool_cuda.cu does on a GPU.
"""
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from fastfuse.gather import num_gathered_tokens

from reference import moments_reference, pool_with_grads, rel_err, stack_tokens

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SPECS = {"cls": 0, "ap": 1, "cls+ap": 2, "all": 3}
# Normwise relative error allowed against the float64 oracle on the same (rounded) inputs
# (stricter than reference.TOLERANCE: half inputs are rounded before both sides see them): forward outputs are float32 / float64; layer gradients come back in the input dtype.
FORWARD_TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="session")
def runner(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++) to build the CUDA emulation")
    binary = tmp_path_factory.mktemp("cuda_emulation") / "run_kernels"
    include = Path(torch.__file__).resolve().parent / "include"
    result = subprocess.run(
        [compiler, "-std=c++20", "-O1", f"-I{ROOT / 'csrc'}", f"-I{EMULATION}", "-isystem", str(include),
         str(EMULATION / "run_kernels.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return binary


@dataclass
class Case:
    dtype: torch.dtype = torch.float32
    batch: int = 3
    dim: int = 24
    heads: int = 3
    lengths: tuple = (11,)
    tokens: str = "all"
    prefix: int = 1
    layout: str = "contiguous"   # contiguous | transposed | strided-d | offset
    tile_tokens: int = 8
    head_tile: int = 0          # 0: all heads
    need_grad: bool = True
    dw_shared: bool = True
    backward_blocks: int = 64   # the backward's ranges of samples (at most B)
    backward_head_tile: int = 0  # 0: all heads in each backward block (dw-only: a tile of them)
    grad_attention: bool = True
    seed: int = 0               # the data
    schedule_seed: int = 0      # the emulator's thread order between barriers
    normalize: str = "layernorm"
    magnitude: float = 1.0      # tokens scaled by this (LayerNorm statistics robust to it)
    plan_limits: tuple = ()     # (per-block opt-in, per-SM) bytes: tiles from the host planner
    layers: list = field(default_factory=list, repr=False)


def _make_layers(case: Case, generator):
    """One storage holding every layer, each a (B, T, D) strided view of it (as hooks give)."""
    dim, batch = case.dim, case.batch
    chunks, views, offset = [], [], 0
    for length in case.lengths:
        if case.layout == "transposed":      # (T, B, D + 3) storage, features 1..D
            block = torch.randn(length, batch, dim + 3, generator=generator, dtype=torch.float64)
            start, view_strides = 1, (dim + 3, batch * (dim + 3), 1)
        elif case.layout == "strided-d":     # feature stride 2: the scalar path
            block = torch.randn(batch, length, dim, 2, generator=generator, dtype=torch.float64)
            start, view_strides = 1, (length * dim * 2, dim * 2, 2)
        elif case.layout == "offset":        # contiguous, but one element off 16-byte alignment
            block = torch.randn(batch * length * dim + 1, generator=generator, dtype=torch.float64)
            start, view_strides = 1, (length * dim, dim, 1)
        else:
            block = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64)
            start, view_strides = 0, (length * dim, dim, 1)
        flat = block.reshape(-1) * 1.5 + 0.3
        # Each layer starts 64-byte aligned in the emulator's storage (plus `start`).
        pad = (-offset) % 32
        chunks.append(torch.zeros(pad, dtype=torch.float64))
        offset += pad
        chunks.append(flat)
        views.append((length, view_strides, offset + start))
        offset += flat.numel()
    storage = torch.cat(chunks)
    storage = (storage * case.magnitude).to(case.dtype)  # rounded once: kernels and reference see the same values
    layers = [storage.as_strided((batch, length, dim), strides, start) for length, strides, start in views]
    return storage, layers, views


def run_case(runner, case: Case, tmp_path):
    generator = torch.Generator().manual_seed(case.seed)
    storage, layers, views = _make_layers(case, generator)
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    num_tokens = num_gathered_tokens(case.lengths, case.tokens)
    weight = (torch.randn(case.heads, case.dim, generator=generator, dtype=torch.float64) * 0.5).to(acc)
    grad_pooled = torch.randn(case.batch, case.heads, case.dim, generator=generator, dtype=torch.float64).to(acc)
    grad_attention = (torch.randn(case.batch, case.heads, num_tokens, generator=generator, dtype=torch.float64).to(acc)
                      if case.grad_attention else None)
    head_tile = case.head_tile or case.heads

    config = [DTYPES[case.dtype], case.batch, case.dim, case.heads, SPECS[case.tokens], case.prefix, 1e-5,
              case.tile_tokens, head_tile, int(case.need_grad), int(case.dw_shared), case.backward_blocks,
              int(case.grad_attention), case.schedule_seed, int(case.normalize == "layernorm"),
              storage.numel(), len(layers), *(case.plan_limits or (0, 0)), case.backward_head_tile]
    lines = [" ".join(map(str, config))]
    for length, strides, start in views:
        lines.append(" ".join(map(str, (length, *strides, start))))
    (tmp_path / "config.txt").write_text("\n".join(lines) + "\n")
    inputs = [storage.double(), weight.double(), grad_pooled.double()]
    if grad_attention is not None:
        inputs.append(grad_attention.double())
    np.concatenate([t.reshape(-1).numpy() for t in inputs]).astype("<f8").tofile(tmp_path / "input.bin")
    result = subprocess.run([str(runner), str(tmp_path / "config.txt"), str(tmp_path / "input.bin"),
                             str(tmp_path / "output.bin")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    values = torch.from_numpy(np.fromfile(tmp_path / "output.bin", dtype="<f8"))

    shapes = [(case.batch, case.heads, case.dim), (case.batch, case.heads, num_tokens),
              (case.batch, num_tokens), (case.batch, num_tokens)]
    if case.need_grad:
        shapes += [(case.batch, length, case.dim) for length in case.lengths]
    shapes.append((case.heads, case.dim))
    shapes += [(case.dim,), (case.dim,)]  # token_moments
    shapes.append((case.batch, num_tokens, case.dim))  # the gather pass's stack
    outputs, position = [], 0
    for shape in shapes:
        count = int(np.prod(shape))
        outputs.append(values[position:position + count].reshape(shape))
        position += count
    assert position == values.numel()
    plan = [line for line in result.stdout.splitlines() if line.startswith("plan ")]
    case.used_plan = tuple(int(value) for value in plan[-1].split()[1:])
    case.token_bytes = {line.split()[1]: int(line.split()[2]) for line in result.stdout.splitlines()
                        if line.startswith("token_bytes ")}
    return outputs, (layers, weight, grad_pooled, grad_attention)


def reference(case: Case, layers, weight, grad_pooled, grad_attention):
    *forward, grads, grad_weight = pool_with_grads(layers, weight, case.tokens, case.prefix, grad_pooled,
                                                   grad_attention, normalize=case.normalize)
    stack = stack_tokens([layer.double() for layer in layers], case.tokens, case.prefix)
    return forward, grads, grad_weight, moments_reference(stack), stack


def check(runner, case, tmp_path):
    outputs, inputs = run_case(runner, case, tmp_path)
    forward, grads, grad_weight, moments, stack = reference(case, *inputs)
    names = ["pooled", "attention", "mean", "rstd"]
    for name, ours, theirs in zip(names, outputs[:4], forward):
        assert torch.isfinite(ours).all(), f"{name}: non-finite values (uninitialised shared memory?)"
        assert rel_err(ours, theirs) < FORWARD_TOL[case.dtype], f"{name}: {rel_err(ours, theirs):.3g}"
    ours_grads = outputs[4:-4]
    if case.need_grad:
        for index, (ours, theirs) in enumerate(zip(ours_grads, grads)):
            assert torch.isfinite(ours).all(), f"layer {index} gradient: unwritten elements"
            assert rel_err(ours, theirs) < GRAD_TOL[case.dtype], f"layer {index}: {rel_err(ours, theirs):.3g}"
    tol = FORWARD_TOL[case.dtype] * 5
    assert torch.isfinite(outputs[-4]).all()
    assert rel_err(outputs[-4], grad_weight) < tol, f"dw: {rel_err(outputs[-4], grad_weight):.3g}"
    # The gather pass: the tokens themselves, exact but for the averages' rounding.
    assert rel_err(outputs[-1], stack) < FORWARD_TOL[case.dtype], f"stack: {rel_err(outputs[-1], stack):.3g}"
    if case.magnitude == 1.0:  # (huge tokens: their variance is not finite in float32)
        for name, ours, theirs in zip(("moments mean", "moments var"), outputs[-3:-1], moments):
            assert rel_err(ours, theirs) < FORWARD_TOL[case.dtype], f"{name}: {rel_err(ours, theirs):.3g}"
    return outputs


CASES = [
    # (B, N, D) tokens: one tile, several tiles with a ragged last one, all tile sizes.
    pytest.param(Case(lengths=(5,), tile_tokens=8), id="tokens-N5"),
    pytest.param(Case(lengths=(37,), tile_tokens=16, dim=36, heads=5), id="tokens-N37-t16-D36"),
    pytest.param(Case(lengths=(70,), tile_tokens=32, heads=1, grad_attention=False), id="tokens-N70-t32-H1"),
    # Token specs over layers of different lengths, views of one storage.
    pytest.param(Case(lengths=(9, 7, 12), tokens="cls", layout="transposed"), id="cls-transposed"),
    pytest.param(Case(lengths=(9, 7, 12), tokens="ap", prefix=5), id="ap-prefix5"),
    pytest.param(Case(lengths=(9, 7, 12, 9, 3), tokens="cls+ap", tile_tokens=8), id="cls+ap-5layers"),
    pytest.param(Case(lengths=(9, 7, 12), tokens="cls+ap", prefix=0), id="cls+ap-prefix0"),
    pytest.param(Case(lengths=(9, 0, 12), tokens="all", layout="strided-d"), id="all-empty-layer-strided"),
    pytest.param(Case(lengths=(300, 150), tokens="ap", dim=40, heads=2, tile_tokens=8), id="ap-long-rows"),
    # Scalar path: unaligned storage, D not a multiple of the chunk.
    pytest.param(Case(lengths=(9, 7), tokens="cls+ap", layout="offset"), id="cls+ap-misaligned"),
    pytest.param(Case(lengths=(13,), dim=21, heads=6), id="tokens-D21"),
    # Plans: head tiles, dw in global memory, dw only, fewer blocks than samples.
    pytest.param(Case(lengths=(19,), heads=11, head_tile=4), id="head-tiles"),
    # Head tiles on a gathered spec: the gather pass, then the forward over its stack.
    pytest.param(Case(lengths=(9, 7, 12), tokens="cls+ap", heads=11, head_tile=4), id="cls+ap-head-tiles-stack"),
    pytest.param(Case(lengths=(19,), heads=6, dw_shared=False, backward_blocks=2, batch=5), id="dw-global-2blocks"),
    pytest.param(Case(lengths=(9, 7, 12), tokens="cls+ap", need_grad=False), id="dw-only"),
    # dw-only with heads tiled over blocks (ragged last tile), ranges of several samples.
    pytest.param(Case(lengths=(9, 7, 12), tokens="cls+ap", heads=11, need_grad=False, backward_head_tile=4,
                      backward_blocks=2, batch=5), id="dw-only-head-tiles"),
    pytest.param(Case(lengths=(19,), heads=9, need_grad=False, backward_head_tile=8, grad_attention=False),
                 id="dw-only-head-tiles-noGA"),
    pytest.param(Case(lengths=(300,), dim=64, heads=40, tile_tokens=32, batch=2), id="tokens-H40-D64"),
    # normalize="none"; huge tokens (issue 12 item 7): float32 squares of 1e30 overflow, and
    # the "ap" sums of 300 rows of ~1e37 do too.
    pytest.param(Case(lengths=(9, 7, 12), tokens="cls+ap", normalize="none"), id="none-cls+ap"),
    pytest.param(Case(lengths=(13,), dim=21, normalize="none", tile_tokens=8), id="none-tokens-D21"),
    pytest.param(Case(lengths=(9, 7, 12), tokens="cls+ap", magnitude=1e30), id="huge-cls+ap"),
    pytest.param(Case(lengths=(300, 150), tokens="ap", dim=40, heads=2, magnitude=1e37), id="huge-ap-sums"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference(runner, case, dtype, tmp_path):
    if dtype != torch.float32 and case.lengths[0] >= 70:
        pytest.skip("the long cases run in float32 only, to keep the emulation quick")
    if dtype in (torch.float16,) and case.magnitude > 1:
        pytest.skip("float16 cannot hold tokens of that magnitude")
    check(runner, Case(**{**case.__dict__, "dtype": dtype}), tmp_path)


def test_schedule_does_not_change_results(runner, tmp_path):
    """Other random thread orders between barriers give bitwise the same outputs (no race)."""
    results = []
    for schedule_seed in (1, 2, 3):
        folder = tmp_path / str(schedule_seed)
        folder.mkdir()
        case = Case(lengths=(9, 7, 12), tokens="cls+ap", heads=6, schedule_seed=schedule_seed)
        results.append(check(runner, case, folder))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# Shared-memory limits (per-block opt-in, per SM) of an A100 (sm_80) and of a made-up small GPU
# whose 12,000 bytes per block force the planner's fallbacks for D=64, H=40: heads tiled over
# blocks in the forward, dw in global memory in a backward with layer gradients, heads tiled
# over blocks (dw in shared) in a dw-only backward.
SM80_LIMITS = (166912, 167936)
TIGHT_LIMITS = (12000, 2 * (12000 + 1024))


@pytest.mark.parametrize("case, expect_head_tiles, expect_dw_shared, expect_backward_head_tiles", [
    pytest.param(Case(lengths=(37,), dim=36, heads=5, plan_limits=SM80_LIMITS), False, True, False, id="sm80"),
    pytest.param(Case(lengths=(9, 7, 12), tokens="cls+ap", heads=6, plan_limits=SM80_LIMITS), False, True, False,
                 id="sm80-cls+ap"),
    pytest.param(Case(lengths=(19,), dim=64, heads=40, plan_limits=TIGHT_LIMITS), True, False, False, id="tight"),
    pytest.param(Case(lengths=(19,), dim=64, heads=40, plan_limits=TIGHT_LIMITS, need_grad=False, batch=4,
                      backward_blocks=2), True, True, True, id="tight-dw-only"),
])
def test_kernels_run_with_the_host_planners_tiles(runner, case, expect_head_tiles, expect_dw_shared,
                                                  expect_backward_head_tiles, tmp_path):
    """The planner's tiles for given limits fit the kernels' real use of shared memory (the
    emulator's canary) and give the right results."""
    check(runner, case, tmp_path)
    tile_tokens, head_tile, backward_tile_tokens, dw_shared, backward_head_tile = case.used_plan
    assert tile_tokens % 8 == 0 and backward_tile_tokens % 8 == 0
    assert (head_tile < case.heads) == expect_head_tiles, case.used_plan
    assert bool(dw_shared) == expect_dw_shared, case.used_plan
    assert (backward_head_tile < case.heads) == expect_backward_head_tiles, case.used_plan
    assert backward_head_tile == case.heads or backward_head_tile % 4 == 0, case.used_plan
