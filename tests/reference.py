"""Test-side helpers written from SPEC §1 only (no fastfuse code besides the paper probe)."""
import torch


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


def rel_err(actual, expected, scale=None):
    """Normwise relative error: max |a - e| / max |e| (or / scale)."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    denom = expected.abs().max().item() if scale is None else scale
    if expected.numel() == 0:
        return 0.0
    return (actual - expected).abs().max().item() / max(denom, 1e-300)


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


def pool_reference(tokens, score_weight, eps=1e-5, normalize="layernorm"):
    """SPEC §2/§5 pooled and attention from the definition, in float64: LayerNorm without
    affine (normalize="layernorm") or the raw tokens ("none"), softmax of w_h . xh_n."""
    tokens = tokens.double()
    if normalize == "layernorm":
        normed = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:], eps=eps)
    else:
        normed = tokens
    attention = torch.softmax(torch.einsum("bnd,hd->bhn", normed, score_weight.double()), dim=-1)
    return torch.einsum("bhn,bnd->bhd", attention, normed), attention


def moments_reference(tokens):
    """Per-channel mean and biased variance of a (B, N, D) token stack over all B*N tokens,
    in float64, with plain torch.mean / torch.var (the statistics BatchNorm1d uses in training)."""
    flat = tokens.double().reshape(-1, tokens.shape[-1])
    return torch.mean(flat, dim=0), torch.var(flat, dim=0, unbiased=False)
