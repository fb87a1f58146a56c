"""Token specs: which tokens of which layers the probe attends over (SPEC §1, §3).

A spec turns L layer activations (B, T_l, D) into N gathered tokens:

    "cls"     N = L       the CLS token (row 0) of each layer
    "ap"      N = L       the average of rows num_prefix_tokens.. of each layer
    "cls+ap"  N = 2L      the paper's order: cls_0, ap_0, cls_1, ap_1, ...
    "all"     N = sum T_l every row of every layer, layer after layer

A (B, N, D) token tensor is the one-layer "all" case. Validation lives here so every backend
sees inputs that are already known to be well formed.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

TOKEN_SPECS = ("cls", "ap", "cls+ap", "all")
DEFAULT_LAYER_SPEC = "cls+ap"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def num_gathered_tokens(layer_lengths: Sequence[int], tokens: str) -> int:
    """N for layers of the given lengths T_l under a token spec. Symbolic lengths (SymInts,
    while torch.compile traces with dynamic shapes) stay symbolic: no int() here."""
    if tokens == "all":
        return sum(layer_lengths, 0)
    per_layer = 2 if tokens == "cls+ap" else 1
    return per_layer * len(layer_lengths)


def _check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {value.dtype}"
        )
    if value.dim() != 3:
        raise ValueError(
            f"{name} must have shape (batch, tokens, dim), got {value.dim()} dimensions "
            f"with shape {tuple(value.shape)}"
        )
    if value.shape[2] < 1:
        raise ValueError(f"{name} has feature size 0 (shape {tuple(value.shape)}): expected dim >= 1")
    return value


def normalize_inputs(x, tokens, num_prefix_tokens) -> tuple[tuple[torch.Tensor, ...], str, int]:
    """Validate the user's input form and return (layers, tokens, num_prefix_tokens).

    ``x`` is a (B, N, D) tensor (then ``tokens`` must be None) or a list/tuple of layer
    activations (B, T_l, D) sharing B, D, dtype and device.
    """
    if isinstance(x, torch.Tensor):
        if tokens is not None:
            raise ValueError(
                "tokens must be None when x is a (batch, tokens, dim) tensor; token specs "
                f"{TOKEN_SPECS} apply to a list of layer activations (got tokens={tokens!r})"
            )
        return (_check_tensor(x, "x"),), "all", 0
    if not isinstance(x, (list, tuple)):
        raise TypeError(
            "x must be a (batch, tokens, dim) tensor or a list/tuple of layer activations, "
            f"got {type(x).__name__}"
        )
    if len(x) == 0:
        raise ValueError("x is an empty list of layers: expected at least one (batch, tokens, dim) tensor")
    tokens = DEFAULT_LAYER_SPEC if tokens is None else tokens
    if not isinstance(tokens, str) or tokens not in TOKEN_SPECS:
        raise ValueError(f"tokens must be one of {TOKEN_SPECS}, got {tokens!r}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    layers = tuple(_check_tensor(layer, f"x[{i}]") for i, layer in enumerate(x))
    first = layers[0]
    for i, layer in enumerate(layers[1:], start=1):
        if layer.shape[0] != first.shape[0]:
            raise ValueError(
                f"x[{i}] has batch size {layer.shape[0]} but x[0] has {first.shape[0]}: "
                "all layers must share the batch size"
            )
        if layer.shape[2] != first.shape[2]:
            raise ValueError(
                f"x[{i}] has feature size {layer.shape[2]} but x[0] has {first.shape[2]}: "
                "all layers must share the feature size"
            )
        if layer.dtype != first.dtype:
            raise TypeError(f"x[{i}] has dtype {layer.dtype} but x[0] has {first.dtype}")
        if layer.device != first.device:
            raise ValueError(f"x[{i}] is on {layer.device} but x[0] is on {first.device}")
    for i, layer in enumerate(layers):
        length = layer.shape[1]
        if tokens in ("cls", "cls+ap") and length < 1:
            raise ValueError(f"x[{i}] has no tokens: token spec {tokens!r} needs a CLS token")
        if tokens in ("ap", "cls+ap") and num_prefix_tokens >= length:
            raise ValueError(
                f"num_prefix_tokens={num_prefix_tokens} must be smaller than the number of "
                f"tokens of x[{i}] ({length}): token spec {tokens!r} averages the tokens after "
                "the prefix"
            )
    return layers, tokens, num_prefix_tokens


def gather_tokens(layers, tokens: str, num_prefix_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The (B, N, D) stack of gathered tokens, in ``dtype`` (the unfused statement). The
    gathered specs convert only what they keep: the CLS rows and the (B, D) averages."""
    if tokens == "all":
        return torch.cat([layer.to(dtype) for layer in layers], dim=1)
    columns = []
    for layer in layers:
        if tokens in ("cls", "cls+ap"):
            columns.append(layer[:, 0].to(dtype))
        if tokens in ("ap", "cls+ap"):
            columns.append(patch_average(layer[:, num_prefix_tokens:], dtype))
    return torch.stack(columns, dim=1)


def sum_cannot_overflow(source: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether any sum of ``source`` values, accumulated in ``dtype``, stays finite: float16
    in float32 (65504 x 2^63 rows < 3.4e38) and float32 in float64. A dtype rule, no data."""
    return torch.finfo(dtype).max / torch.finfo(source).max > 2.0 ** 63


def reads_rows_once(rows_dtype: torch.dtype, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`patch_average` of eager ``rows_dtype`` rows on ``device`` reads them in
    one pass, with no converted copy and no host synchronisation in the normal case:
    - on CPU, rows already in ``dtype`` (torch converts half rows to a full float32 copy
      before a wider reduction; only CUDA reads half rows straight into a float32 sum);
    - on CUDA, float16 rows (a float32 sum of them cannot overflow: no fallback pass).
    Under torch.compile every case is one pass (the compiler fuses the conversion and both
    reductions of the fallback into one loop over the rows)."""
    if device.type == "cpu":
        return rows_dtype == dtype
    # CUDA: float16 rows into a float32 sum (cannot overflow), bfloat16 / float32 rows into a
    # float64 sum (wide_mean: cannot overflow either); float64 rows keep the fallback pass.
    return device.type == "cuda" and dtype == torch.float32 and rows_dtype != torch.float64


def _holds_real_data(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a plain eager tensor whose values may be read on the host: not
    traced (torch.compile, AOT autograd, opcheck: fake or functional tensors, dispatch modes),
    where a data-dependent branch cannot be recorded."""
    return (type(tensor) is torch.Tensor and not torch.compiler.is_compiling()
            and _current_dispatch_mode() is None)


def patch_average(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mean over dim 1 in ``dtype`` (a float32 or float64 accumulation of the rows as they
    are, never a converted copy of them where torch can avoid it). Where the sum overflows
    (tokens near the dtype's largest value), the average of rows divided first, so that a
    finite average stays finite (issue 12 item 7). The fallback's cost, case by case:
    - no overflow possible (sum_cannot_overflow): none;
    - eager CPU: one check of the (B, D) average (a host read is free there); the second
      pass only for a layer whose average overflowed;
    - CUDA, float32 averages of half / float32 rows: none (wide_mean: a float64 sum);
    - elsewhere (float64 rows on a GPU, torch.compile on CPU): torch.where, sync-free, a
      second pass in eager mode; under torch.compile the two reductions fuse into one loop."""
    if (rows.device.type == "cpu" and rows.dtype == dtype and rows.shape[1] > 0
            and not torch.compiler.is_compiling() and torch.get_float32_matmul_precision() == "highest"):
        # A batched GEMV with weights 1/T: each row is divided before it is summed (no
        # overflow, no check), in one pass over the rows; torch's mean over this middle dim
        # took about twice as long as one read of the rows on the development machine. Only
        # eager and at full matmul precision (a lower one may round the products to bfloat16;
        # torch.compile fuses the mean and its fallback into one pass anyway).
        weights = rows.new_full((rows.shape[0], 1, rows.shape[1]), 1.0 / rows.shape[1])
        return torch.bmm(weights, rows).squeeze(1)
    if rows.device.type == "cuda" and dtype == torch.float32 and rows.dtype != torch.float64:
        return wide_mean(rows, dtype)
    average = rows.mean(dim=1, dtype=dtype)
    if sum_cannot_overflow(rows.dtype, dtype):
        return average
    if rows.device.type == "cpu" and _holds_real_data(average):
        if bool(torch.isfinite(average).all()):
            return average
    divided_first = (rows.to(dtype) / rows.shape[1]).sum(dim=1)
    return torch.where(torch.isfinite(average), average, divided_first)


def wide_mean(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mean over dim 1 of half / float32 rows, summed in float64 (no sum of float32-range
    values overflows there, so no fallback pass), then rounded to ``dtype`` (the average of
    finite rows is finite). One pass on CUDA, whose reductions read the rows as they are."""
    if sum_cannot_overflow(rows.dtype, dtype):
        return rows.mean(dim=1, dtype=dtype)
    return rows.mean(dim=1, dtype=torch.float64).to(dtype)


def scatter_token_grads(grad_tokens: torch.Tensor, layers, tokens: str, num_prefix_tokens: int):
    """Adjoint of :func:`gather_tokens`: d tokens (B, N, D) -> one gradient per layer."""
    if tokens == "all":
        if len(layers) == 1:
            return [grad_tokens.to(layers[0].dtype).contiguous()]
        # Copies: a part that is already contiguous (batch of 1, an empty layer) would
        # otherwise be a view, and the op's outputs must not alias each other.
        parts = grad_tokens.split([layer.shape[1] for layer in layers], dim=1)
        return [part.to(dtype=layer.dtype, memory_format=torch.contiguous_format, copy=True)
                for part, layer in zip(parts, layers)]
    per_layer = 2 if tokens == "cls+ap" else 1
    grads = []
    for index, layer in enumerate(layers):
        grad = torch.zeros(layer.shape, dtype=grad_tokens.dtype, device=grad_tokens.device)
        column = index * per_layer
        if tokens in ("cls", "cls+ap"):
            grad[:, 0] = grad_tokens[:, column]
            column += 1
        if tokens in ("ap", "cls+ap"):
            patches = layer.shape[1] - num_prefix_tokens
            grad[:, num_prefix_tokens:] += (grad_tokens[:, column] / patches).unsqueeze(1)
        grads.append(grad.to(layer.dtype))
    return grads
