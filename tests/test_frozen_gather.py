"""Frozen features in training (no layer requires grad, score_weight does): attentive_pool
gathers the tokens once (the cpu backend's gather kernel, else plain PyTorch) and runs the op
on that (B, N, D) stack, so the backend's backward never re-reads the layers. Outputs and dw
against the float64 oracle (tests/reference.py); which path ran, through a spy on the
backend's forward and backward. The gather kernel itself against the oracle's stack."""
import dataclasses
import importlib

import pytest
import torch

import fastfuse
import fastfuse.ops
from fastfuse.backends import get

from reference import TOLERANCE, make_layer, pool, pool_with_grads, rel_err, stack_tokens


def _frozen_layers(dtype, device, num_prefix_tokens):
    """Three frozen layers of different lengths, one a strided view (rows and features sliced)."""
    generator = torch.Generator().manual_seed(num_prefix_tokens)
    return [make_layer(2, num_prefix_tokens + 4, 8, "contiguous", generator, dtype, device),
            make_layer(2, num_prefix_tokens + 2, 8, "padded", generator, dtype, device),
            make_layer(2, num_prefix_tokens + 7, 8, "sliced", generator, dtype, device)]


def _spy_calls(monkeypatch):
    """Record (direction, tokens, number and shapes of the tensors) of every backend call."""
    calls = []

    def wrap(entry):
        def forward(layers, score_weight, tokens, num_prefix_tokens, eps, **options):
            calls.append(("forward", tokens, [tuple(layer.shape) for layer in layers]))
            return entry.forward(layers, score_weight, tokens, num_prefix_tokens, eps, **options)

        def backward(*args, **options):
            layers, tokens = args[2], args[8]
            calls.append(("backward", tokens, [tuple(layer.shape) for layer in layers]))
            return entry.backward(*args, **options)

        return dataclasses.replace(entry, forward=forward, backward=backward)

    monkeypatch.setattr(fastfuse.ops, "_get_backend", lambda name: wrap(get(name)))
    return calls


def gathers_first(dtype, device, backend):
    """Where an eager gather reads each layer in one pass (README, "The fused op"): every dtype
    with the cpu backend (its own gather kernel); float32 / float64 layers in PyTorch on CPU;
    float16 / bfloat16 / float32 layers on CUDA."""
    if backend == "cpu":
        return True
    if device == "cpu":
        return dtype in (torch.float32, torch.float64)
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("num_prefix_tokens", [1, 5])
@pytest.mark.parametrize("tokens", ["cls", "ap", "cls+ap"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_frozen_layers_match_oracle_and_are_read_once(backend_device, tokens, num_prefix_tokens,
                                                      dtype, monkeypatch):
    backend, device = backend_device
    if dtype == torch.float16 and tokens != "cls+ap":
        pytest.skip("float16: which path runs is what matters; cls+ap covers both gathers")
    layers = _frozen_layers(dtype, device, num_prefix_tokens)
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(3, 8, dtype=dtype, generator=generator).to(device).requires_grad_()
    grad_pooled = torch.randn(2, 3, 8, dtype=torch.float64, generator=generator)
    grad_attention = torch.randn(2, 3, len(layers) * (2 if tokens == "cls+ap" else 1),
                                 dtype=torch.float64, generator=generator)
    calls = _spy_calls(monkeypatch)
    pooled, attention = fastfuse.attentive_pool(layers, weight, tokens=tokens,
                                                num_prefix_tokens=num_prefix_tokens, backend=backend)
    loss = ((pooled * grad_pooled.to(device)).sum()
            + (attention * grad_attention.to(device)).sum())
    loss.backward()
    want_pooled, want_attention, _, _, _, want_dw = pool_with_grads(
        [layer.cpu() for layer in layers], weight.cpu(), tokens, num_prefix_tokens, grad_pooled,
        grad_attention)
    tolerance = TOLERANCE[dtype]
    assert rel_err(pooled, want_pooled) < tolerance
    assert rel_err(attention, want_attention) < tolerance
    assert rel_err(weight.grad, want_dw) < tolerance
    if gathers_first(dtype, device, backend):
        # One gathered (B, N, D) stack in both directions: the layers never reach the backend.
        gathered = [(2, want_attention.shape[-1], 8)]
        assert calls == [("forward", "all", gathered), ("backward", "all", gathered)]
    else:
        shapes = [tuple(layer.shape) for layer in layers]
        assert calls == [("forward", tokens, shapes), ("backward", tokens, shapes)]


@pytest.mark.parametrize("case", ["no_grad", "layer_requires_grad", "weight_frozen"])
def test_fused_gather_kept_when_no_frozen_training(backend_device, case, monkeypatch):
    """Inference, a layer that needs its gradient, or no gradient for score_weight: the op
    gathers inside its kernels (the layers are read once there anyway, or must be)."""
    backend, device = backend_device
    layers = _frozen_layers(torch.float64, device, 1)
    if case == "layer_requires_grad":
        layers[1] = layers[1].detach().requires_grad_()
    weight = torch.randn(3, 8, dtype=torch.float64).to(device).requires_grad_(case != "weight_frozen")
    calls = _spy_calls(monkeypatch)
    with torch.set_grad_enabled(case != "no_grad"):
        pooled, attention = fastfuse.attentive_pool(layers, weight, tokens="cls+ap", backend=backend)
    shapes = [tuple(layer.shape) for layer in layers]
    assert calls == [("forward", "cls+ap", shapes)]
    want_pooled, want_attention, _, _ = pool([layer.cpu() for layer in layers], weight.detach().cpu(),
                                             "cls+ap", 1)
    assert rel_err(pooled, want_pooled) < TOLERANCE[torch.float64]
    assert rel_err(attention, want_attention) < TOLERANCE[torch.float64]
    if case == "layer_requires_grad":
        pooled.sum().backward()
        assert calls[-1] == ("backward", "cls+ap", shapes)
        assert layers[1].grad.shape == layers[1].shape


def _huge_layers():
    """float32 patches near 1e37, mostly positive: their float32 sum overflows, their
    average (and every gathered token) does not."""
    generator = torch.Generator().manual_seed(4)
    return [((torch.randn(2, t, 16, generator=generator, dtype=torch.float64) + 2.0) * 1e37).float()
            for t in (60, 45)]


# A loss with a non-trivial dw (sum(pooled) is ~0: normalised tokens sum to 0 over D).
GRAD_POOLED = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(8))


def _check_huge(pooled, attention, weight_grad, huge, weight):
    scaled = [layer.double() / 1e37 for layer in huge]
    # LayerNorm is scale-invariant but for eps, which acts as eps / scale^2 on scaled tokens.
    want_pooled, want_attention, _, _, _, want_dw = pool_with_grads(
        scaled, weight, "ap", 1, GRAD_POOLED, eps=1e-5 / 1e74)
    assert torch.isfinite(pooled).all() and torch.isfinite(weight_grad).all()
    assert rel_err(pooled, want_pooled) < 1e-4
    assert rel_err(attention, want_attention) < 1e-4
    assert rel_err(weight_grad, want_dw) < 1e-3


def test_huge_tokens_patch_average_stays_finite(backend_device, monkeypatch):
    """The gather before the op keeps issue 12 item 7's robustness (CPU: the overflow check
    on the (B, D) average, then the divided-first average for that layer)."""
    backend, device = backend_device
    huge = _huge_layers()
    assert not torch.isfinite(huge[0][:, 1:].sum(dim=1)).all()  # the plain sum does overflow
    weight = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    moved_weight = weight.to(device).requires_grad_()
    calls = _spy_calls(monkeypatch)
    pooled, attention = fastfuse.attentive_pool([layer.to(device) for layer in huge], moved_weight,
                                                tokens="ap", num_prefix_tokens=1, backend=backend)
    (pooled * GRAD_POOLED.to(device)).sum().backward()
    expected = "all" if gathers_first(torch.float32, device, backend) else "ap"
    assert [call[1] for call in calls] == [expected, expected]
    _check_huge(pooled, attention, moved_weight.grad, huge, weight)


def test_huge_tokens_under_torch_compile():
    """Traced, the overflow fallback is the sync-free torch.where form; fullgraph, and the op
    runs on the gathered stack."""
    torch._dynamo.reset()
    huge = _huge_layers()
    weight = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    moved_weight = weight.clone().requires_grad_()

    def step(layers, score_weight):
        return fastfuse.attentive_pool(layers, score_weight, tokens="ap", num_prefix_tokens=1,
                                       backend="torch")

    pooled, attention = torch.compile(step, fullgraph=True, backend="aot_eager")(huge, moved_weight)
    assert attention.shape == (2, 3, 2)
    (pooled * GRAD_POOLED).sum().backward()
    _check_huge(pooled, attention, moved_weight.grad, huge, weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_wide_mean_of_huge_rows_is_finite_and_exact(dtype):
    """gather.wide_mean (the CUDA one-pass average): rows near the dtype's largest value, whose
    float32 sum overflows, average to the float64 oracle's value (run here on CPU tensors)."""
    from fastfuse.gather import wide_mean

    generator = torch.Generator().manual_seed(3)
    largest = torch.finfo(dtype).max
    rows = (torch.rand(3, 40, 16, generator=generator) * 0.5 + 0.45) * largest
    rows = rows.to(dtype)
    average = wide_mean(rows, torch.float32)
    expected = rows.double().mean(dim=1)
    assert average.dtype == torch.float32 and torch.isfinite(average).all()
    assert rel_err(average, expected) < 1e-6


def _cpu_kernels():
    if not fastfuse.backends()["cpu"]["available"]:
        pytest.skip("cpu backend unavailable: " + fastfuse.backends()["cpu"]["reason"])
    importlib.import_module("fastfuse.backends.compiled_ops")  # declares the compiled ops
    return torch.ops.fastfuse


@pytest.mark.parametrize("tokens,num_prefix_tokens",
                         [("all", 0)] + [(spec, p) for spec in ("cls", "ap", "cls+ap") for p in (0, 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cpu_gather_kernel_matches_oracle_stack(tokens, num_prefix_tokens, dtype):
    """fused_gather_tokens (csrc/cpu/gather_tokens.cpp): the oracle's stack of the same layers
    (contiguous, padded and sliced), in the compute dtype; the layers are left untouched."""
    ops = _cpu_kernels()
    layers = _frozen_layers(dtype, "cpu", num_prefix_tokens)
    before = [layer.clone() for layer in layers]
    stack = ops.fused_gather_tokens(layers, tokens, num_prefix_tokens)
    want = stack_tokens([layer.double() for layer in layers], tokens, num_prefix_tokens)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stack.dtype == acc and stack.is_contiguous() and stack.shape == want.shape
    # Half rows are exact in float32; only the averages' rounding differs from the oracle.
    assert rel_err(stack, want) < (1e-14 if dtype == torch.float64 else 1e-6)
    assert all(torch.equal(layer, old) for layer, old in zip(layers, before))


def test_cpu_gather_kernel_huge_patches_and_empty_batch():
    """Rows whose float32 sum overflows average to a finite value (issue 12 item 7), and an
    empty batch gives an empty stack."""
    ops = _cpu_kernels()
    huge = _huge_layers()
    stack = ops.fused_gather_tokens(huge, "cls+ap", 1)
    want = stack_tokens([layer.double() for layer in huge], "cls+ap", 1)
    assert torch.isfinite(stack).all() and rel_err(stack, want) < 1e-6
    empty = ops.fused_gather_tokens([torch.randn(0, 5, 8)], "cls+ap", 1)
    assert empty.shape == (0, 2, 8)


def test_cpu_gather_kernel_opcheck():
    """Schema and fake kernel (fastfuse/op_contract.py: fake_gather) agree with the kernel."""
    ops = _cpu_kernels()
    generator = torch.Generator().manual_seed(3)
    layers = [torch.randn(2, t, 8, dtype=torch.float64, generator=generator) for t in (5, 4)]
    torch.library.opcheck(ops.fused_gather_tokens.default, (layers, "cls+ap", 1),
                          test_utils=("test_schema", "test_faketensor"))
