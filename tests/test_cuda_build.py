"""The CUDA kernels as built: cubins, kernel names, the ptxas resource report, import without a
GPU; and, on a GPU, half precision and the paths the shared suite does not reach.

The build checks run on every machine whose extension was built with CUDA (the README's build
command sets CUDA_HOME, so CI's is); they skip, saying why, only for a CPU-only build. The
correctness of the cuda backend in float32 / float64 is the shared parametrised suite's
(test_backends.py, test_op.py), which runs it on every "cuda" device present.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastfuse
from fastfuse import _extension

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")
# Every kernel instantiation the library must carry, per arch (csrc/cuda/pool_kernels.cuh).
TYPES = ("float, float", "double, double", "c10::Half, float", "c10::BFloat16, float")
EXPECTED_KERNELS = {f"fused_pool_forward_kernel<{types}>" for types in TYPES} | {
    f"fused_pool_backward_kernel<{types}, {grads}>" for types in TYPES for grads in ("true", "false")
} | {f"gather_tokens_kernel<{types}>" for types in TYPES} | {f"token_moments_kernel<{types}>" for types in ("float, float", "double, double", "c10::Half, float",
                                                 "c10::BFloat16, float")
} | {f"{kernel}<{accum}>" for kernel in ("weight_grad_reduce_kernel", "token_moments_reduce_kernel")
     for accum in ("float", "double")}


def _load_report_module():
    spec = importlib.util.spec_from_file_location("cuda_resource_report",
                                                  ROOT / "tools" / "cuda_resource_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


report_module = _load_report_module()


def _built_with_cuda() -> bool:
    return bool(_extension.build_info().get("cuda_kernels")) and _extension.library_path() is not None


needs_cuda_build = pytest.mark.skipif(
    not _built_with_cuda(),
    reason=("the compiled extension was built without CUDA kernels "
            f"(build info: {_extension.build_info() or 'none'}); build with "
            "`export CUDA_HOME=/usr/local/cuda; pip install --no-build-isolation -e .`"))


def _cuobjdump() -> str:
    """cuobjdump from CUDA_HOME, PATH, or the copy that the triton wheel ships."""
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    if found := shutil.which("cuobjdump"):
        candidates.append(Path(found))
    triton_spec = importlib.util.find_spec("triton")
    if triton_spec is not None and triton_spec.origin:
        candidates.append(Path(triton_spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("no cuobjdump found (CUDA_HOME/bin, PATH, triton's bundled copy); install the CUDA "
                "toolkit's cuobjdump (e.g. `pip install nvidia-cuda-cuobjdump`)")


def _cuobjdump_output(*options: str) -> str:
    result = subprocess.run([_cuobjdump(), *options, str(_extension.library_path())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _cubin_resources() -> dict[tuple[str, str], dict[str, int]]:
    """(mangled kernel, arch) -> {"REG": .., "STACK": .., "LOCAL": ..} from the library's cubins."""
    resources, arch, in_elf, function = {}, None, False, None
    for line in _cuobjdump_output("--dump-resource-usage").splitlines():
        stripped = line.strip()
        if stripped.startswith("Fatbin "):
            in_elf, arch = stripped == "Fatbin elf code:", None
        elif stripped.startswith("arch = "):
            arch = stripped.split("=", 1)[1].strip()
        elif stripped.startswith("Function ") and in_elf:
            function = stripped[len("Function "):].rstrip(":")
        elif stripped.startswith("REG:") and function is not None:
            values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", stripped))
            resources[(function, arch)] = {key: int(value) for key, value in values.items()}
            function = None
    return resources


@needs_cuda_build
def test_library_carries_cubins_for_sm80_and_sm90():
    elves = _cuobjdump_output("--list-elf")
    for arch in ARCHS:
        assert re.search(rf"\.{arch}\.cubin", elves), f"no {arch} cubin in {_extension.library_path()}:\n{elves}"


@needs_cuda_build
def test_library_carries_the_expected_kernels():
    resources = _cubin_resources()
    names = report_module.demangle(sorted({name for name, _ in resources}))
    for arch in ARCHS:
        kernels = {report_module.short_name(names[name]) for name, kernel_arch in resources if kernel_arch == arch}
        assert kernels == EXPECTED_KERNELS, f"{arch}: missing {EXPECTED_KERNELS - kernels}, unexpected {kernels - EXPECTED_KERNELS}"


@needs_cuda_build
def test_resource_report_has_no_spills_and_matches_the_library():
    report = _extension.CUDA_RESOURCE_REPORT
    assert report.is_file(), f"{report} missing: the CUDA build writes it beside the library (CMakeLists.txt); rebuild"
    kernels = report_module.parse(report_module.raw_section(report.read_text()))
    assert kernels, f"{report} lists no kernels"
    for kernel in kernels:
        where = f"{kernel.name} ({kernel.arch})"
        assert kernel.spill_stores == 0, f"{where}: {kernel.spill_stores} bytes spill stores"
        assert kernel.spill_loads == 0, f"{where}: {kernel.spill_loads} bytes spill loads"
        assert kernel.stack_frame == 0, f"{where}: {kernel.stack_frame} bytes stack frame (local memory)"
    # The report describes the installed library: same kernels, same registers, no local memory.
    cubins = _cubin_resources()
    reported = {(kernel.name, kernel.arch): kernel for kernel in kernels}
    assert set(reported) == set(cubins), (
        "the report is stale (rebuild): only in the report "
        f"{set(reported) - set(cubins)}, only in the library {set(cubins) - set(reported)}")
    for key, kernel in reported.items():
        assert cubins[key]["REG"] == kernel.registers, f"{key}: registers differ, stale report"
        assert cubins[key]["STACK"] == 0 and cubins[key]["LOCAL"] == 0, f"{key}: {cubins[key]}"


def test_build_writes_no_tracked_file():
    """The build's outputs (library, metadata, resource report) are all ignored by git."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = [_extension.library_path(), ROOT / "fastfuse" / "_build_info.json", _extension.CUDA_RESOURCE_REPORT]
    # the trailing slash: git matches the "build/" rule against a folder even before the build made it
    paths = [str(path.relative_to(ROOT)) for path in names if path is not None] + ["build/"]
    result = subprocess.run(["git", "check-ignore", *paths], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert sorted(result.stdout.split()) == sorted(paths), result.stdout + result.stderr
    tracked = subprocess.run(["git", "ls-files", "benchmarks", "tools"], capture_output=True, text=True,
                             cwd=ROOT, timeout=60).stdout.split()
    assert "tools/cuda_resource_report.py" in tracked and not any("resource_usage" in name for name in tracked)


def test_report_parser_reads_ptxas_output():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""
    foo, bar = report_module.parse(text)
    assert (foo.name, foo.arch, foo.registers, foo.stack_frame, foo.spill_stores, foo.spill_loads,
            foo.static_shared) == ("_Z3fooPf", "sm_80", 40, 8, 4, 12, 256)
    assert (bar.arch, bar.registers, bar.stack_frame, bar.spill_stores) == ("sm_90", 8, 0, 0)
    with pytest.raises(ValueError, match="no registers"):
        report_module.parse(text.split("ptxas info    : Used 8")[0])


def test_import_without_gpu_reports_cuda_unavailable():
    code = ("import json, fastfuse, torch; entry = fastfuse.backends()['cuda']; "
            "print(json.dumps({'gpu': torch.cuda.is_available(), **entry}))")
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=environment, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout.strip().splitlines()[-1])
    assert not entry["gpu"] and not entry["available"], entry
    assert entry["devices"] == ["cuda"]
    if _built_with_cuda():
        assert "GPU" in entry["reason"] and "sm_80" in entry["reason"], entry["reason"]
    else:
        assert "CUDA" in entry["reason"], entry["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_explicit_cuda_backend_says_why_without_gpu():
    with pytest.raises(RuntimeError, match="cuda"):
        fastfuse.attentive_pool(torch.randn(2, 3, 8), torch.randn(2, 8), backend="cuda")


# ---- GPU only --------------------------------------------------------------------------------

def _cuda_reason() -> str:
    entry = fastfuse.backends()["cuda"]
    return "" if entry["available"] else entry["reason"]


needs_gpu = pytest.mark.skipif(bool(_cuda_reason()), reason=f"cuda backend unavailable: {_cuda_reason()}")


def _pool(x, weight, backend, tokens=None, num_prefix_tokens=1):
    """pooled, attention and the gradients of a fixed random loss w.r.t. inputs and weight."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (x if isinstance(x, list) else [x])]
    weight = weight.detach().clone().requires_grad_(True)
    pooled, attention = fastfuse.attentive_pool(inputs if isinstance(x, list) else inputs[0], weight,
                                                tokens=tokens, num_prefix_tokens=num_prefix_tokens,
                                                backend=backend)
    generator = torch.Generator(device=pooled.device).manual_seed(7)
    loss = ((pooled * torch.randn(pooled.shape, generator=generator, device=pooled.device)).sum()
            + (attention * torch.randn(attention.shape, generator=generator, device=pooled.device)).sum())
    grads = torch.autograd.grad(loss, inputs + [weight])
    return [pooled, attention, *grads]


def _error(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _case(kind, dtype, device="cuda"):
    """The same values for every dtype (drawn in float32, then rounded)."""
    generator = torch.Generator().manual_seed(3)
    if kind == "tokens":  # (B, N, D) with N spanning several tiles, D not a multiple of 8
        return torch.randn(6, 77, 100, generator=generator).to(device, dtype)
    base = torch.randn(197 + 197 + 50, 5, 132, generator=generator).to(device, dtype)
    return [base[start:start + length].transpose(0, 1)[..., 2:130]  # hook-like views
            for start, length in ((0, 197), (197, 197), (394, 50))]


@needs_gpu
@pytest.mark.parametrize("kind", ["tokens", "cls+ap", "ap", "all"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_matches_float32_reference(kind, dtype):
    """Our error against the float32 computation is at most a few times that of the torch
    backend run at the input precision (flash-attention's rule, STYLE.md)."""
    tokens = None if kind == "tokens" else kind
    weight = torch.randn(4, 100 if kind == "tokens" else 128, device="cuda") * 0.2
    reference = _pool(_case(kind, torch.float32), weight, "torch", tokens)
    ours = _pool(_case(kind, dtype), weight, "cuda", tokens)
    theirs = _pool(_case(kind, dtype), weight, "torch", tokens)
    for index, (mine, torch_half, exact) in enumerate(zip(ours, theirs, reference)):
        assert mine.dtype == torch_half.dtype and mine.shape == torch_half.shape
        assert _error(mine, exact) <= 3 * _error(torch_half, exact) + 1e-5, f"output {index}"


@needs_gpu
@pytest.mark.parametrize("heads", [1, 13, 192])
def test_many_heads_and_determinism(heads):
    """Several probes' weights at once (H up to 192: the forward tiles heads when H x D is too
    large for one block) and reproducible dw (no atomics)."""
    x = torch.randn(9, 40, 768, device="cuda")
    weight = torch.randn(heads, 768, device="cuda") * 0.05
    first = _pool(x, weight, "cuda")
    second = _pool(x, weight, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    reference = _pool(x.double(), weight.double(), "torch")
    for mine, exact in zip(first, reference):
        assert _error(mine, exact) < 1e-4


@needs_gpu
def test_weight_grad_only():
    """layers_need_grad=False: no layer gradients, the same dw."""
    layers = [torch.randn(4, 33, 64, device="cuda") for _ in range(3)]
    weight = torch.randn(5, 64, device="cuda")
    outputs = torch.ops.fastfuse.fused_pool_forward(layers, weight, "cls+ap", 1, 1e-5)
    grad_pooled = torch.randn_like(outputs[0])
    full = torch.ops.fastfuse.fused_pool_backward(grad_pooled, None, layers, weight, *outputs,
                                                  "cls+ap", 1, True)
    only_weight = torch.ops.fastfuse.fused_pool_backward(grad_pooled, None, layers, weight, *outputs,
                                                         "cls+ap", 1, False)
    assert len(full[0]) == 3 and len(only_weight[0]) == 0
    # (Not bitwise: the two launches may tile differently, so dw partials are summed in a
    # different grouping.)
    torch.testing.assert_close(full[1], only_weight[1], rtol=1e-5, atol=1e-5)
