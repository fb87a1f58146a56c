"""fastfuse.fuse and fastfuse.poolers against the upstream modules, float64, torch backend.

Oracles: timm's AttentionPoolLatent (the installed package) and the restatements of V-JEPA,
AIM and efficient probing in tests/upstream_*.py.
"""
import copy

import pytest
import torch
from torch import nn

import fastfuse
import fastfuse.poolers as poolers
from pooler_cases import (DIM, HEADS, UPSTREAM, assert_same_step, num_tokens, randomize, rel_err, tokens,
                          upstream_aim, upstream_efficient_probing, upstream_vjepa, timm_layers)

TOL = 1e-10


def build(name, seed=0):
    torch.manual_seed(seed)
    return randomize(UPSTREAM[name]().double(), seed=seed)


@pytest.mark.parametrize("tokens_grad", [False, True], ids=["frozen", "tokens-grad"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(UPSTREAM))
def test_fuse_matches_upstream(name, training, tokens_grad):
    upstream = build(name).train(training)
    fused = fastfuse.fuse(upstream, backend="torch")
    assert type(fused).__module__.startswith("fastfuse.poolers")
    assert fused.training == training
    x = tokens(3, num_tokens(name))
    assert_same_step(upstream, fused, x, TOL, tokens_grad)
    # Two more steps: the BatchNorm running buffers keep agreeing (AIM), outputs too.
    for seed in (5, 6):
        upstream.zero_grad(set_to_none=True)
        fused.zero_grad(set_to_none=True)
        assert_same_step(upstream, fused, tokens(3, num_tokens(name), seed=seed), TOL, tokens_grad)


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_state_dict_round_trip_strict(name):
    upstream = build(name, seed=1)
    fused = fastfuse.fuse(upstream)
    assert list(sorted(fused.state_dict())) == list(sorted(upstream.state_dict()))
    # The fused module's state loads back into a fresh upstream module, and vice versa.
    fresh_upstream = UPSTREAM[name]().double()
    fresh_upstream.load_state_dict(fused.state_dict(), strict=True)
    for key, value in upstream.state_dict().items():
        assert torch.equal(fresh_upstream.state_dict()[key], value), key
    fresh_fused = fastfuse.fuse(UPSTREAM[name]().double())
    fresh_fused.load_state_dict(upstream.state_dict(), strict=True)
    x = tokens(2, num_tokens(name))
    upstream.eval(), fresh_fused.eval()
    assert rel_err(fresh_fused(x), upstream(x)) < TOL


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_fuse_does_not_modify_the_original(name):
    upstream = build(name)
    before = {key: value.clone() for key, value in upstream.state_dict().items()}
    fused = fastfuse.fuse(upstream.train())
    fused(tokens(2, num_tokens(name)))   # a training step updates only the fused copy's buffers
    for key, value in upstream.state_dict().items():
        assert torch.equal(value, before[key]), key
    for param in fused.parameters():
        assert all(param is not other for other in upstream.parameters())


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_return_attention_matches_upstream(name):
    upstream = build(name).eval()
    fused = fastfuse.fuse(upstream)
    x = tokens(2, num_tokens(name))
    _out, attention = fused(x, return_attention=True)
    if name.startswith("timm"):
        # timm returns no attention: recompute its softmax(q k^T * scale) from its parameters.
        inputs = x + upstream.pos_embed if upstream.pos_embed is not None else x
        dim = upstream.kv.weight.shape[1]
        q = upstream.q(upstream.latent).reshape(1, upstream.latent_len, HEADS, -1).transpose(1, 2)
        k = upstream.kv(inputs)[..., :dim].reshape(2, x.shape[1], HEADS, -1).transpose(1, 2)
        expected = ((q * upstream.scale) @ k.transpose(-1, -2)).softmax(-1)
    else:
        _logits, expected = upstream(x, return_attention=True)
    assert attention.shape == expected.shape
    assert rel_err(attention, expected) < TOL
    assert torch.allclose(attention.sum(-1), torch.ones((), dtype=attention.dtype))


def test_aim_running_buffers_follow_batchnorm1d():
    for momentum in (0.1, None):
        upstream = build("aim-default").train()
        upstream.bn.momentum = momentum
        fused = fastfuse.fuse(upstream)
        for step in range(3):
            x = tokens(4, 5, seed=10 + step, offset=3.0)
            upstream(x), fused(x)
        assert int(fused.bn.num_batches_tracked) == 3 == int(upstream.bn.num_batches_tracked)
        assert rel_err(fused.bn.running_mean, upstream.bn.running_mean) < TOL
        assert rel_err(fused.bn.running_var, upstream.bn.running_var) < TOL
        upstream.eval(), fused.eval()
        x = tokens(2, 5, seed=20)
        assert rel_err(fused(x), upstream(x)) < TOL


def test_aim_batch_of_one_token_in_training_is_refused():
    fused = fastfuse.fuse(build("aim-default")).train()
    with pytest.raises(ValueError, match="more than 1 token"):
        fused(tokens(1, 1))


def test_built_directly_loads_upstream_checkpoints():
    cases = [
        (poolers.AttentionPoolLatent(DIM, num_heads=HEADS, latent_len=2, norm_layer=nn.LayerNorm),
         timm_layers.AttentionPoolLatent(DIM, num_heads=HEADS, latent_len=2, norm_layer=nn.LayerNorm)),
        (poolers.AttentiveClassifier(embed_dim=DIM, num_heads=HEADS, num_classes=3, depth=2),
         upstream_vjepa.AttentiveClassifier(embed_dim=DIM, num_heads=HEADS, num_classes=3, depth=2)),
        (poolers.AttentionPoolingClassifier(DIM, 3, num_heads=HEADS, num_queries=2),
         upstream_aim.AttentionPoolingClassifier(DIM, 3, num_heads=HEADS, num_queries=2)),
        (poolers.EfficientProbing(DIM, num_queries=4, d_out=2),
         upstream_efficient_probing.EfficientProbing(DIM, num_queries=4, d_out=2)),
    ]
    for fused, upstream in cases:
        upstream = randomize(upstream.double()).eval()
        fused = fused.double().eval()
        fused.load_state_dict(upstream.state_dict(), strict=True)
        upstream.load_state_dict(fused.state_dict(), strict=True)
        x = tokens(2, 6)
        assert rel_err(fused(x), upstream(x)) < TOL, type(fused).__name__


def tiny_vit(**kwargs):
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", global_pool="map", img_size=32, patch_size=8, depth=2,
                             pretrained=False, num_classes=4, **kwargs)


@pytest.mark.parametrize("inplace", [False, True])
def test_fuse_timm_vit_with_map_head(inplace):
    torch.manual_seed(0)
    model = randomize(tiny_vit().double(), std=0.05).eval()
    reference = copy.deepcopy(model)
    fused = fastfuse.fuse(model, inplace=inplace)
    assert isinstance(fused.attn_pool, poolers.AttentionPoolLatent)
    assert (fused is model) == inplace
    if not inplace:
        assert isinstance(model.attn_pool, timm_layers.AttentionPoolLatent)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert rel_err(fused(images), reference(images)) < TOL
    fused.train(), reference.train()
    images.requires_grad_(True)
    out_fused, out_reference = fused(images), reference(images)
    assert rel_err(out_fused, out_reference) < TOL
    out_fused.square().sum().backward()
    out_reference.square().sum().backward()
    reference_grads = dict(reference.named_parameters())
    scale = max(p.grad.abs().max().item() for p in reference.parameters())
    for name, param in fused.named_parameters():
        assert (param.grad - reference_grads[name].grad).abs().max().item() <= TOL * scale, name
    reference.load_state_dict(fused.state_dict(), strict=True)


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match="qk_norm"):
        fastfuse.fuse(timm_layers.AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True))
    with pytest.raises(ValueError, match="qk_norm"):
        poolers.AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True)
    upstream = upstream_aim.AttentionPoolingClassifier(DIM, 3, num_heads=HEADS)
    upstream.k = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())
    with pytest.raises(ValueError, match="non-linear key path"):
        fastfuse.fuse(upstream)
    with pytest.raises(ValueError, match="norm_layer"):
        fastfuse.fuse(upstream_vjepa.AttentivePooler(embed_dim=DIM, num_heads=HEADS, norm_layer=nn.RMSNorm))
    with pytest.raises(ValueError, match="num_heads=2"):
        fastfuse.fuse(upstream_efficient_probing.EfficientProbing(DIM, num_heads=2))
    with pytest.raises(ValueError, match="d_out"):
        poolers.EfficientProbing(DIM, num_queries=3)
    with pytest.raises(ValueError, match="no attentive pooler"):
        fastfuse.fuse(nn.Sequential(nn.Linear(DIM, DIM)))
    with pytest.raises(TypeError, match="module"):
        fastfuse.fuse("not a module")
    fused = fastfuse.fuse(upstream_efficient_probing.EfficientProbing(DIM, num_queries=2))
    with pytest.raises(ValueError, match="cls"):
        fused(tokens(2, 3, dtype=torch.float32), cls=torch.zeros(2, 2, DIM))
    pool = fastfuse.fuse(timm_layers.AttentionPoolLatent(DIM, num_heads=HEADS))
    with pytest.raises(ValueError, match="attn_mask"):
        pool(tokens(2, 3, dtype=torch.float32), attn_mask=torch.zeros(2, 1, 1, 3))
    with pytest.raises(ValueError, match="feature size"):
        pool(torch.zeros(2, 3, DIM + 1))
