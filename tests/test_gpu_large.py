"""A layer of more than 2^31 elements (int64 indexing in the kernels): GPU only, skipped
without one (a CPU run through the interpreter would take hours)."""
import pytest
import torch

import fastfuse

from reference import rel_err

needs_big_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
    reason="needs a CUDA GPU with >= 24 GiB (a 4.3 GB bf16 layer plus its gradient)")


@needs_big_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_layer_over_two_to_the_31_elements(backend):
    if not fastfuse.backends().get(backend, {}).get("available"):
        pytest.skip(f"{backend} backend unavailable")
    batch, length, dim = 1400, 2000, 768          # 2.15e9 elements > 2^31
    layer = torch.empty((batch, length, dim), dtype=torch.bfloat16, device="cuda").normal_()
    weight = torch.randn(4, dim, device="cuda") * 0.3
    pooled, attention = fastfuse.attentive_pool([layer], weight, tokens="cls+ap", backend=backend)
    tail = slice(batch - 3, batch)                 # the samples whose rows lie past 2^31
    expected_pooled, expected_attention = fastfuse.attentive_pool(
        [layer[tail].float()], weight, tokens="cls+ap", backend="torch")
    assert rel_err(pooled[tail], expected_pooled) < 1e-2
    assert rel_err(attention[tail], expected_attention) < 1e-2
