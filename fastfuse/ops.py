"""The fused op as a PyTorch custom op: ``fastfuse::attentive_pool`` and its backward.

One registration (schema, fake kernel, autograd) serves every backend: the op takes the
backend's name, and torch.compile sees a single opaque node whose backward is another op. The
kernel contract (output dtypes and shapes, fake kernels) is fastfuse/op_contract.py.

Input checking happens in :func:`attentive_pool`, before any kernel runs. The backend is
chosen there in eager mode (so a backend that cannot serve the input is refused up front);
inside a graph traced by torch.compile only the requested name ("auto", or an explicit one)
is recorded and the op chooses when it runs. Backend availability (library loading, imports,
GPU queries) is thus never traced, and ``import fastfuse`` needs no torch._dynamo. The
frozen-features gather before the op (:func:`attentive_pool`) is plain torch ops, traced like
any other; the op stays one opaque node.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends import get as _get_backend, requested_name, resolve as _resolve_backend
from .gather import gather_tokens, normalize_inputs, reads_rows_once
from .op_contract import NORMALIZATIONS, compute_dtype, fake_backward, fake_forward

DOUBLE_BACKWARD_MESSAGE = (
    "fastfuse.attentive_pool (op fastfuse::attentive_pool) does not support double backward: "
    "its backward is a fused kernel without a derivative of its own, so gradients of its "
    "gradients (create_graph=True followed by another backward, e.g. a gradient penalty) "
    "cannot be computed. fastfuse.PaperAttentiveProbe, the unfused probe in plain PyTorch "
    "ops, supports them."
)


@torch.library.custom_op("fastfuse::attentive_pool", mutates_args=())
def _attentive_pool_op(layers: Sequence[Tensor], score_weight: Tensor, tokens: str,
                       num_prefix_tokens: int, eps: float, backend: str,
                       normalize: str = "layernorm") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Resolved here too (never traced): a graph traced by torch.compile records only the
    # requested name. Eager calls pass the name resolved in attentive_pool: the same answer.
    name = _resolve_backend(backend, layers, score_weight, normalize=normalize)
    return tuple(_get_backend(name).forward(layers, score_weight, tokens, num_prefix_tokens, eps,
                                            normalize=normalize))


@_attentive_pool_op.register_fake
def _(layers, score_weight, tokens, num_prefix_tokens, eps, backend, normalize="layernorm"):
    return fake_forward(layers, score_weight, tokens, num_prefix_tokens, eps, normalize)


@torch.library.custom_op("fastfuse::attentive_pool_backward", mutates_args=())
def _attentive_pool_backward_op(grad_pooled: Tensor, grad_attention: Optional[Tensor],
                                layers: Sequence[Tensor], score_weight: Tensor, pooled: Tensor,
                                attention: Tensor, mean: Tensor, rstd: Tensor, tokens: str,
                                num_prefix_tokens: int, layers_need_grad: bool, backend: str,
                                normalize: str = "layernorm") -> tuple[list[Tensor], Tensor]:
    name = _resolve_backend(backend, layers, score_weight, normalize=normalize)
    grad_layers, grad_weight = _get_backend(name).backward(
        grad_pooled.contiguous(), None if grad_attention is None else grad_attention.contiguous(),
        layers, score_weight, pooled, attention, mean, rstd, tokens, num_prefix_tokens,
        layers_need_grad, normalize=normalize)
    return list(grad_layers), grad_weight


@_attentive_pool_backward_op.register_fake
def _(grad_pooled, grad_attention, layers, score_weight, pooled, attention, mean, rstd, tokens,
      num_prefix_tokens, layers_need_grad, backend, normalize="layernorm"):
    return fake_backward(grad_pooled, grad_attention, layers, score_weight, pooled, attention,
                         mean, rstd, tokens, num_prefix_tokens, layers_need_grad, normalize)


def _setup_context(ctx, inputs, output):
    layers, score_weight, tokens, num_prefix_tokens, _eps, backend = inputs[:6]
    normalize = inputs[6] if len(inputs) > 6 else "layernorm"
    pooled, attention, mean, rstd = output
    ctx.save_for_backward(*layers, score_weight, pooled, attention, mean, rstd)
    ctx.num_layers = len(layers)
    # needs_input_grad[0] is True for a list input whatever its tensors need; ask them.
    ctx.layers_need_grad = any(layer.requires_grad for layer in layers)
    ctx.options = (tokens, num_prefix_tokens, backend, normalize)


def _backward(ctx, grad_pooled, grad_attention, _grad_mean, _grad_rstd):
    saved = ctx.saved_tensors
    layers, (score_weight, pooled, attention, mean, rstd) = saved[:ctx.num_layers], saved[ctx.num_layers:]
    tokens, num_prefix_tokens, backend, normalize = ctx.options
    if grad_pooled is None:
        grad_pooled = torch.zeros_like(pooled)
    # Probes usually train on frozen features: then no token gradient is computed at all.
    layers_need_grad = ctx.layers_need_grad
    grad_layers, grad_weight = _attentive_pool_backward_op(
        grad_pooled, grad_attention, list(layers), score_weight, pooled, attention, mean, rstd,
        tokens, num_prefix_tokens, layers_need_grad, backend, normalize)
    grad_layers = list(grad_layers) if layers_need_grad else [None] * ctx.num_layers
    return grad_layers, grad_weight, None, None, None, None, None


torch.library.register_autograd("fastfuse::attentive_pool", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)


# Registered so that the first backward works with create_graph=True and differentiating it
# again says why it cannot, instead of torch's generic "no autograd formula" error.
torch.library.register_autograd("fastfuse::attentive_pool_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def attentive_pool(x, score_weight: Tensor, *, tokens: Optional[str] = None,
                   num_prefix_tokens: int = 1, eps: float = 1e-5,
                   normalize: str = "layernorm",
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Attention-pool tokens against H folded query vectors (SPEC §2-§3), fused.

    Args:
        x: a (B, N, D) token tensor, or a list/tuple of L layer activations (B, T_l, D)
            (any strides, e.g. views captured by hooks) from which ``tokens`` are gathered.
        score_weight: (H, D) folded key vectors ``w_h`` (any H, e.g. P probes x heads).
        tokens: None for a tensor ``x``; for layers one of "cls", "ap", "cls+ap" (default),
            "all" (see :mod:`fastfuse.gather`).
        num_prefix_tokens: leading tokens of each layer that "ap" does not average (CLS plus
            register tokens).
        eps: the LayerNorm epsilon of the token normalisation (ignored for normalize="none").
        normalize: the per-token normalisation N(x_n) of SPEC §5: "layernorm" (LayerNorm
            without affine, SPEC §2) or "none" (the raw tokens: xh_n = x_n).
        backend: "auto", "torch", "cpu", "triton", "cuda"; None reads $FASTFUSE_BACKEND,
            else "auto".

    Returns:
        pooled (B, H, D): ``z_h = sum_n a_hn xh_n`` over the (normalised) tokens xh, and
        attention (B, H, N): ``a_hn = softmax_n(w_h . xh_n)``; float64 for float64 tokens,
        else float32. Differentiable w.r.t. ``x`` (each layer) and ``score_weight``.

    Frozen features (a gathered spec, no layer requiring grad, ``score_weight`` requiring
    grad, grad mode on): the tokens are gathered first, in the compute dtype (by the cpu
    backend's gather kernel, else in plain PyTorch ops), and the op runs on that (B, N, D)
    stack with tokens="all", so training reads the layers once instead of once in the forward
    and again in the backward. The stack is kept for the backward (small next to the layers:
    N rows per sample instead of sum T_l). Where a PyTorch gather would itself read the layers
    more than once (see gather.reads_rows_once: half layers on CPU with the torch backend,
    float64 layers on an eager GPU), and in inference or
    when a layer needs its gradient, the op gathers inside its kernels as before (the cuda
    forward, when it splits the heads over blocks, gathers once into a stack of its own first).
    """
    layers, tokens, num_prefix_tokens = normalize_inputs(x, tokens, num_prefix_tokens)
    score_weight = check_score_weight(score_weight, layers[0])
    eps = check_eps(eps)
    normalize = check_normalize(normalize)
    acc = compute_dtype(layers[0].dtype)
    name = requested_name(backend)
    if not torch.compiler.is_compiling():
        name = _resolve_backend(name, layers, score_weight, normalize=normalize)
    # The backend's own gather (the cpu backend's kernel), else plain PyTorch ops; traced
    # graphs always take the latter, which the compiler fuses into one pass.
    own_gather = None if torch.compiler.is_compiling() else _get_backend(name).gather
    if _gather_first(layers, tokens, score_weight, acc, own_gather is not None):
        # Gather once here, so the fused op (and its backward) touch only the small (B, N, D)
        # stack (kept for the backward), never the layers again.
        layers = ((own_gather(layers, tokens, num_prefix_tokens) if own_gather is not None
                   else gather_tokens(layers, tokens, num_prefix_tokens, acc)),)
        tokens, num_prefix_tokens = "all", 0
    pooled, attention, _mean, _rstd = _attentive_pool_op(
        list(layers), score_weight.to(acc).contiguous(), tokens, num_prefix_tokens, eps, name,
        normalize)
    return pooled, attention


def _gather_first(layers, tokens: str, score_weight: Tensor, acc: torch.dtype,
                  own_gather: bool = False) -> bool:
    """Whether to gather the tokens before the op: frozen features in training (a gathered
    spec, no layer needing a gradient, a gradient to come: else the fused gather reads the
    layers once anyway), where the gather itself reads the layers once: the backend's own
    gather kernel (``own_gather``), or plain PyTorch ops where gather.reads_rows_once says so
    (always under torch.compile, where the gather fuses into one pass)."""
    if tokens == "all" or any(layer.requires_grad for layer in layers):
        return False
    if not (torch.is_grad_enabled() and score_weight.requires_grad):
        return False
    return (torch.compiler.is_compiling() or own_gather
            or reads_rows_once(layers[0].dtype, acc, layers[0].device))


def check_normalize(normalize) -> str:
    if not isinstance(normalize, str) or normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return normalize


def check_eps(eps) -> float:
    # A negative eps makes rsqrt(var + eps) NaN for near-constant tokens: refuse it up front.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_score_weight(score_weight, reference: Tensor) -> Tensor:
    if not isinstance(score_weight, torch.Tensor):
        raise TypeError(f"score_weight must be a torch.Tensor, got {type(score_weight).__name__}")
    if not score_weight.is_floating_point():
        raise TypeError(f"score_weight must be a floating tensor, got dtype {score_weight.dtype}")
    dim = reference.shape[-1]
    if score_weight.dim() != 2 or score_weight.shape[1] != dim or score_weight.shape[0] < 1:
        raise ValueError(f"score_weight must have shape (heads, {dim}) to match the tokens' "
                         f"feature size {dim}, got {tuple(score_weight.shape)}")
    if score_weight.device != reference.device:
        raise ValueError(f"score_weight is on {score_weight.device} but the tokens are on "
                         f"{reference.device}")
    return score_weight
