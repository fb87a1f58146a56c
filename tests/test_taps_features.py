"""timm taps, the feature cache and the extract CLI, on randomly initialised timm ViTs.

The oracles are written here or in reference.py, never taken from the code under test: plain
forward hooks for the tap, torch.stack of a[:, 0] and a[:, p:].mean(1) for the gathering, and
the unfused paper probe for the end-to-end fused probe.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm): timm taps untested")

import fastfuse
from fastfuse.cli import main as cli_main
from fastfuse.extract import create_backbone, split_indices
from fastfuse.features import FeatureWriter, complete_splits, extract_features, load_features, load_metadata, save_features
from fastfuse.paper import PaperAttentiveProbe
from fastfuse.taps import LayerTap

from reference import randomize_, stack_tokens

# name: (timm model, image size, prefix tokens, heads for the probe)
MODELS = {
    "vit_s16": ("vit_small_patch16_224", 32, 1, 6),          # ViT-S/16 widths, 2x2 patches
    "vit_ti16": ("vit_tiny_patch16_224", 32, 1, 3),
    "vit_s14_reg4": ("vit_small_patch14_reg4_dinov2", 28, 5, 6),  # CLS + 4 registers
    "vit_ti16_map": ("vit_tiny_patch16_224", 32, 1, 3),      # attention-pool (MAP) head, as SigLIP
}
# Extra timm.create_model arguments per key.
MODEL_KWARGS = {"vit_ti16_map": {"global_pool": "map"}}
_built = {}


def build(key):
    """A model of MODELS in eval mode, built once per session (tests must not modify it)."""
    if key not in _built:
        name, img_size, _, _ = MODELS[key]
        torch.manual_seed(0)
        _built[key] = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size,
                                        **MODEL_KWARGS.get(key, {})).eval()
    return _built[key]


def images_for(key, batch=4, dtype=torch.float32, seed=1):
    size = MODELS[key][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def paper_modules(model):
    return [block.norm2 for block in model.blocks] + [model.norm]


def hooked_outputs(model, modules, images):
    """Outputs of ``modules`` in one plain forward pass, captured by hooks written here."""
    captured = {}
    handles = [module.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o))
               for k, module in enumerate(modules)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[k] for k in range(len(modules))]


# --- LayerTap ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key", list(MODELS))
def test_tap_equals_plain_hooks(key):
    model, images = build(key), images_for(key)
    depth = len(model.blocks)
    with LayerTap(model) as tap:
        assert tap.layer_names == [f"blocks.{i}.norm2" for i in range(depth)] + ["norm"]
        assert tap.num_prefix_tokens == MODELS[key][2]
        expected = hooked_outputs(model, paper_modules(model), images)
        acts = tap(images)
        assert len(acts) == depth + 1
        for act, ref in zip(acts, expected):
            assert act.shape == (4, ref.shape[1], model.embed_dim)
            assert torch.equal(act, ref)
        # No copies: within one forward, the tap returns the very tensors the modules output.
        seen = {}
        # prepend: run before the tap's hooks, which stop the model after the last tapped module.
        handles = [module.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o), prepend=True)
                   for k, module in enumerate(paper_modules(model))]
        try:
            acts = tap(images)
        finally:
            for handle in handles:
                handle.remove()
        assert all(act is seen[k] for k, act in enumerate(acts))
    assert all(len(module._forward_hooks) == 0 for module in paper_modules(model))


def test_tap_layer_choices():
    model, images = build("vit_ti16"), images_for("vit_ti16")
    blocks = list(model.blocks)
    block_outputs = hooked_outputs(model, blocks, images)
    with LayerTap(model, "blocks") as tap:
        assert tap.layer_names == [f"blocks.{i}" for i in range(len(blocks))]
        assert all(torch.equal(a, r) for a, r in zip(tap(images), block_outputs))
    with LayerTap(model, [2, 0, -1]) as tap:
        assert tap.layer_names == ["blocks.2", "blocks.0", f"blocks.{len(blocks) - 1}"]
        acts = tap(images)
        for act, index in zip(acts, [2, 0, -1]):
            assert torch.equal(act, block_outputs[index])
    with LayerTap(model, ["blocks.3.norm1", "norm"]) as tap:
        expected = hooked_outputs(model, [model.blocks[3].norm1, model.norm], images)
        assert all(torch.equal(a, r) for a, r in zip(tap(images), expected))
    with LayerTap(model, [1], num_prefix_tokens=3) as tap:
        assert tap.num_prefix_tokens == 3


def test_tap_errors():
    model = build("vit_ti16")
    depth = len(model.blocks)
    cases = [
        (lambda: LayerTap(nn.Linear(4, 4)), ValueError, "no `blocks`"),
        (lambda: LayerTap(model, ["blocks.0.nope"]), ValueError, "blocks.0.nope"),
        (lambda: LayerTap(model, [depth]), ValueError, f"block index {depth}.*{depth} blocks"),
        (lambda: LayerTap(model, [-depth - 1]), ValueError, "block index"),
        (lambda: LayerTap(model, 3.5), TypeError, "layers must be"),
        (lambda: LayerTap(model, []), TypeError, "layers must be"),
        (lambda: LayerTap(model, [0, "norm"]), TypeError, "not a mix"),
        (lambda: LayerTap(model, "all"), ValueError, "layers must be one of"),
        (lambda: LayerTap(model, ["norm", "norm"]), ValueError, "more than once"),
        (lambda: LayerTap(model, num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
        (lambda: LayerTap("model"), TypeError, "model must be"),
    ]
    for make, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            make()

    no_norm2 = nn.Module()
    no_norm2.blocks = nn.ModuleList([nn.Linear(4, 4)])
    no_norm2.norm, no_norm2.num_prefix_tokens = nn.LayerNorm(4), 1
    with pytest.raises(ValueError, match="norm2"):
        LayerTap(no_norm2)
    anonymous = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="num_prefix_tokens="):
        LayerTap(anonymous, ["0"])
    with LayerTap(model, ["patch_embed.proj"]) as tap:  # a conv: (B, C, H, W), not tokens
        with pytest.raises(ValueError, match="patch_embed.proj"):
            tap(images_for("vit_ti16"))
    tap = LayerTap(model)
    tap.close()
    with pytest.raises(RuntimeError, match="closed"):
        tap(images_for("vit_ti16"))


def test_tap_repeated_calls_hold_no_stale_activations():
    model = build("vit_s14_reg4")
    first_images, second_images = images_for("vit_s14_reg4", 3, seed=2), images_for("vit_s14_reg4", 5, seed=3)
    with LayerTap(model) as tap:
        first = tap(first_images)
        first_copy = [act.clone() for act in first]
        with torch.no_grad():
            model(second_images)  # a plain call is not captured and leaves the tap alone
        assert all(entry is None for entry in tap._captured)
        second = tap(second_images)
        expected = hooked_outputs(model, paper_modules(model), second_images)
        assert [act.shape[0] for act in second] == [5] * len(second)
        assert all(torch.equal(a, r) for a, r in zip(second, expected))
        assert all(torch.equal(a, c) for a, c in zip(first, first_copy))
        assert all(entry is None for entry in tap._captured)


def test_tap_frozen_by_default_and_keep_grad():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=3)
    images = images_for("vit_ti16")
    for training in (True, False):
        model.train(training)
        with LayerTap(model) as tap, torch.enable_grad():
            acts = tap(images)
        assert model.training is training  # the mode is the caller's
        assert not any(act.requires_grad for act in acts)
    model.eval()
    with LayerTap(model, keep_grad=True) as tap:
        acts = tap(images)
        assert all(act.requires_grad for act in acts)
        sum(act.square().sum() for act in acts).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# --- end to end: tap -> fused probe == paper probe on the stacked tokens ------------------------

@pytest.mark.parametrize("key", list(MODELS))
def test_end_to_end_fused_probe_equals_paper_probe(key):
    _, _, _, heads = MODELS[key]
    model = build(key).double()
    try:
        images = images_for(key, batch=6, dtype=torch.float64)
        dim, num_classes = model.embed_dim, 5
        fused = randomize_(fastfuse.AttentiveFusion(dim, heads, num_classes)).double()
        paper = PaperAttentiveProbe(dim, heads, num_classes).double()
        paper.load_state_dict(fused.state_dict(), strict=True)
        cotangent = torch.randn(6, num_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

        # Frozen backbone: probe parameters' gradients.
        with LayerTap(model) as tap:
            acts = tap(images)
            logits = fused(acts, tokens="cls+ap", num_prefix_tokens=tap.num_prefix_tokens)
            expected = paper(stack_tokens(acts, "cls+ap", MODELS[key][2]))
        torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-10)
        (logits * cotangent).sum().backward()
        (expected * cotangent).sum().backward()
        paper_params = dict(paper.named_parameters())
        for name, param in fused.named_parameters():
            torch.testing.assert_close(param.grad, paper_params[name].grad, rtol=1e-8, atol=1e-10, msg=name)

        # keep_grad: the gradient reaches the backbone, equally through both probes.
        grads = []
        with LayerTap(model, keep_grad=True) as tap:
            for use_fused in (True, False):
                model.zero_grad()
                acts = tap(images)
                logits = (fused(acts, tokens="cls+ap", num_prefix_tokens=tap.num_prefix_tokens) if use_fused
                          else paper(stack_tokens(acts, "cls+ap", tap.num_prefix_tokens)))
                (logits * cotangent).sum().backward()
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and "blocks.0.attn.qkv.weight" in grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-7, atol=1e-10, msg=name)
    finally:
        model.float().zero_grad(set_to_none=True)


# --- feature cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_save_load_round_trip(tmp_path, dtype):
    features = torch.randn(7, 6, 10).to(dtype)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2], dtype=torch.int32)
    meta = {"model": "m", "layers": ["blocks.0.norm2", "norm"], "tokens": "cls+ap", "num_prefix_tokens": 1}
    record = save_features(tmp_path, "train", features, labels, meta=meta)
    loaded, loaded_labels = load_features(tmp_path, "train")
    assert loaded.dtype == dtype and loaded_labels.dtype == torch.int64
    assert torch.equal(loaded, features) and torch.equal(loaded_labels, labels.long())
    on_disk = json.loads((tmp_path / "train.json").read_text())
    assert on_disk == record == load_metadata(tmp_path, "train")
    assert on_disk["shape"] == [7, 6, 10] and on_disk["num_samples"] == 7
    assert on_disk["dtype"] == str(dtype).removeprefix("torch.")
    assert on_disk["fastfuse_version"] == fastfuse.__version__
    assert all(on_disk[key] == value for key, value in meta.items())
    if sys.platform.startswith("linux"):  # memory-mapped, not read into memory
        with open("/proc/self/maps") as maps:
            assert str(tmp_path / "train_features.npy") in maps.read()
    loaded[0, 0, 0] = 123  # copy-on-write: the file keeps its values
    assert torch.equal(load_features(tmp_path, "train")[0], features)
    assert complete_splits(tmp_path) == ["train"]


def test_feature_cache_errors(tmp_path):
    features, labels = torch.randn(4, 2, 3), torch.arange(4)
    cases = [
        (lambda: save_features(tmp_path, "a", features[0], labels), ValueError, "samples, tokens, dim"),
        (lambda: save_features(tmp_path, "a", features.long(), labels), TypeError, "floating"),
        (lambda: save_features(tmp_path, "a", features, labels.float()), TypeError, "integers"),
        (lambda: save_features(tmp_path, "a", features, labels[:3]), ValueError, "shape \\(4,\\)"),
        (lambda: save_features(tmp_path, "../a", features, labels), ValueError, "split"),
        (lambda: save_features(tmp_path, "a", features, labels, meta={"dtype": "float16"}), ValueError, "dtype"),
        (lambda: save_features(tmp_path, "a", features, labels, meta={"x": object()}), TypeError, "JSON"),
    ]
    for make, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            make()
    assert sorted(os.listdir(tmp_path)) == []  # failed writes leave nothing behind
    save_features(tmp_path, "val", features, labels)
    with pytest.raises(FileNotFoundError, match="'test'.*complete splits: val"):
        load_features(tmp_path, "test")


@pytest.mark.parametrize("key,tokens,dtype", [
    ("vit_s16", "cls+ap", torch.float32), ("vit_ti16", "all", torch.float32),
    ("vit_s14_reg4", "cls+ap", torch.float32), ("vit_s14_reg4", "ap", torch.float16)])
def test_cached_features_equal_gathered_taps(tmp_path, key, tokens, dtype):
    model = build(key)
    images = images_for(key, batch=7)
    labels = torch.arange(7) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=3)
    with LayerTap(model) as tap:
        writer = FeatureWriter(tmp_path, "train", dtype)
        extract_features(tap, loader, tokens=tokens, dtype=dtype, allocate=writer.allocate)
        writer.finish({"tokens": tokens})
        expected = stack_tokens(tap(images), tokens, MODELS[key][2])
    features, loaded_labels = load_features(tmp_path, "train")
    assert features.dtype == dtype and torch.equal(loaded_labels, labels)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(features, expected.to(dtype), rtol=tolerance, atol=tolerance)
    in_memory, _ = extract_features(LayerTap(model), loader, tokens=tokens, dtype=dtype)
    assert torch.equal(in_memory, features)


# --- extract CLI --------------------------------------------------------------------------------

def test_split_indices_fixed_disjoint_stratified():
    labels = np.repeat(np.arange(4), 20)
    parts = split_indices(labels)
    again = split_indices(labels)
    assert all(np.array_equal(parts[name], again[name]) for name in parts)
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(80))
    assert [len(parts[name]) for name in ("train", "val", "test")] == [56, 12, 12]
    assert all(np.bincount(labels[parts[name]]).tolist() == [len(parts[name]) // 4] * 4 for name in parts)


def test_cli_digits(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed: --data digits untested")
    out = tmp_path / "digits"
    argv = ["extract", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--data", "digits",
            "--layers", "paper", "--tokens", "cls+ap", "--out", str(out), "--batch-size", "512"]
    assert cli_main(argv + ["--dtype", "float16"]) == 0
    assert "randomly initialised" in capsys.readouterr().err
    counts = {}
    for split in ("train", "val", "test"):
        features, labels = load_features(out, split)
        assert features.shape[1:] == (26, 192) and features.dtype == torch.float16  # 13 layers x cls+ap
        assert bool(torch.isfinite(features.float()).all())
        assert set(labels.tolist()) == set(range(10))
        counts[split] = len(labels)
    assert sum(counts.values()) == 1797
    meta = load_metadata(out, "test")
    assert meta["model"] == "vit_tiny_patch16_224" and meta["pretrained"] is False
    assert meta["num_prefix_tokens"] == 1 and len(meta["layers"]) == 13 and meta["img_size"] == 32

    assert cli_main(argv) == 2  # exists: refuse
    assert "already exists" in capsys.readouterr().err
    assert cli_main(argv + ["--resume"]) == 2  # other dtype than the cache
    assert "dtype" in capsys.readouterr().err
    before = {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)}
    (out / "val.json").unlink()  # as if interrupted while writing val
    assert cli_main(argv + ["--resume", "--dtype", "float16"]) == 0
    captured = capsys.readouterr()
    assert "train: already complete" in captured.err and "val: 269" in captured.out
    assert (out / "train_features.npy").stat().st_mtime_ns == before["train_features.npy"]
    assert len(load_features(out, "val")[1]) == counts["val"]


def test_cli_image_folder(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)

    def write_images(folder, count):
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{index}.png")

    flat = tmp_path / "flat"
    for name in ("cat", "dog"):
        write_images(flat / name, 10)
    common = ["extract", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--layers", "0,-1", "--tokens", "all"]
    assert cli_main(common + ["--data", str(flat), "--out", str(tmp_path / "out_flat")]) == 0
    sizes = {split: len(load_features(tmp_path / "out_flat", split)[1]) for split in ("train", "val", "test")}
    assert sizes == {"train": 12, "val": 4, "test": 4}
    features, _ = load_features(tmp_path / "out_flat", "train")
    assert features.shape[1:] == (10, 192)  # 2 layers x (1 + 4) tokens

    tree = tmp_path / "tree"
    write_images(tree / "train" / "cat", 2)
    write_images(tree / "train" / "dog", 2)
    write_images(tree / "val" / "dog", 3)  # a split without one class keeps the class indices
    assert cli_main(common + ["--data", str(tree), "--out", str(tmp_path / "out_tree")]) == 0
    assert complete_splits(tmp_path / "out_tree") == ["train", "val"]
    assert load_features(tmp_path / "out_tree", "val")[1].tolist() == [1, 1, 1]
    assert load_metadata(tmp_path / "out_tree", "val")["classes"] == ["cat", "dog"]
    capsys.readouterr()


def test_cli_pretrained_offline_without_cached_weights(tmp_path, capsys, monkeypatch):
    """HF_HUB_OFFLINE=1 and nothing cached: a clear error, nothing written (no download tried)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read when called
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))
    argv = ["extract", "--model", "vit_tiny_patch16_224", "--pretrained", "--img-size", "32", "--data", "digits",
            "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 1
    assert "cannot load pretrained weights for vit_tiny_patch16_224" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pretrained_weights_load_from_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    safetensors_torch = pytest.importorskip("safetensors.torch")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the cache only, no network
    name = "vit_tiny_patch16_224"
    torch.manual_seed(5)
    source = timm.create_model(name, pretrained=False)  # full model, head included, as published
    repo_id = source.pretrained_cfg["hf_hub_id"]
    snapshot = tmp_path / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (tmp_path / f"models--{repo_id.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo_id.replace('/', '--')}" / "refs" / "main").write_text("0123abc")
    safetensors_torch.save_file(source.state_dict(), str(snapshot / "model.safetensors"))

    model, weights = create_backbone(name, pretrained=True, img_size=32, cache_dir=tmp_path)
    assert weights == str(snapshot / "model.safetensors")
    for key in ("cls_token", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias", "norm.weight"):
        assert torch.equal(model.state_dict()[key], source.state_dict()[key]), key
    assert model.pos_embed.shape == (1, 1 + 4, 192)  # resampled from 14x14 to 2x2 patches
