"""The "triton" backend: the Triton kernels of fastfuse/kernels/triton behind the fused op.

The launchers are plain functions (the contract of fastfuse/op_contract.py) in the backend
table: the public op ``fastfuse::attentive_pool`` is opaque to torch.compile and calls them
when it runs, so they need no op registration of their own. triton is imported on first use:
``import fastfuse`` stays fast and works without triton.

On a machine without a GPU, TRITON_INTERPRET=1 runs the same kernels on CPU tensors (slowly);
that is how CI checks them. float16, bfloat16 and float32 tokens accumulate in float32, float64
tokens in float64 (the same kernels with a float64 accumulator: cheap to keep, and it lets the
float64 reference tests run this backend too).

Layers are read where they lie: a tuple of pointers (the layers themselves, kernel arguments)
plus a token table of row offsets and strides relative to each token's layer
(kernels/triton/tokens.py). The table depends on shapes and strides only: it is copied to the
device once per layout and cached; a call copies nothing from the host and never waits for the
device, so a training step can be captured in a CUDA graph (after one warm-up call per layout,
which CUDA graphs need anyway). The public op ``fastfuse::attentive_pool`` is opaque to
torch.compile, so the kernels run as they do eagerly.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

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
    """(token table rows, layer table rows) for one layout of layers: shapes and strides only,
    never addresses, so a layout's tables hold for every call with that layout.

    Token rows: (layer, row offset, batch stride, row stride, row count, grad row offset,
    grad batch stride), the column order of kernels/triton/tokens.py; offsets relative to the
    token's layer. Layer rows: (length, cls token, ap token). Gradients are contiguous
    (B, T_l, D).
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


# The device copies of the tables, one per (layout, device): built (one host-to-device copy)
# on the first call with a layout, then only read. Keyed by shapes and strides, never by
# addresses, so the caching allocator's reuse of memory cannot make an entry stale.
_DEVICE_TABLES: dict = {}
_DEVICE_TABLES_MAX = 256


def _device_tables(layout: tuple, device: torch.device, tracing: bool):
    """(token table, layer table) for ``layout`` on ``device``, int64."""
    key = (layout, str(device))
    tables = _DEVICE_TABLES.get(key)
    if tables is None:
        token_rows, layer_rows = _plan(*layout)
        tables = tuple(torch.tensor(rows, dtype=torch.int64, device=device)
                       for rows in (token_rows, layer_rows))
        if tracing:  # fake / functional tensors: a constant of this trace, never cached
            return tables
        if len(_DEVICE_TABLES) >= _DEVICE_TABLES_MAX:
            _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))
        _DEVICE_TABLES[key] = tables
    return tables


def _tracing(tensor: torch.Tensor) -> bool:
    """True for the fake / functional tensors of a torch.compile trace (no storage)."""
    try:
        tensor.data_ptr()
    except RuntimeError:
        return True
    return False


def _same_feature_stride(layers):
    """The kernels take one feature stride for all layers; a layer that differs is copied."""
    stride_d = layers[0].stride(2)
    if all(layer.stride(2) == stride_d or layer.shape[2] <= 1 for layer in layers):
        return list(layers), stride_d
    return [layer if layer.stride(2) == 1 else layer.contiguous() for layer in layers], 1


def _alignment(values, element_size: int) -> int:
    """Elements per 16 bytes when every offset in ``values`` is a multiple of 16 bytes, else 1:
    a hint for vector loads / stores. Each layer's own base address is a pointer argument,
    whose 16-byte alignment Triton checks itself (its pointer specialisation)."""
    vector = max(16 // element_size, 1)
    return vector if all(value % vector == 0 for value in values) else 1


class LaunchPlan(NamedTuple):
    """What the launchers decide for one call, from shapes, strides and dtypes only (the
    traffic model, fastfuse/bench/traffic.py, reads the same decisions)."""
    addressing: int          # AFFINE / TABLE / GATHERED
    num_tokens: int          # N
    row_align: int           # ROW_ALIGN: elements per 16-byte vector, or 1
    grad_align: int          # GRAD_ALIGN, the same for the (contiguous) gradients
    layout: tuple | None     # the key of the device tables (None for AFFINE: no tables)
    batch_bucket: int        # the batch rounded up to a power of two (autotune key)
    dim_align: int = 1       # DIM_ALIGN: elements per 16-byte vector when they divide D and 16 does not


def plan(shapes, strides, element_size: int, tokens: str, num_prefix_tokens: int) -> LaunchPlan:
    """The launch decisions for layers of these (B, T_l, D) shapes and strides (elements)."""
    batch, _, dim = shapes[0]
    lengths = tuple(shape[1] for shape in shapes)
    addressing = _addressing(len(shapes), tokens)
    num_tokens = num_gathered_tokens(list(lengths), tokens)
    stride_d = strides[0][2]
    grad_align = _alignment([dim], element_size)
    # Triton states D % 16 == 0 itself; between that and one vector (D = 1000) the kernels say it.
    dim_align = grad_align if dim % 16 else 1
    bucket = 1 << max(int(batch) - 1, 0).bit_length()
    if addressing == AFFINE:
        row_align = _alignment([strides[0][0], strides[0][1]], element_size) if stride_d == 1 else 1
        return LaunchPlan(addressing, num_tokens, row_align, grad_align, None, bucket, dim_align)
    layout = (lengths, tuple(tuple(stride) for stride in strides), tokens, num_prefix_tokens, dim)
    token_rows, _ = _plan(*layout)
    offsets = [value for row in token_rows for value in row[1:4]]
    row_align = _alignment(offsets, element_size) if stride_d == 1 else 1
    return LaunchPlan(addressing, num_tokens, row_align, grad_align, layout, bucket, dim_align)


def persistent_programs(batch: int, multiprocessors: int, l2_bytes: int, per_sm: int,
                        sample_bytes: int) -> int:
    """Programs of a persistent grid: ``per_sm`` per SM, fewer when each program's per-sample
    working set (``sample_bytes``: its scratch slot, its dw partial, ...) would not fit its share
    of L2 -- its re-reads would then come from DRAM (fastfuse/bench/traffic.py) -- but never
    fewer than one per SM; never more than the batch."""
    programs = per_sm * multiprocessors
    if sample_bytes > 0:
        programs = min(programs, max(multiprocessors, l2_bytes // (2 * sample_bytes)))
    return max(1, min(batch, programs))


def _programs(batch: int, device: torch.device, per_sm: int | None, sample_bytes: int = 0) -> int:
    """Grid size: one program per sample (per_sm None), else a persistent grid."""
    if _interpreting():
        return min(batch, 2)  # exercises the per-program sample loop; the interpreter is serial
    if per_sm is None:
        return batch
    multiprocessors, l2_bytes = _device_caches(device)
    return persistent_programs(batch, multiprocessors, l2_bytes, per_sm, sample_bytes)


@functools.lru_cache(maxsize=None)
def _device_caches(device) -> tuple[int, int]:
    properties = torch.cuda.get_device_properties(device)
    return properties.multi_processor_count, int(getattr(properties, "L2_cache_size", 40 * 2**20))


def forward_sample_bytes(addressing: int, num_tokens: int, dim: int, heads: int, acc_size: int) -> int:
    """A forward program's per-sample working set: the scratch slot (GATHERED) and the pooled
    rows it accumulates into."""
    return (num_tokens * dim * acc_size if addressing == GATHERED else 0) + heads * dim * acc_size


def backward_sample_bytes(addressing: int, num_tokens: int, dim: int, heads: int, acc_size: int,
                          token_size: int) -> int:
    """A backward program's: the sample's tokens (pass 2 reads them again: GATHERED, from the
    scratch slot, which holds their gradient too), g and the dw partial."""
    tokens = 2 * num_tokens * dim * acc_size if addressing == GATHERED else num_tokens * dim * token_size
    return tokens + 2 * heads * dim * acc_size


def _launch_plan(layers, tokens, num_prefix_tokens):
    """(plan, token table, layer table) for these layers: no host-to-device copy once the
    layout has been seen (the tables are cached per layout), no read of any address."""
    first = layers[0]
    launch = plan([tuple(layer.shape) for layer in layers], [tuple(layer.stride()) for layer in layers],
                  first.element_size(), tokens, num_prefix_tokens)
    if launch.layout is None:  # AFFINE: row b * stride_b + n * stride_t; no table (the
        token_table = layer_table = first  # kernel never reads this pointer argument)
    else:
        token_table, layer_table = _device_tables(launch.layout, first.device, _tracing(first))
    return launch, token_table, layer_table


def _slot_row(dim: int) -> int:
    """The scratch slots' row stride: D rounded up to 16 elements (kernels/triton/tokens.py)."""
    return -(-dim // 16) * 16


def _forward(layers, score_weight, tokens, num_prefix_tokens, eps, normalize):
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
    launch, token_table, _ = _launch_plan(layers, tokens, num_prefix_tokens)
    addressing = launch.addressing
    # Only the gathered form has per-program scratch; the others take one program per sample.
    programs = _programs(batch, first.device, FORWARD_PROGRAMS_PER_SM if addressing == GATHERED else None,
                         forward_sample_bytes(addressing, num_tokens, dim, heads, pooled.element_size()))
    scratch = first.new_empty((programs, num_tokens, _slot_row(dim)) if addressing == GATHERED else (1,), dtype=acc)
    softmax_state = first.new_empty((programs, 2, heads), dtype=acc)  # running max and sum
    kernel = _kernels()[0]
    torch.library.wrap_triton(kernel)[(programs,)](
        tuple(layers), token_table, score_weight, scratch, softmax_state, pooled, attention, mean, rstd,
        batch, num_tokens, dim, heads, first.stride(0), first.stride(1), stride_d, eps,
        launch.batch_bucket, TOKEN_DTYPE=str(first.dtype).removeprefix("torch."),
        ADDRESSING=addressing, ROW_ALIGN=launch.row_align, DIM_ALIGN=launch.dim_align,
        LAYERNORM=normalize == "layernorm", SMALLEST_NORMAL=torch.finfo(acc).tiny, **_dot_options(first.dtype))
    return pooled, attention, mean, rstd


def _backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
              tokens, num_prefix_tokens, layers_need_grad, normalize):
    layers, stride_d = _same_feature_stride(layers)
    first = layers[0]
    batch, _, dim = first.shape
    heads = score_weight.shape[0]
    num_tokens = attention.shape[-1]
    acc = compute_dtype(first.dtype)
    if layers_need_grad:
        # "cls" writes row 0 of each layer only; every other spec writes every row.
        allocate = torch.zeros if tokens == "cls" else torch.empty
        grads = [allocate(layer.shape, dtype=layer.dtype, device=layer.device) for layer in layers]
    else:  # frozen features: the kernel writes no gradient (NEED_DX false), none is allocated
        grads = []
    if batch == 0 or num_tokens == 0 or dim == 0:
        return [grad.zero_() for grad in grads], torch.zeros_like(score_weight)
    weight = score_weight.to(acc).contiguous()
    launch, token_table, layer_table = _launch_plan(layers, tokens, num_prefix_tokens)
    addressing = launch.addressing
    programs = _programs(batch, first.device, BACKWARD_PROGRAMS_PER_SM,
                         backward_sample_bytes(addressing, num_tokens, dim, heads, weight.element_size(),
                                               first.element_size()))
    options = dict(dtype=acc, device=first.device)
    grad_weight = torch.zeros((programs, heads, dim), **options)
    token_scratch = torch.empty((programs, 2, num_tokens, _slot_row(dim)) if addressing == GATHERED else (1,),
                                **options)
    head_scratch = torch.empty((programs, 2, heads, num_tokens), **options)
    row_scratch = torch.empty((programs, 2, num_tokens), **options)
    grad_pooled = grad_pooled.to(acc).contiguous()
    attention, mean, rstd = (value.to(acc).contiguous() for value in (attention, mean, rstd))
    if grad_attention is not None:
        grad_attention = grad_attention.to(acc).contiguous()
    kernel = _kernels()[1]
    torch.library.wrap_triton(kernel)[(programs,)](
        tuple(layers), token_table, layer_table, weight, grad_pooled,
        attention if grad_attention is None else grad_attention,
        attention, mean, rstd,
        # Frozen features: the layers stand in for the gradients (same dtype), never written.
        tuple(grads) if layers_need_grad else tuple(layers),
        grad_weight, token_scratch, head_scratch, row_scratch,
        batch, num_tokens, dim, heads, num_prefix_tokens,
        first.stride(0), first.stride(1), stride_d, launch.batch_bucket,
        TOKEN_DTYPE=str(first.dtype).removeprefix("torch."),
        ADDRESSING=addressing, HAS_GRAD_ATTENTION=grad_attention is not None,
        ROW_ALIGN=launch.row_align, GRAD_ALIGN=launch.grad_align, DIM_ALIGN=launch.dim_align,
        NEED_DX=layers_need_grad,
        LAYERNORM=normalize == "layernorm", **_dot_options(first.dtype))
    # Per-program partials summed in a fixed order: deterministic.
    return grads, grad_weight.sum(dim=0).to(score_weight.dtype)


def forward(layers, score_weight, tokens, num_prefix_tokens, eps, normalize="layernorm"):
    return _forward(list(layers), score_weight, tokens, num_prefix_tokens, eps, normalize)


def backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd,
             tokens, num_prefix_tokens, layers_need_grad=True, normalize="layernorm"):
    grad_layers, grad_weight = _backward(grad_pooled, grad_attention, list(layers), score_weight,
                                         pooled, attention, mean, rstd, tokens, num_prefix_tokens,
                                         layers_need_grad, normalize)
    return list(grad_layers), grad_weight


def moments(layers, tokens, num_prefix_tokens):
    """token_moments: the kernel's per-program (mean, M2) rows, merged here (exactly: each
    program's deviation from the overall mean, weighted by its token count). Runs inside the
    opaque op ``fastfuse::token_moments``, so it launches directly (no triton_op)."""
    from ..kernels.triton.token_moments import token_moments_kernel

    layers, stride_d = _same_feature_stride(list(layers))
    first = layers[0]
    batch, _, dim = first.shape
    num_tokens = num_gathered_tokens([layer.shape[1] for layer in layers], tokens)
    acc = compute_dtype(first.dtype)
    if batch * num_tokens == 0:
        nan = torch.full((dim,), float("nan"), dtype=acc, device=first.device)
        return nan, nan.clone()
    launch, token_table, _ = _launch_plan(layers, tokens, num_prefix_tokens)
    addressing = launch.addressing
    programs = _programs(batch, first.device, FORWARD_PROGRAMS_PER_SM)
    scratch = first.new_empty((programs, num_tokens, _slot_row(dim)) if addressing == GATHERED else (1,),
                              dtype=acc)
    partials = torch.zeros((programs, 2, dim), dtype=acc, device=first.device)
    token_moments_kernel[(programs,)](
        tuple(layers), token_table, scratch, partials, batch, num_tokens, dim,
        first.stride(0), first.stride(1), stride_d, ADDRESSING=addressing,
        ROW_ALIGN=launch.row_align, DIM_ALIGN=launch.dim_align, ACC=_dot_options(first.dtype)["ACC"], BLOCK_N=16,
        BLOCK_D=min(128, max(16, 1 << (dim - 1).bit_length())))
    # program p holds samples p, p + programs, ...: its token count
    counts = ((batch - torch.arange(programs, device=first.device) + programs - 1) // programs
              * num_tokens).to(acc)
    total = counts.sum()
    mean = (counts[:, None] * partials[:, 0]).sum(dim=0) / total
    deviation = partials[:, 0] - mean
    m2 = partials[:, 1].sum(dim=0) + (counts[:, None] * deviation * deviation).sum(dim=0)
    return mean, m2 / total


BACKEND = Backend("triton", ("cuda", "cpu") if _interpreting() else ("cuda",), _availability,
                  forward, backward, moments=moments)
