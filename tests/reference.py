"""The test oracle, its tolerances and the layouts tests feed the kernels, in one place.

Written from SPEC §1-§2 only: no fastfuse code (not fastfuse.gather, not the torch backend)
besides fastfuse.paper.PaperAttentiveProbe, the unfused probe that the module tests hold the
fused paths against. Everything is computed in float64.
"""
import torch
import torch.nn.functional as F

# Normwise relative error allowed against the float64 oracle (rel_err), per input dtype, for
# the fused op and the probe on well-conditioned data. Half inputs are rounded once on entry
# and their gradients once on exit: the error of that rounding dominates.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Random problems (tests/test_properties.py: D down to 1, any layout, many parameters between
# input and logits) are less well conditioned.
RANDOM_PROBLEM_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}
EPS = 1e-5


def rel_err(actual, expected, scale=None, floor=0.0):
    """Normwise relative error: max |a - e| / max |e| (or / ``scale``), the denominator at
    least ``floor`` (an absolute floor for values that may be all near zero)."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if expected.numel() == 0:
        return 0.0
    denom = expected.abs().max().item() if scale is None else scale
    return (actual - expected).abs().max().item() / max(denom, floor, 1e-300)


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------

def stack_tokens(layers, tokens, num_prefix_tokens):
    """The paper's (B, N, D) token stack, built directly: [cls_0, ap_0, cls_1, ap_1, ...]."""
    if tokens == "all":
        return torch.cat(list(layers), dim=1)
    picked = []
    for act in layers:
        if tokens in ("cls", "cls+ap"):
            picked.append(act[:, 0])
        if tokens in ("ap", "cls+ap"):
            picked.append(act[:, num_prefix_tokens:].mean(dim=1))
    return torch.stack(picked, dim=1)


def pool(layers, score_weight, tokens="all", num_prefix_tokens=0, eps=EPS, normalize="layernorm"):
    """SPEC §2/§5 forward in float64, from the definition: (pooled, attention, mean, rstd);
    LayerNorm without affine (normalize="layernorm") or the raw tokens ("none").
    Differentiable (autograd): the oracle for the op's backward too."""
    stacked = stack_tokens([layer.to(torch.float64) for layer in layers], tokens, num_prefix_tokens)
    if normalize == "layernorm":
        mean = stacked.mean(dim=-1)
        rstd = (stacked.var(dim=-1, unbiased=False) + eps).rsqrt()
        normed = F.layer_norm(stacked, stacked.shape[-1:], eps=eps)
    else:  # the contract saves the identity as mean 0, rstd 1
        mean, rstd = stacked.new_zeros(stacked.shape[:-1]), stacked.new_ones(stacked.shape[:-1])
        normed = stacked
    attention = torch.softmax(torch.einsum("bnd,hd->bhn", normed, score_weight.to(torch.float64)), dim=-1)
    return torch.einsum("bhn,bnd->bhd", attention, normed), attention, mean, rstd


def pool_with_grads(layers, score_weight, tokens, num_prefix_tokens, grad_pooled, grad_attention=None,
                    eps=EPS, normalize="layernorm"):
    """The op's forward and backward in float64: (pooled, attention, mean, rstd, grad_layers,
    grad_weight), the gradients those of <pooled, grad_pooled> + <attention, grad_attention>."""
    layers = [layer.detach().to(torch.float64).requires_grad_() for layer in layers]
    weight = score_weight.detach().to(torch.float64).requires_grad_()
    pooled, attention, mean, rstd = pool(layers, weight, tokens, num_prefix_tokens, eps, normalize)
    loss = (pooled * grad_pooled.to(torch.float64).cpu()).sum()
    if grad_attention is not None:
        loss = loss + (attention * grad_attention.to(torch.float64).cpu()).sum()
    grads = torch.autograd.grad(loss, [*layers, weight])
    return pooled.detach(), attention.detach(), mean, rstd, list(grads[:-1]), grads[-1]


def pool_reference(tokens, score_weight, eps=EPS, normalize="layernorm"):
    """pooled and attention of a (B, N, D) token tensor (see :func:`pool`)."""
    return pool([tokens], score_weight, "all", 0, eps, normalize)[:2]


def moments_reference(tokens):
    """Per-channel mean and biased variance of a (B, N, D) token stack over all B*N tokens,
    in float64, with plain torch.mean / torch.var (the statistics BatchNorm1d uses in training)."""
    flat = tokens.double().reshape(-1, tokens.shape[-1])
    return torch.mean(flat, dim=0), torch.var(flat, dim=0, unbiased=False)


def randomize_(module, std=0.3, seed=0):
    """Non-trivial parameters and BatchNorm statistics (default inits hide bugs: zeros, ones)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_v.weight", "bn.weight", "running_var")):
                noise = 1.0 + noise.abs() if name.endswith("running_var") else 1.0 + noise
            value.copy_(noise.to(value.dtype))
    return module


# --------------------------------------------------------------------------------------------
# Layouts: layer activations as hooks hand them over (views, not contiguous tensors)
# --------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "padded", "strided-d", "sliced", "expanded")


def layout_storage_shape(layout, batch, length, dim):
    """Shape of the tensor that :func:`layout_view` views as (batch, length, dim)."""
    return {
        "contiguous": (batch, length, dim),
        "transposed": (length, batch, dim + 3),         # batch stride < row stride, padded D
        "padded": (batch, length + 1, dim + 3),          # rows and features sliced
        "strided-d": (batch, length, dim, 2),            # feature stride 2
        "sliced": (batch + 3, length + 4, 2 * dim + 1),  # every dimension sliced, feature stride 2
        "expanded": (1, length, dim),                    # batch stride 0
    }[layout]


def layout_view(layout, storage, batch, length, dim):
    """The (batch, length, dim) view of ``storage`` (shaped by layout_storage_shape)."""
    if layout == "transposed":
        return storage.transpose(0, 1)[..., 1:dim + 1]
    if layout == "padded":
        return storage[:, 1:, 2:dim + 2]
    if layout == "strided-d":
        return storage[..., 1]
    if layout == "sliced":
        return storage[1:batch + 1, 2:length + 2, 1::2]
    if layout == "expanded":
        return storage.expand(batch, -1, -1)
    return storage


def values(shape, generator, dtype=torch.float64):
    """N(0.3, 1.5^2) values (a LayerNorm bug hides behind mean 0 / std 1), rounded once to dtype."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 + 0.3).to(dtype)


def make_layer(batch, length, dim, layout, generator, dtype=torch.float64, device="cpu"):
    """A (B, T, D) tensor with the given memory layout (a view of a fresh storage)."""
    storage = values(layout_storage_shape(layout, batch, length, dim), generator, dtype).to(device)
    return layout_view(layout, storage, batch, length, dim)


def same_layout(layer, dtype, device, requires_grad=True):
    """``layer`` in dtype on device with the same strides (any padding left uninitialised, so a
    kernel that reads it shows); differentiable (an expanded layer through its one row)."""
    if layer.stride(0) == 0 and layer.shape[0] > 1:
        row = layer[:1].to(device=device, dtype=dtype).requires_grad_(requires_grad)
        return row.expand_as(layer)
    if dtype == layer.dtype and torch.device(device) == layer.device:
        return layer.detach().requires_grad_(requires_grad)
    copy = torch.empty_strided(layer.shape, layer.stride(), dtype=dtype, device=device)
    return copy.copy_(layer).requires_grad_(requires_grad)


def hook_like_layers(batch, dim, generator, dtype=torch.float32):
    """Three layers of lengths 40, 11 and 9 as hooks capture them: a contiguous one that
    averages more rows than one gather tile holds, a row/feature slice, a batch-minor one."""
    return [make_layer(batch, 40, dim, "contiguous", generator, dtype),
            make_layer(batch, 11, dim, "padded", generator, dtype),
            make_layer(batch, 9, dim, "transposed", generator, dtype)]
