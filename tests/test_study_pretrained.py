"""--pretrained as timm does it: the hub cache (offline here: a cache this test fills itself),
a local checkpoint file, and a clear error when the weights are neither cached nor reachable."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfuse.extract import WeightsNotFound, create_backbone

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vit_tiny_patch16_224"


def reference_weights(seed=3):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(MODEL, pretrained=False).state_dict()  # with its 1000-class head


def test_local_checkpoint_file(tmp_path):
    state = reference_weights()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    model, source = create_backbone(MODEL, pretrained=str(path))
    assert source == str(path)
    loaded = model.state_dict()
    assert "head.weight" in state and "head.weight" not in loaded  # timm drops the classifier (num_classes=0)
    for key in ("cls_token", "pos_embed", "blocks.3.attn.qkv.weight", "norm.weight"):
        assert torch.equal(loaded[key], state[key])
    with pytest.raises(WeightsNotFound, match="not a file"):
        create_backbone(MODEL, pretrained=str(tmp_path / "missing.pth"))


SCRIPT = """
import sys, torch
from fastfuse.extract import WeightsNotFound, create_backbone
expected = torch.load(sys.argv[1], weights_only=True)
model, source = create_backbone("vit_tiny_patch16_224", pretrained=True)
state = model.state_dict()
assert all(torch.equal(state[key], expected[key]) for key in ("cls_token", "blocks.0.mlp.fc1.weight", "norm.bias"))
print("SOURCE", source)
try:
    create_backbone("vit_small_patch16_224", pretrained=True)   # not in the cache, and offline
except WeightsNotFound as error:
    print("MISSING", error)
"""


def test_hub_cache_offline(tmp_path):
    """Weights placed in the Hugging Face hub cache layout load with HF_HUB_OFFLINE=1."""
    import safetensors.torch
    import timm

    state = reference_weights()
    cfg = timm.models.get_pretrained_cfg(MODEL)
    repo = cfg.hf_hub_id                                   # timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    safetensors.torch.save_file({key: value.contiguous() for key, value in state.items()},
                                str(folder / "snapshots" / commit / "model.safetensors"))
    torch.save(state, tmp_path / "expected.pth")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "expected.pth")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"SOURCE {folder / 'snapshots' / commit / 'model.safetensors'}" in result.stdout
    assert "MISSING cannot load pretrained weights for vit_small_patch16_224" in result.stdout
    assert "HF_HUB_OFFLINE=1" in result.stdout
