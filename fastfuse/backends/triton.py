"""The "triton" backend: the Triton kernels of fastfuse/kernels/triton behind the fused op.

The launchers are plain functions (the contract of fastfuse/op_contract.py) in the backend
table: the public op ``fastfuse::attentive_pool`` is opaque to torch.compile and calls them
when it runs, so they need no op registration of their own and never see fake tensors.
triton is imported on first use: ``import fastfuse`` stays fast and works without triton.

On a machine without a GPU, TRITON_INTERPRET=1 runs the same kernels on CPU tensors (slowly);
that is how CI checks them. float16, bfloat16 and float32 tokens accumulate in float32, float64
tokens in float64 (the same kernels with a float64 accumulator: cheap to keep, and it lets the
float64 reference tests run this backend too).

Layers are read where they lie: one pointer (layers[0]) plus each layer's offset from it in
elements, taken from the tensors' addresses, and each layer's strides (kernels/triton/tokens.py).
"""
from __future__ import annotations

import functools
import os

import torch

from ..gather import num_gathered_tokens
from ..op_contract import compute_dtype
from .base import Backend

# Persistent grids, in programs per SM, each program looping over samples: about what fits on
# an SM at once (configs.py: up to 4 register-capped forward programs, about 2 uncapped backward
# ones), so that each program's scratch slot and dw partial is reused while it is hot in L2,
# and the dw partials to zero and sum stay few.
FORWARD_PROGRAMS_PER_SM = 4
BACKWARD_PROGRAMS_PER_SM = 2
# Token addressing modes (kernels/triton/tokens.py).
AFFINE, TABLE, GATHERED = 0, 1, 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _availability() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as error:
        return False, f"triton is not installed ({error})"
    if _kernels.cache_info().currsize and _kernels()[2] != _interpreting():
        return False, ("the Triton kernels were loaded with TRITON_INTERPRET="
                       f"{int(_kernels()[2])}, which has changed since: restart the process")
    if _interpreting():
        return True, (f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): the kernels "
                      "run on CPU tensors, slowly")
    if not torch.cuda.is_available():
        return False, ("no CUDA GPU visible (set TRITON_INTERPRET=1 to run the Triton kernels on "
                       "CPU tensors through the interpreter)")
    return True, f"Triton {triton.__version__} kernels on {torch.cuda.get_device_name()}"


@functools.lru_cache(maxsize=None)
def _kernels():
    """(forward kernel, backward kernel, interpreted?), imported on first use (see __init__)."""
    from ..kernels.triton.pool_backward import pool_backward_kernel
    from ..kernels.triton.pool_forward import pool_forward_kernel

    return pool_forward_kernel, pool_backward_kernel, _interpreting()


def _dot_options(dtype: torch.dtype) -> dict:
    """Accumulation dtype and dot precision. Half tokens: tf32 tensor cores (their rounding,
    2^-11, is that of a float16 input). float32 / float64 tokens: exact dots ("ieee"; 3xTF32
    would be faster but its split operands spill registers). The interpreter and ROCm: ieee."""
    import triton.language as tl

    accumulate = tl.float64 if dtype == torch.float64 else tl.float32
    half = dtype in (torch.float16, torch.bfloat16)
    precise = _interpreting() or torch.version.hip or not half
    return dict(ACC=accumulate, DOT_PRECISION="ieee" if precise else "tf32")


def _addressing(num_layers: int, tokens: str) -> int:
    if tokens == "all":
        return AFFINE if num_layers == 1 else TABLE
    return GATHERED if tokens in ("ap", "cls+ap") else TABLE


@functools.lru_cache(maxsize=256)
def _plan(lengths: tuple, strides: tuple, tokens: str, num_prefix_tokens: int, dim: int):
    """(token table rows, per-layer (length, cls token, ap token)) for one layout of layers.

    Token rows: (layer, row offset, batch stride, row stride, row count, grad row offset,
    grad batch stride), the column order of kernels/triton/tokens.py. Gradients are
    contiguous (B, T_l, D).
    """
    token_rows, layer_rows = [], []
    for layer, (length, (batch_stride, row_stride, _)) in enumerate(zip(lengths, strides)):
        grad_batch_stride = length * dim
        cls_token = ap_token = -1
        if tokens == "all":
            token_rows.extend((layer, row * row_stride, batch_stride, 0, 1, row * dim, grad_batch_stride)
                              for row in range(length))
        if tokens in ("cls", "cls+ap"):
            cls_token = len(token_rows)
            token_rows.append((layer, 0, batch_stride, 0, 1, 0, grad_batch_stride))
        if tokens in ("ap", "cls+ap"):
            ap_token = len(token_rows)
            token_rows.append((layer, num_prefix_tokens * row_stride, batch_stride, row_stride,
                               length - num_prefix_tokens, num_prefix_tokens * dim, grad_batch_stride))
        layer_rows.append((length, cls_token, ap_token))
    return tuple(token_rows) or ((0,) * 7,), tuple(layer_rows)


@functools.lru_cache(maxsize=64)
def _token_table(layout: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(_plan(*layout)[0], dtype=torch.int64, device=device)


def _element_offsets(tensors) -> list[int]:
    """Each tensor's address minus the first one's, in elements (0 for a single tensor)."""
    if len(tensors) == 1:
        return [0]
    addresses = [tensor.data_ptr() for tensor in tensors]
    size = tensors[0].element_size()
    offsets = []
    for address in addresses:
        delta = address - addresses[0]
        if delta % size:
            raise RuntimeError("the triton backend needs every layer aligned to its element size")
        offsets.append(delta // size)
    return offsets


def _same_feature_stride(layers):
    """The kernels take one feature stride for all layers; a layer that differs is copied."""
    stride_d = layers[0].stride(2)
    if all(layer.stride(2) == stride_d or layer.shape[2] <= 1 for layer in layers):
        return list(layers), stride_d
    return [layer if layer.stride(2) == 1 else layer.contiguous() for layer in layers], 1


def _row_alignment(layers, offsets, token_rows, stride_d) -> int:
    """Elements per 16 bytes when every row the kernels address starts 16-byte aligned, else 1
    (a hint for vector loads; the AFFINE form gets it from Triton's own argument analysis)."""
    vector = 16 // layers[0].element_size()
    if stride_d != 1 or layers[0].data_ptr() % 16:
        return 1
    values = list(offsets) + [value for row in token_rows for value in row[1:4]]
    return vector if all(value % vector == 0 for value in values) else 1


def _programs(batch: int, device: torch.device, per_sm: int | None) -> int:
    """Grid size: one program per sample (per_sm None), else a persistent grid."""
    if _interpreting():
        return min(batch, 2)  # exercises the per-program sample loop; the interpreter is serial
    if per_sm is None:
        return batch
    return min(batch, per_sm * torch.cuda.get_device_properties(device).multi_processor_count)


def _tables(layers, grads, tokens, num_prefix_tokens):
    """(addressing, token table, layer table, row alignment) for the kernels (tokens.py)."""
    addressing = _addressing(len(layers), tokens)
    device = layers[0].device
    if addressing == AFFINE:  # token n of sample b is row b * stride_b + n * stride_t: no tables
        unused = torch.zeros(1, dtype=torch.int64, device=device)
        return addressing, unused, unused, 1
    layout = (tuple(layer.shape[1] for layer in layers), tuple(tuple(layer.stride()) for layer in layers),
              tokens, num_prefix_tokens, layers[0].shape[2])
    token_rows, layer_rows = _plan(*layout)
    offsets = _element_offsets(layers)
    grad_offsets = _element_offsets(grads) if grads is not None else [0] * len(layers)
    token_table = _token_table(layout, device)
    layer_table = torch.tensor([(offset, grad_offset) + row for offset, grad_offset, row
                                in zip(offsets, grad_offsets, layer_rows)], dtype=torch.int64, device=device)
    return addressing, token_table, layer_table, _row_alignment(layers, offsets, token_rows, layers[0].stride(2))


def _forward(layers, score_weight, tokens, num_prefix_tokens, eps):
    layers, stride_d = _same_feature_stride(layers)
    first = layers[0]
    batch, _, dim = first.shape
    heads = score_weight.shape[0]
    num_tokens = num_gathered_tokens([layer.shape[1] for layer in layers], tokens)
    acc = compute_dtype(first.dtype)
    score_weight = score_weight.to(acc).contiguous()
    pooled = first.new_empty((batch, heads, dim), dtype=acc)
    attention = first.new_empty((batch, heads, num_tokens), dtype=acc)
    mean = first.new_empty((batch, num_tokens), dtype=acc)
    rstd = first.new_empty((batch, num_tokens), dtype=acc)
    if batch == 0 or num_tokens == 0 or dim == 0:
        return pooled.zero_(), attention, mean, rstd
    addressing, token_table, layer_table, row_align = _tables(layers, None, tokens, num_prefix_tokens)
    # Only the gathered form has per-program scratch; the others take one program per sample.
    programs = _programs(batch, first.device, FORWARD_PROGRAMS_PER_SM if addressing == GATHERED else None)
    scratch = first.new_empty((programs, num_tokens, dim) if addressing == GATHERED else (1,), dtype=acc)
    kernel = _kernels()[0]
    kernel[(programs,)](
        first, token_table, layer_table, score_weight, scratch, pooled, attention, mean, rstd,
        batch, num_tokens, dim, heads, first.stride(0), first.stride(1), stride_d, eps,
        ADDRESSING=addressing, ROW_ALIGN=row_align, **_dot_options(first.dtype))
    return pooled, attention, mean, rstd


def _backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
              tokens, num_prefix_tokens, layers_need_grad):
    layers, stride_d = _same_feature_stride(layers)
    first = layers[0]
    batch, _, dim = first.shape
    heads = score_weight.shape[0]
    num_tokens = attention.shape[-1]
    acc = compute_dtype(first.dtype)
    # "cls" writes row 0 of each layer only; every other spec writes every row.
    allocate = torch.zeros if tokens == "cls" and layers_need_grad else torch.empty
    grads = [allocate(layer.shape, dtype=layer.dtype, device=layer.device) for layer in layers]
    if batch == 0 or num_tokens == 0 or dim == 0:
        return [grad.zero_() for grad in grads] if layers_need_grad else [], torch.zeros_like(score_weight)
    weight = score_weight.to(acc).contiguous()
    addressing, token_table, layer_table, row_align = _tables(layers, grads, tokens, num_prefix_tokens)
    programs = _programs(batch, first.device, BACKWARD_PROGRAMS_PER_SM)
    options = dict(dtype=acc, device=first.device)
    grad_weight = torch.zeros((programs, heads, dim), **options)
    token_scratch = torch.empty((programs, 2, num_tokens, dim) if addressing == GATHERED else (1,), **options)
    head_scratch = torch.empty((programs, 2, heads, num_tokens), **options)
    row_scratch = torch.empty((programs, 2, num_tokens), **options)
    grad_pooled = grad_pooled.to(acc).contiguous()
    attention, mean, rstd = (value.to(acc).contiguous() for value in (attention, mean, rstd))
    if grad_attention is not None:
        grad_attention = grad_attention.to(acc).contiguous()
    kernel = _kernels()[1]
    kernel[(programs,)](
        first, token_table, layer_table, weight, grad_pooled,
        attention if grad_attention is None else grad_attention,
        attention, mean, rstd,
        grads[0], grad_weight, token_scratch, head_scratch, row_scratch,
        batch, num_tokens, dim, heads, len(layers), num_prefix_tokens,
        first.stride(0), first.stride(1), stride_d,
        ADDRESSING=addressing, HAS_GRAD_ATTENTION=grad_attention is not None,
        ROW_ALIGN=row_align, NEED_DX=layers_need_grad, **_dot_options(first.dtype))
    # Per-program partials summed in a fixed order: deterministic. Frozen features
    # (layers_need_grad false): the kernel computes dw only and the unwritten grads are dropped.
    return grads if layers_need_grad else [], grad_weight.sum(dim=0).to(score_weight.dtype)


def forward(layers, score_weight, tokens, num_prefix_tokens, eps):
    return _forward(list(layers), score_weight, tokens, num_prefix_tokens, eps)


def backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
             tokens, num_prefix_tokens, layers_need_grad=True):
    grad_layers, grad_weight = _backward(grad_pooled, grad_attention, list(layers), score_weight,
                                         pooled, attention, mean, rstd, tokens, num_prefix_tokens,
                                         layers_need_grad)
    return list(grad_layers), grad_weight


BACKEND = Backend("triton", ("cuda", "cpu") if _interpreting() else ("cuda",), _availability,
                  forward, backward)
