"""torch.compile: fullgraph matches eager (aot_eager and inductor), and dynamic shapes compile
once for every batch size and token count."""
import copy

import pytest
import torch

from fastfuse import _extension

from helpers import cpu_backend_available, grads_of, make_probe


def _compare_compiled(probe, compiler, make_inputs, call, rtol, atol):
    """Eager and compiled (on a deep copy, so BatchNorm statistics start equal): forward,
    gradients of inputs and parameters, and the updated running statistics."""
    compiled_probe = copy.deepcopy(probe)
    compiled = torch.compile(compiled_probe, fullgraph=True, backend=compiler)
    results = []
    for module, fn in ((compiled_probe, compiled), (probe, probe)):
        inputs = make_inputs()
        logits, attention = call(fn, inputs)
        flat = torch.cat([logits.flatten(), attention.flatten()])
        results.append([flat, *grads_of(flat, inputs, module), module.bn.running_mean])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("form", ["tokens", "layers"])
def test_compile_fullgraph_matches_eager(backend_device, form, monkeypatch):
    backend, device = backend_device
    torch._dynamo.reset()
    # Compiling must also work as the first call of a process, before anything loaded the
    # compiled extension (its loader takes a lock, which dynamo cannot trace).
    monkeypatch.setattr(_extension, "_state", None)
    probe = make_probe(backend, device).train()
    generator = torch.Generator().manual_seed(6)
    if form == "tokens":
        data = [torch.randn(4, 7, 16, generator=generator).to(device)]

        def call(fn, inputs):
            return fn(inputs[0], return_attention=True)
    else:
        data = [torch.randn(4, t, 16, generator=generator).to(device) for t in (6, 9)]

        def call(fn, inputs):
            return fn(inputs, tokens="cls+ap", num_prefix_tokens=2, return_attention=True)

    def make_inputs():
        return [tensor.clone().requires_grad_() for tensor in data]

    _compare_compiled(probe, "aot_eager", make_inputs, call, rtol=1e-6, atol=1e-6)


def test_compile_with_inductor_cpu_backend():
    """The default compiler once (it generates and builds C++ here: ~20 s on two cores)."""
    if not cpu_backend_available()[0]:
        pytest.skip(f"cpu backend unavailable: {cpu_backend_available()[1]}")
    torch._dynamo.reset()
    probe = make_probe("cpu", "cpu").train()
    data = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(7))
    _compare_compiled(probe, "inductor", lambda: [data.clone().requires_grad_()],
                      lambda fn, inputs: fn(inputs[0], return_attention=True), rtol=1e-4, atol=1e-5)


# (batch, tokens per layer) pairs, none 0 or 1 (dynamo specialises those sizes).
DYNAMIC_SIZES = [(2, 5), (3, 7), (5, 4), (4, 11), (6, 9), (3, 13), (7, 6), (2, 17), (5, 10), (4, 3)]


@pytest.mark.parametrize("form", ["tokens", "layers"])
def test_dynamic_shapes_compile_once(backend_device, form):
    """torch.compile(dynamic=True, fullgraph=True) traces one graph for every batch size B and
    token count N (the fake kernels keep sizes symbolic), more sizes than dynamo's recompile
    limit, and the compiled forward and backward match eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    backend, device = backend_device
    torch._dynamo.reset()
    probe = make_probe(backend, device).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(copy.deepcopy(probe), backend=counter, dynamic=True, fullgraph=True)
    generator = torch.Generator().manual_seed(8)
    compiles_after_first_shape = None
    for batch, length in DYNAMIC_SIZES:
        if form == "tokens":
            data = [torch.randn(batch, length, 16, generator=generator).to(device)]
        else:
            data = [torch.randn(batch, length + offset, 16, generator=generator).to(device) for offset in (0, 2)]
        outputs = []
        for fn in (compiled, probe):
            inputs = [tensor.clone().requires_grad_() for tensor in data]
            x = inputs[0] if form == "tokens" else inputs
            kwargs = {} if form == "tokens" else {"tokens": "cls+ap", "num_prefix_tokens": 1}
            logits, attention = fn(x, return_attention=True, **kwargs)
            flat = torch.cat([logits.flatten(), attention.flatten()])
            outputs.append([flat, *torch.autograd.grad(flat.square().sum(), inputs)])
        for got, want in zip(*outputs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if compiles_after_first_shape is None:
            compiles_after_first_shape = counter.frame_count
    # Counted after the first shape: the compiled module's wrapper frame adds an empty graph.
    assert counter.frame_count == compiles_after_first_shape, (
        f"{counter.frame_count - compiles_after_first_shape} recompiles for {len(DYNAMIC_SIZES)} shapes")
