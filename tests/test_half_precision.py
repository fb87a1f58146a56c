"""Half-precision tokens on every backend: computed in float32, gradients in the tokens' dtype;
a backend that does not declare a dtype refuses it (explicit) or is skipped with one warning."""
import dataclasses
import warnings

import pytest
import torch

from helpers import dispatch, grads_of, make_probe
from reference import TOLERANCE, rel_err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_tokens_accumulate_in_float32(backend_device, dtype):
    """Every backend here declares half dtypes: half tokens are computed in float32, so the
    result equals (to float32 rounding) that of the same values passed as float32."""
    backend, device = backend_device
    assert dtype in dispatch.get(backend).dtypes
    probe = make_probe(backend, device, dim=24, heads=3).eval()
    generator = torch.Generator().manual_seed(8)
    data = [torch.randn(3, t, 24, generator=generator).to(device=device, dtype=dtype) for t in (9, 6)]
    results = []
    for as_dtype in (dtype, torch.float32):
        layers = [layer.to(as_dtype).requires_grad_() for layer in data]
        logits, attention = probe(layers, tokens="cls+ap", return_attention=True)
        assert logits.dtype == attention.dtype == torch.float32
        flat = torch.cat([logits.flatten(), attention.flatten()])
        grads = grads_of(flat, layers, probe)
        assert grads[0].dtype == as_dtype  # layer gradients come back in the layer's dtype
        results.append([flat, *grads])
    (flat, *grads), (flat_32, *grads_32) = results
    torch.testing.assert_close(flat, flat_32, rtol=1e-5, atol=1e-6)
    for index, (grad, grad_32) in enumerate(zip(grads, grads_32)):
        tolerance = TOLERANCE[dtype] if index < len(data) else 1e-5  # layer grads are rounded
        error = rel_err(grad, grad_32)
        assert error <= tolerance, f"gradient {index}: relative error {error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_module_with_float32_parameters_takes_half_tokens(dtype):
    """auto backend: half tokens are close to the float32 result of the unrounded tokens."""
    probe = make_probe(None, "cpu", dim=32, heads=4).eval()
    tokens = torch.randn(6, 20, 32, generator=torch.Generator().manual_seed(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every backend "auto" picks on CPU takes half tokens
        logits = probe(tokens.to(dtype))
    expected = probe(tokens)
    assert logits.dtype == torch.float32 and rel_err(logits, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_backend_without_half_dtypes_refuses_with_type_error_or_auto_falls_back(dtype, monkeypatch):
    """A backend that does not declare a dtype: asked for explicitly, a TypeError naming the
    dtype; under "auto", the pure-PyTorch backend with one warning. (No backend here lacks
    half support today, so one is simulated: the cpu entry limited to float32/float64.)"""
    limited = dataclasses.replace(dispatch.get("cpu"), availability=lambda: (True, "simulated"),
                                  dtypes=(torch.float32, torch.float64))
    monkeypatch.setitem(dispatch._BACKENDS, "cpu", limited)
    monkeypatch.setattr(dispatch, "_warned", set())
    tokens = torch.randn(3, 5, 16).to(dtype)
    with pytest.raises(TypeError, match=f"backend 'cpu' cannot run this input.*dtype {dtype}"):
        make_probe("cpu", "cpu")(tokens)
    probe = make_probe(None, "cpu").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            logits = probe(tokens)
    messages = [str(w.message) for w in caught if "fastfuse" in str(w.message)]
    assert len(messages) == 1 and "pure-PyTorch" in messages[0] and str(dtype) in messages[0], messages
    torch.testing.assert_close(logits, make_probe("torch", "cpu").eval()(tokens))
