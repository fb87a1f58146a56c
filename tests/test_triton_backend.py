"""The Triton kernels against the float64 oracle of tests/reference.py (SPEC §2 from the definition).

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py),
on CPU tensors; its single launch config (kernels/triton/configs.py: 32 tokens x 32 features x
16 heads per tile) makes the small shapes below cover several tiles over N, D and heads, with
masked tails. float16 / bfloat16 are held to a multiple of PyTorch's own error at the input
precision (STYLE.md), float32 and float64 (float64 accumulation) to reference.TOLERANCE.
"""
import os
import subprocess
import sys

import pytest
import torch

import fastfuse
from fastfuse.backends import get as get_backend

from fastfuse.paper import PaperAttentiveProbe

from reference import (EPS, TOLERANCE, hook_like_layers, pool, pool_with_grads, randomize_, rel_err,
                       stack_tokens, values)

_STATUS = fastfuse.backends()["triton"]
if not _STATUS["available"]:
    print(f"triton backend unavailable: {_STATUS['reason']}")
    pytest.skip(f"triton backend unavailable: {_STATUS['reason']}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = get_backend("triton")


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _tokens(shape, seed, dtype=torch.float32):
    return values(shape, _generator(seed), dtype)


def _layer_views(batch, dim, dtype):
    """Hook-like views; the 40-row layer averages more rows than one gather tile holds (32
    under the interpreter)."""
    return hook_like_layers(batch, dim, _generator(1), dtype)


def _low_precision_pool(layers, weight, tokens, num_prefix_tokens, grad_pooled, grad_attention):
    """The contract evaluated in the input dtype itself (autograd): PyTorch's own error."""
    layers = [layer.detach().clone().requires_grad_(True) for layer in layers]
    weight = weight.detach().to(layers[0].dtype).requires_grad_(True)
    stacked = stack_tokens(layers, tokens, num_prefix_tokens)
    normed = torch.nn.functional.layer_norm(stacked, stacked.shape[-1:], eps=EPS)
    attention = torch.softmax(torch.einsum("bnd,hd->bhn", normed, weight), dim=-1)
    pooled = torch.einsum("bhn,bnd->bhd", attention, normed)
    loss = (pooled * grad_pooled.to(pooled.dtype)).sum()
    if grad_attention is not None:
        loss = loss + (attention * grad_attention.to(attention.dtype)).sum()
    grads = torch.autograd.grad(loss, layers + [weight])
    return (pooled, attention), grads


def _check(layers, weight, tokens, num_prefix_tokens, with_grad_attention=True, seed=5):
    """Forward (pooled, attention, mean, rstd) and backward (every layer, weight) vs float64."""
    dtype = layers[0].dtype
    device_layers = [layer.to(DEVICE) for layer in layers]
    device_weight = weight.to(DEVICE)
    outputs = TRITON.forward(device_layers, device_weight, tokens, num_prefix_tokens, EPS)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    grad_pooled = torch.randn(outputs[0].shape, generator=_generator(seed), dtype=torch.float64)
    grad_attention = (torch.randn(outputs[1].shape, generator=_generator(seed + 1), dtype=torch.float64)
                      if with_grad_attention else None)
    *expected, expected_layers, expected_weight = pool_with_grads(
        layers, weight, tokens, num_prefix_tokens, grad_pooled, grad_attention)
    for output, target in zip(outputs, expected):
        assert output.dtype == compute and output.is_contiguous()
        assert output.shape == target.shape
    grad_layers, grad_weight = TRITON.backward(
        grad_pooled.to(DEVICE, compute), None if grad_attention is None else grad_attention.to(DEVICE, compute),
        device_layers, device_weight, *outputs, tokens, num_prefix_tokens)
    for grad, layer in zip(grad_layers, layers):
        assert grad.shape == layer.shape and grad.dtype == layer.dtype and grad.is_contiguous()
    assert grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype

    results = list(outputs) + list(grad_layers) + [grad_weight]
    targets = list(expected) + list(expected_layers) + [expected_weight]
    names = ["pooled", "attention", "mean", "rstd"] + [f"grad layer {i}" for i in range(len(layers))] + ["grad weight"]
    if dtype in (torch.float32, torch.float64):
        tolerances = [TOLERANCE[dtype]] * len(results)
    else:  # a multiple of the error of the same contract computed in the input dtype
        (low_pooled, low_attention), low_grads = _low_precision_pool(
            layers, weight, tokens, num_prefix_tokens, grad_pooled, grad_attention)
        low = [low_pooled, low_attention, None, None] + list(low_grads)
        tolerances = [1e-5 if value is None else 3 * rel_err(value, target) + 1e-5
                      for value, target in zip(low, targets)]
    for name, result, target, tolerance in zip(names, results, targets, tolerances):
        error = rel_err(result, target)
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:.3g} ({dtype})"


def _weight(heads, dim, seed=11):
    return torch.randn((heads, dim), generator=_generator(seed)) * 0.4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_token_tensor_tiles_and_tails(dtype):
    # N = 70: 3 token tiles; D = 72: 3 feature tiles; H = 18 (3 probes x 6 heads): 2 head blocks;
    # B = 3 over 2 programs under the interpreter: one program loops over two samples.
    tokens = _tokens((3, 70, 72), 0, dtype)
    _check([tokens], _weight(18, 72).to(torch.float64 if dtype == torch.float64 else torch.float32), "all", 0)


def test_token_tensor_without_attention_grad_and_strided_features():
    # A (B, N, D) view whose feature stride is not 1, and no gradient for the attention map.
    tokens = _tokens((2, 20, 19), 4).transpose(1, 2)
    _check([tokens], _weight(3, 20), "all", 0, with_grad_attention=False)


@pytest.mark.parametrize("spec", ["all", "cls", "ap", "cls+ap"])
def test_layer_views_every_spec(spec):
    # Three layers of lengths 40, 11, 9 read in place; 2 prefix tokens (CLS + register).
    _check(_layer_views(3, 37, torch.float32), _weight(5, 37), spec, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_layer_views_half(dtype):
    # D = 64: two full feature tiles, no tail.
    _check(_layer_views(2, 64, dtype), _weight(4, 64), "cls+ap", 3)


def test_cls_and_ap_share_row_zero_without_prefix():
    # num_prefix_tokens = 0: row 0 is both the CLS token and one of the averaged rows.
    _check(_layer_views(2, 24, torch.float32), _weight(2, 24), "cls+ap", 0)


def test_layers_with_different_feature_strides():
    # One layer with a non-unit feature stride among unit-stride ones: copied, then read.
    layers = _layer_views(2, 24, torch.float32)
    layers[0] = _tokens((2, 24, 7), 9).transpose(1, 2)
    _check(layers, _weight(3, 24), "ap", 1)


def test_grad_weight_is_deterministic():
    layers = _layer_views(3, 20, torch.float32)
    weight = _weight(4, 20).to(DEVICE)
    layers = [layer.to(DEVICE) for layer in layers]
    outputs = TRITON.forward(layers, weight, "cls+ap", 1, EPS)
    grad_pooled = torch.randn(outputs[0].shape, generator=_generator(3)).to(DEVICE)
    first = TRITON.backward(grad_pooled, None, layers, weight, *outputs, "cls+ap", 1)
    second = TRITON.backward(grad_pooled, None, layers, weight, *outputs, "cls+ap", 1)
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))


@pytest.mark.parametrize("tokens", ["all", "cls+ap"])
def test_frozen_layers_compute_weight_grad_only(tokens):
    """layers_need_grad=False (frozen features): no layer gradients, the same dw."""
    layers = [layer.to(DEVICE) for layer in _layer_views(3, 20, torch.float32)]
    weight = _weight(4, 20).to(DEVICE)
    outputs = TRITON.forward(layers, weight, tokens, 1, EPS)
    grad_pooled = torch.randn(outputs[0].shape, generator=_generator(4)).to(DEVICE)
    full = TRITON.backward(grad_pooled, None, layers, weight, *outputs, tokens, 1, True)
    frozen = TRITON.backward(grad_pooled, None, layers, weight, *outputs, tokens, 1, False)
    assert len(frozen[0]) == 0 and len(full[0]) == len(layers)
    torch.testing.assert_close(frozen[1], full[1], rtol=1e-6, atol=1e-6)


def test_public_entry_points_run_triton():
    """fastfuse.attentive_pool and AttentiveFusion with backend="triton" against the oracle
    (forward and the gradients through the public op) and the paper's probe."""
    layers = [layer.to(DEVICE).requires_grad_(True) for layer in _layer_views(2, 16, torch.float32)]
    weight = _weight(3, 16).to(DEVICE).requires_grad_(True)
    pooled, attention = fastfuse.attentive_pool(layers, weight, tokens="cls+ap", num_prefix_tokens=1,
                                                backend="triton")
    ref_layers = [layer.detach().cpu().double().requires_grad_(True) for layer in layers]
    ref_weight = weight.detach().cpu().double().requires_grad_(True)
    ref_pooled, ref_attention, _, _ = pool(ref_layers, ref_weight, "cls+ap", 1)
    tol = TOLERANCE[torch.float32]
    assert rel_err(pooled, ref_pooled) < tol and rel_err(attention, ref_attention) < tol
    (pooled.sum() + (attention * attention).sum()).backward()
    (ref_pooled.sum() + (ref_attention * ref_attention).sum()).backward()
    for grad, ref_grad in zip([*layers, weight], [*ref_layers, ref_weight]):
        assert rel_err(grad.grad, ref_grad.grad) < tol

    probe = randomize_(fastfuse.AttentiveFusion(dim=16, num_heads=2, num_classes=3, backend="triton"))
    reference = PaperAttentiveProbe(dim=16, num_heads=2, num_classes=3).double()
    reference.load_state_dict(probe.state_dict())
    probe, reference = probe.to(DEVICE).eval(), reference.eval()
    tokens = _tokens((3, 5, 16), 7)
    logits, attention = probe(tokens.to(DEVICE), return_attention=True)
    ref_logits, ref_attention = reference(tokens.double(), return_attention=True)
    assert rel_err(logits, ref_logits) < tol and rel_err(attention, ref_attention) < tol


_COMPILE_CHECK = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from fastfuse.kernels.triton.pool_backward import pool_backward_kernel
from fastfuse.kernels.triton.pool_forward import pool_forward_kernel

for kernel in (pool_forward_kernel, pool_backward_kernel):
    fn, config = kernel.fn, kernel.configs[0]
    for addressing, dtype, cap in ((0, "fp16", 90), (1, "bf16", 90), (2, "fp32", 80)):
        constants = dict(config.kwargs, ADDRESSING=addressing, ROW_ALIGN=1, stride_d=1, ACC=tl.float32,
                         DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        if "HAS_GRAD_ATTENTION" in fn.arg_names:
            constants["HAS_GRAD_ATTENTION"] = True
        signature = {}
        for name in fn.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name in ("layers_ptr", "grads_ptr"):
                signature[name] = "*" + dtype
            elif name.endswith("table_ptr"):
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32"
            else:
                signature[name] = "fp32" if name == "eps" else "i64" if name.startswith("stride") else "i32"
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        if config.maxnreg:
            options["maxnreg"] = config.maxnreg
        triton.compile(source, target=GPUTarget("cuda", cap, 32), options=options)
print("compiled")
"""


def test_kernels_compile_for_ampere_and_hopper():
    """The interpreter skips Triton's compiler; build the kernels for sm_80 / sm_90 (no GPU needed)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is missing")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
