"""pytest-benchmark cases for the fused op alone: fastfuse.attentive_pool per backend, forward
and forward + backward, at the paper's shapes, beside the paper probe's own pooling (the
attentive block with K/V projections). Not part of ``pytest tests``; run and compare with:

    pytest benchmarks --benchmark-autosave            # saves .benchmarks/<machine>/0001_*.json
    pytest-benchmark compare 0001 0002                # two saved runs side by side
"""
import pytest
import torch

import fastfuse
from fastfuse.paper import PaperAttentiveBlock

BATCH = 256
SHAPES = {"vits-n24": (24, 384, 6), "vitb-n24": (24, 768, 12), "vitl-n48": (48, 1024, 16)}


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backend_params():
    params = []
    for device in _devices():
        for name, entry in fastfuse.backends().items():
            runs_here = entry["available"] and device in entry["devices"]
            if name == "triton" and device == "cpu":
                continue  # the Triton interpreter checks correctness, it is not a speed
            marks = [] if runs_here else [pytest.mark.skip(reason=f"{name}: {entry['reason']}")]
            params.append(pytest.param(name, device, id=f"fastfuse-{name}-{device}", marks=marks))
        params.append(pytest.param("paper", device, id=f"paper-{device}"))
    return params


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _pool_call(impl, device, shape, backward):
    """A no-argument call pooling (B, N, D) tokens once (and back-propagating to the weights)."""
    num_tokens, dim, heads = shape
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(BATCH, num_tokens, dim, generator=generator).to(device)
    if impl == "paper":
        block = PaperAttentiveBlock(dim, heads, 2 * (dim // heads)).to(device)
        query = (torch.randn(1, 1, dim, generator=generator) * 0.02).to(device)

        def pool():
            return block(query.expand(BATCH, -1, -1), tokens)[0]
        params = list(block.parameters())
    else:
        weight = (torch.randn(heads, dim, generator=generator) * 0.1).to(device)
        weight.requires_grad_(backward)

        def pool():
            return fastfuse.attentive_pool(tokens, weight, backend=impl)[0]
        params = [weight]

    def call():
        if backward:
            for param in params:
                param.grad = None
            pooled = pool()
            pooled.backward(torch.ones_like(pooled))
        else:
            with torch.no_grad():
                pool()
        _sync(device)
    return call


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl,device", _backend_params())
def test_pool(benchmark, impl, device, shape_name, passes):
    benchmark.group = f"{shape_name} B={BATCH} {passes}"
    call = _pool_call(impl, device, SHAPES[shape_name], backward=passes != "forward")
    call()  # warm-up: thread pools, workspaces, kernel compilation
    benchmark(call)
