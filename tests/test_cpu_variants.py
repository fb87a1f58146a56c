"""The CPU kernels' instruction-set variants (CMakeLists.txt, csrc/library/cpu_dispatch.cpp): the
build metadata lists them, `python -m fastfuse info` says which runs, each one that this CPU
supports gives the SPEC §1 result when forced with FASTFUSE_CPU_ISA, and the portable code of the
library holds no AVX / AVX-512 instructions (so it runs on any x86-64-v2 CPU)."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfuse import _extension
from reference import rel_err, stack_tokens

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _extension.load()[0], reason=f"no compiled library: {_extension.load()[1]}")
X86 = platform.machine().lower() in ("x86_64", "amd64")
LEVELS = {"baseline": "x86-64-v2", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}


def _built() -> dict:
    return _extension.build_info().get("cpu_variants") or {}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def _cpu_runs(variant: str) -> bool:
    flags = _cpu_flags()
    needs = {"baseline": {"sse4_2", "popcnt"},
             "avx2": {"sse4_2", "popcnt", "avx2", "fma", "bmi1", "bmi2"},
             "avx512": {"avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}
    return needs.get(variant, set()) <= flags


def _run(code: str, variant: str | None, stdin: str = "") -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "FASTFUSE_CPU_ISA"}
    if variant is not None:
        environment["FASTFUSE_CPU_ISA"] = variant
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True,
                          env=environment, cwd=ROOT, timeout=300)


def test_build_metadata_lists_the_variants():
    built = _built()
    assert built, f"no cpu_variants in {_extension.build_info()}"
    arch = str(_extension.build_info().get("cpu_arch", "AUTO")).upper()
    if arch in ("AUTO", ""):
        assert built == (LEVELS if X86 else {"baseline": ""})
    else:
        assert list(built) == ["native" if arch == "NATIVE" else "custom"]


def test_info_reports_the_running_variant():
    result = _run("import sys; from fastfuse.cli import main; sys.exit(main(['info', '--json']))", None)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cpu_kernel_variant"] in _built(), report
    # The best built variant this CPU runs (for the automatic x86-64 levels).
    if list(_built()) == list(LEVELS):
        expected = [name for name in LEVELS if _cpu_runs(name)][-1]
        assert report["cpu_kernel_variant"] == expected
    text = _run("import sys; from fastfuse.cli import main; sys.exit(main(['info']))", None)
    assert f"CPU kernels: variant {report['cpu_kernel_variant']} runs here" in text.stdout


_CHILD = """
import json, sys, torch
from fastfuse import _extension
loaded, reason = _extension.load()
assert loaded, reason
payload = json.loads(sys.stdin.read())
dtype = getattr(torch, payload.get("dtype", "float64"))
layers = [torch.tensor(layer, dtype=dtype).requires_grad_(True) for layer in payload["layers"]]
weight = torch.tensor(payload["weight"], dtype=dtype).requires_grad_(True)
pooled, attention, mean, rstd = torch.ops.fastfuse.fused_pool_forward(layers, weight, payload["tokens"], 1, 1e-5)
grad_pooled = torch.tensor(payload["grad_pooled"], dtype=dtype)
grad_layers, grad_weight = torch.ops.fastfuse.fused_pool_backward(
    grad_pooled, None, layers, weight, pooled, attention, mean, rstd, payload["tokens"], 1, True)
print(json.dumps({"variant": torch.ops.fastfuse.cpu_kernel_variant(), "pooled": pooled.tolist(),
                  "attention": attention.tolist(), "grad_layers": [g.tolist() for g in grad_layers],
                  "grad_weight": grad_weight.tolist()}))
"""


def _reference(layers, weight, grad_pooled, tokens):
    """SPEC §1, unfused, in float64 with autograd: LayerNorm without affine of the gathered
    tokens, scores w . xh, softmax over tokens, pooled = attention-weighted sum."""
    layers = [layer.clone().requires_grad_(True) for layer in layers]
    weight = weight.clone().requires_grad_(True)
    stack = stack_tokens(layers, tokens, 1)
    normalized = torch.nn.functional.layer_norm(stack, stack.shape[-1:], eps=1e-5)
    attention = torch.softmax(torch.einsum("hd,bnd->bhn", weight, normalized), dim=-1)
    pooled = torch.einsum("bhn,bnd->bhd", attention, normalized)
    grads = torch.autograd.grad((pooled * grad_pooled).sum(), layers + [weight])
    return pooled, attention, grads[:-1], grads[-1]


@pytest.mark.parametrize("variant", ["baseline", "avx2", "avx512", "native", "custom"])
@pytest.mark.parametrize("tokens", ["cls+ap", "all"])
def test_each_variant_matches_the_reference(variant, tokens):
    if variant not in _built():
        pytest.skip(f"{variant} not built (built: {', '.join(_built())})")
    if not _cpu_runs(variant) and variant in LEVELS:
        pytest.skip(f"this CPU cannot run {variant}")
    generator = torch.Generator().manual_seed(5)
    layers = [torch.randn(3, length, 20, generator=generator, dtype=torch.float64) * 2 + 0.5 for length in (9, 6)]
    weight = torch.randn(5, 20, generator=generator, dtype=torch.float64)
    grad_pooled = torch.randn(3, 5, 20, generator=generator, dtype=torch.float64)
    payload = {"layers": [layer.tolist() for layer in layers], "weight": weight.tolist(),
               "grad_pooled": grad_pooled.tolist(), "tokens": tokens}
    result = _run(_CHILD, variant, json.dumps(payload))
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads(result.stdout)
    assert ours["variant"] == variant
    pooled, attention, grad_layers, grad_weight = _reference(layers, weight, grad_pooled, tokens)
    assert rel_err(torch.tensor(ours["pooled"], dtype=torch.float64), pooled) < 1e-12
    assert rel_err(torch.tensor(ours["attention"], dtype=torch.float64), attention) < 1e-12
    for mine, exact in zip(ours["grad_layers"], grad_layers):
        assert rel_err(torch.tensor(mine, dtype=torch.float64), exact) < 1e-11
    assert rel_err(torch.tensor(ours["grad_weight"], dtype=torch.float64), grad_weight) < 1e-11


@pytest.mark.parametrize("variant", ["baseline", "avx2", "avx512", "native", "custom"])
def test_each_variant_float32_softmax_over_a_wide_score_range(variant):
    """Float32 tokens whose scores spread over hundreds: the forward's softmax weights run from 1
    down through float subnormals to 0 (csrc/cpu/vector_exp.h: vector lanes and scalar tails,
    41 tokens), against SPEC §1 in float64 from the same float32 inputs."""
    if variant not in _built():
        pytest.skip(f"{variant} not built (built: {', '.join(_built())})")
    if not _cpu_runs(variant) and variant in LEVELS:
        pytest.skip(f"this CPU cannot run {variant}")
    generator = torch.Generator().manual_seed(6)
    layers = [torch.randn(4, 41, 32, generator=generator)]
    weight = torch.randn(3, 32, generator=generator) * torch.tensor([[3.0], [20.0], [60.0]])
    grad_pooled = torch.randn(4, 3, 32, generator=generator)
    payload = {"layers": [layer.tolist() for layer in layers], "weight": weight.tolist(),
               "grad_pooled": grad_pooled.tolist(), "tokens": "all", "dtype": "float32"}
    result = _run(_CHILD, variant, json.dumps(payload))
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads(result.stdout)
    assert ours["variant"] == variant
    pooled, attention, _, _ = _reference([layer.double() for layer in layers], weight.double(),
                                         grad_pooled.double(), "all")
    attention_ours = torch.tensor(ours["attention"], dtype=torch.float64)
    tiny = attention < 1e-30
    assert tiny.any() and (attention[~tiny] < 1e-20).any(), "the scores do not span exp's range"
    # Float32 scores of magnitude ~100 carry ~1e-5 absolute rounding, so weights ~1e-5 relative.
    torch.testing.assert_close(attention_ours, attention, rtol=2e-4, atol=1e-30)
    torch.testing.assert_close(torch.tensor(ours["pooled"], dtype=torch.float64), pooled,
                               rtol=2e-4, atol=2e-5)


def test_unknown_variant_is_refused_with_the_built_list():
    result = _run("import torch, fastfuse, fastfuse._extension as e; print(e.cpu_kernel_variant())", "sse9")
    assert result.returncode == 0, result.stderr
    assert "FASTFUSE_CPU_ISA=sse9 names no built CPU kernel variant" in result.stdout
    assert all(name in result.stdout for name in _built())


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_avx_instructions_only_in_their_variants():
    """zmm registers (AVX-512) only in fastfuse::cpu::avx512 code, ymm (AVX) only in the avx2 and
    avx512 variants: the dispatcher, the baseline and every inline function of torch or the
    standard library that the variants share (the linker keeps the portable copy) stay portable."""
    if list(_built()) != list(LEVELS):
        pytest.skip(f"checks the automatic x86-64 levels, built: {list(_built())}")
    result = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(_extension.library_path())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    offenders, function, seen = [], None, {"zmm": 0, "ymm": 0}
    header = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    for line in result.stdout.splitlines():
        if match := header.match(line):
            function = match.group(1)
            continue
        if function is None or "%" not in line:
            continue
        for register, allowed in (("zmm", ("::avx512::",)), ("ymm", ("::avx2::", "::avx512::"))):
            if f"%{register}" in line:
                seen[register] += 1
                if not any(namespace in function for namespace in allowed):
                    offenders.append(f"{register} in {function}")
    assert seen["ymm"] > 0, "no AVX instruction at all: were the variants compiled with their -march?"
    assert not offenders, "\n".join(sorted(set(offenders))[:20])
