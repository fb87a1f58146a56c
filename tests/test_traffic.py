"""The traffic model of the Triton launches (fastfuse/bench/traffic.py): its global-memory
count against the bytes the kernels really load and store (the Triton interpreter, instrumented),
and its DRAM ratios at the issue's shapes (a), (b), (c)."""
import numpy as np
import pytest
import torch

import fastfuse
from fastfuse.bench import traffic

_STATUS = fastfuse.backends().get("triton", {"available": False, "reason": "not registered"})


@pytest.mark.parametrize("index", [0, 1, 2], ids=["a", "b", "c"])
def test_forward_ratio(index):
    result = traffic.forward_traffic(traffic.SHAPES[index])
    assert result.ratio <= 1.25, result


@pytest.mark.parametrize("index", [0, 1, 2], ids=["a", "b", "c"])
def test_backward_ratio(index):
    for layers_need_grad in (False, True):
        result = traffic.backward_traffic(traffic.SHAPES[index], layers_need_grad=layers_need_grad)
        assert result.ratio <= 1.5, result


def test_minimum_counts_each_needed_row_once():
    shape = traffic.Shape("t", 4, 3, 10, 64, 2, "cls+ap", num_prefix_tokens=1, itemsize=4)
    assert traffic._rows_read(shape) == 3 * 10  # CLS + 9 patch rows per layer
    assert traffic._rows_read(traffic.Shape("t", 4, 3, 10, 64, 2, "ap", 2, 4)) == 3 * 8


def _count_interpreted(monkeypatch, run, token_tensor):
    """Run ``run()`` under the instrumented interpreter: (bytes loaded, bytes stored, token
    bytes loaded), unmasked lanes x element size."""
    from triton.runtime import interpreter

    counted = {"load": 0, "store": 0, "tokens": 0}
    low = token_tensor.data_ptr()
    high = low + token_tensor.numel() * token_tensor.element_size()
    original_load = interpreter.InterpreterBuilder.create_masked_load
    original_store = interpreter.InterpreterBuilder.create_masked_store

    def size(ptrs):
        return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize

    def load(self, ptrs, mask, other, *args):
        active = np.broadcast_to(mask.data, ptrs.data.shape)
        counted["load"] += int(active.sum()) * size(ptrs)
        addresses = ptrs.data[active]
        counted["tokens"] += int(((addresses >= low) & (addresses < high)).sum()) * size(ptrs)
        return original_load(self, ptrs, mask, other, *args)

    def store(self, ptrs, value, mask, *args):
        counted["store"] += int(np.broadcast_to(mask.data, ptrs.data.shape).sum()) * size(ptrs)
        return original_store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", store)
    run()
    monkeypatch.undo()
    return counted


needs_interpreter = pytest.mark.skipif(not _STATUS["available"] or torch.cuda.is_available(),
                                       reason="counts through the Triton interpreter (CPU tensors)")


def _interpreter_config():
    from fastfuse.kernels.triton.configs import _INTERPRETER

    return (_INTERPRETER["BLOCK_N"], _INTERPRETER["BLOCK_D"], _INTERPRETER["BLOCK_H"])


@needs_interpreter
def test_forward_global_bytes_match_the_interpreter(monkeypatch):
    """The model's global bytes against the loads and stores the interpreted kernel issues."""
    from fastfuse.backends import triton as launcher

    shape = traffic.Shape("small", 3, 1, 70, 72, 18, "all", num_prefix_tokens=0, itemsize=4)
    tokens = torch.randn(shape.batch, shape.layer_tokens, shape.dim)
    weight = torch.randn(shape.heads, shape.dim)
    counted = _count_interpreted(monkeypatch, lambda: launcher.forward([tokens], weight, "all", 0, 1e-5), tokens)
    model = traffic.forward_traffic(shape, config=_interpreter_config())
    assert counted["tokens"] == model.global_bytes["layers"][0]
    assert counted["load"] == pytest.approx(model.global_read, rel=0.02)
    assert counted["store"] == pytest.approx(model.global_written, rel=0.02)


@needs_interpreter
def test_backward_token_bytes_match_the_interpreter(monkeypatch):
    """The backward's token reads (the dominant term) as the interpreted kernel issues them."""
    from fastfuse.backends import triton as launcher

    shape = traffic.Shape("small", 3, 1, 70, 72, 18, "all", num_prefix_tokens=0, itemsize=4)
    tokens = torch.randn(shape.batch, shape.layer_tokens, shape.dim)
    weight = torch.randn(shape.heads, shape.dim)
    outputs = launcher.forward([tokens], weight, "all", 0, 1e-5)
    grad = torch.randn_like(outputs[0])
    counted = _count_interpreted(
        monkeypatch, lambda: launcher.backward(grad, None, [tokens], weight, *outputs, "all", 0, False), tokens)
    model = traffic.backward_traffic(shape, config=_interpreter_config())
    assert counted["tokens"] == model.global_bytes["layers"][0]
