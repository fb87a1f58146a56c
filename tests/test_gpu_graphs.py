"""CUDA graphs and host synchronisation: the launch paths of the GPU backends and the lockstep
sweep's graphed step. The capture checks need a GPU and skip without one, saying so; the CPU
side (graphs stay off, the step runs as before) runs everywhere."""
import pytest
import torch

import fastfuse
from fastfuse.sweep import graphs

from reference import rel_err

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="CUDA graph capture needs a CUDA GPU (none visible)")


def test_graphs_stay_off_on_cpu(monkeypatch):
    module = torch.nn.Linear(3, 2)
    assert graphs.wrap(module, "cpu") is module and not graphs.enabled("cpu")
    monkeypatch.setenv("FASTFUSE_CUDA_GRAPHS", "0")
    assert not graphs.enabled("cuda")


def _gpu_backends():
    status = fastfuse.backends()
    return [name for name in ("cuda", "triton", "torch")
            if status.get(name, {}).get("available")]


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_training_step_captures_without_synchronising(backend):
    """Forward, backward and a torch AdamW step captured in one CUDA graph, with every
    synchronising call an error while capturing and replaying (torch.cuda.set_sync_debug_mode)."""
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend unavailable: {fastfuse.backends()[backend]['reason']}")
    torch.manual_seed(0)
    probe = fastfuse.AttentiveFusion(dim=64, num_heads=4, num_classes=5, backend=backend).cuda()
    layers = [torch.randn(16, 9, 64, device="cuda") for _ in range(3)]
    labels = torch.randint(0, 5, (16,), device="cuda")
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, capturable=True)

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(probe(layers, tokens="cls+ap"), labels)
        loss.backward()
        optimizer.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: autotuning, the layout's tables, AdamW state
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            loss = step()
        for _ in range(3):
            graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss).all()


@needs_gpu
def test_graphed_forward_matches_eager_and_falls_back_for_other_shapes():
    if "triton" not in _gpu_backends() and "cuda" not in _gpu_backends():
        pytest.skip("no GPU backend available")
    torch.manual_seed(0)
    probe = fastfuse.AttentiveFusion(dim=32, num_heads=2, num_classes=3).cuda().train()
    reference = fastfuse.AttentiveFusion(dim=32, num_heads=2, num_classes=3).cuda().train()
    reference.load_state_dict(probe.state_dict())
    graphed = graphs.wrap(probe, "cuda")
    for batch in (8, 8, 5):  # the last, partial batch runs eagerly
        tokens = torch.randn(batch, 6, 32, device="cuda")
        out, expected = graphed(tokens), reference(tokens)
        out.sum().backward()
        expected.sum().backward()
        assert rel_err(out, expected) < 1e-5
    for param, ref in zip(probe.parameters(), reference.parameters()):
        assert rel_err(param.grad, ref.grad) < 1e-5
    for buffer, ref in zip(probe.buffers(), reference.buffers()):
        torch.testing.assert_close(buffer, ref)
