"""The Triton kernels against the float64 oracle of tests/reference.py (SPEC §2 from the definition).

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py),
on CPU tensors; its single launch config (kernels/triton/configs.py: 32 tokens x 32 features x
16 heads per tile) makes the small shapes below cover several tiles over N, D and heads, with
masked tails. float16 / bfloat16 are held to a multiple of PyTorch's own error at the input
precision (STYLE.md), float32 and float64 (float64 accumulation) to reference.TOLERANCE.
"""
import json
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


def _triton_ptxas_present() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def test_every_config_compiles_for_ampere_and_hopper_without_spills():
    """The interpreter skips Triton's compiler: build every config of both kernels for sm_80 /
    sm_90 (no GPU needed; tests/triton_aot.py, a sample rotating dtype, D class and addressing
    mode; ``--all`` builds every combination) and read ptxas' register report of each."""
    if not _triton_ptxas_present():
        pytest.skip("triton's bundled ptxas is missing")
    from fastfuse.kernels.triton.configs import config_tables

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, os.path.join(root, "tests", "triton_aot.py"), "--arch", "sm_90"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    built = {(report["kernel"], report["config"]) for report in reports}
    assert built == {(kernel, index) for kernel, table in config_tables().items() for index in range(len(table))}
    assert {report["dim"] % 16 != 0 for report in reports} == {False, True}  # D = 768 and D = 1000 builds
    for report in reports:
        assert 0 < report["registers"] <= 255, report
        assert report["spill_stores"] + report["spill_loads"] == 0, f"spills: {report}"
        # Half-precision gradients leave in 16-byte vectors, also when scattered from the
        # gathered form (GRAD_ALIGN) and at D = 1000 (DIM_ALIGN): no 2-byte stores at all.
        assert report["narrow_stores"] == 0, f"2-byte global stores: {report}"


def test_forced_config_env_var(monkeypatch):
    from fastfuse.kernels.triton import configs

    monkeypatch.setenv("FASTFUSE_TRITON_CONFIG", "1")
    assert configs.forced_config_index() == 1
    monkeypatch.setenv("FASTFUSE_TRITON_CONFIG", "fast")
    with pytest.raises(ValueError, match="FASTFUSE_TRITON_CONFIG"):
        configs.forced_config_index()
    monkeypatch.delenv("FASTFUSE_TRITON_CONFIG")
    assert configs.forced_config_index() is None


def test_launch_copies_nothing_from_the_host_after_the_first_call(monkeypatch):
    """Forward and backward, several layers and one, every addressing mode: once a layout has
    been seen, a call builds no tensor from host data (torch.tensor / as_tensor / from_numpy)
    and copies none to the device, so nothing waits for the stream and a CUDA graph may
    capture the step."""
    from fastfuse.backends import triton as triton_backend

    cases = [(_layer_views(2, 24, torch.float32), "cls+ap"), (_layer_views(2, 24, torch.float32), "all"),
             (_layer_views(2, 24, torch.float32), "cls"), ([_tokens((2, 9, 24), 3)], "all")]
    weight = _weight(3, 24).to(DEVICE)

    def step(layers, tokens):
        outputs = TRITON.forward(layers, weight, tokens, 1, EPS)
        grad_pooled = torch.ones_like(outputs[0])
        TRITON.backward(grad_pooled, None, layers, weight, *outputs, tokens, 1, True)
        TRITON.backward(grad_pooled, None, layers, weight, *outputs, tokens, 1, False)

    for layers, tokens in cases:
        step([layer.to(DEVICE) for layer in layers], tokens)  # warm-up: the layout's tables
    calls = []
    for name in ("tensor", "as_tensor", "from_numpy"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _name=name, _original=original, **k: (calls.append(_name), _original(*a, **k))[1])
    original_to, original_copy = torch.Tensor.to, torch.Tensor.copy_

    def recording_to(self, *args, **kwargs):
        result = original_to(self, *args, **kwargs)
        if result.device != self.device:
            calls.append(f"to {self.device} -> {result.device}")
        return result

    def recording_copy(self, source, *args, **kwargs):
        if source.device != self.device:
            calls.append(f"copy_ {source.device} -> {self.device}")
        return original_copy(self, source, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    monkeypatch.setattr(torch.Tensor, "copy_", recording_copy)
    for layers, tokens in cases:  # fresh tensors, the same layouts: new addresses
        step([layer.clone().to(DEVICE) if layer.is_contiguous() else layer.to(DEVICE) for layer in layers], tokens)
    assert calls == [], f"host tensors built or copied per call: {calls}"
    assert len(triton_backend._DEVICE_TABLES) >= 3


def test_batch_bucket_and_plan_do_not_depend_on_addresses():
    from fastfuse.backends import triton as triton_backend

    shapes = [(1000, 197, 768)] * 3
    strides = [(197 * 768, 768, 1)] * 3
    plan = triton_backend.plan(shapes, strides, 2, "cls+ap", 1)
    assert plan.batch_bucket == 1024 and plan.addressing == triton_backend.GATHERED
    assert plan.row_align == 8 and plan.grad_align == 8 and plan.num_tokens == 6
    assert triton_backend.plan([(2048, 197, 768)], [(197 * 768, 768, 1)], 2, "all", 1).batch_bucket == 2048
    odd = triton_backend.plan([(3, 197, 1000)], [(197 * 1000, 1000, 1)], 2, "all", 1)
    assert odd.row_align == 8 and odd.addressing == triton_backend.AFFINE and odd.batch_bucket == 4
    sliced = triton_backend.plan([(3, 12, 37)], [(12 * 46, 46, 1)], 4, "ap", 1)
    assert sliced.row_align == 1 and sliced.grad_align == 1
