"""Save / load, deepcopy and pickle round trips of AttentiveFusion."""
import copy
import io
import pickle

import pytest
import torch

import fastfuse

from helpers import make_probe


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_save_load_deepcopy_pickle_round_trips(tmp_path, qkv_bias):
    probe = make_probe("torch", "cpu", dim=24, heads=3, qkv_bias=qkv_bias).eval()
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(11))
    layers = [torch.randn(5, t, 24, generator=torch.Generator().manual_seed(12)) for t in (4, 6)]

    def outputs(module):
        with torch.no_grad():
            return [module(x), *module(layers, tokens="cls+ap", return_attention=True)]

    expected = outputs(probe)
    copies = {}
    torch.save(probe, tmp_path / "module.pt")
    copies["torch.save(module)"] = torch.load(tmp_path / "module.pt", weights_only=False)
    buffer = io.BytesIO()
    torch.save(probe.state_dict(), buffer)
    buffer.seek(0)
    fresh = fastfuse.AttentiveFusion(24, 3, 3, qkv_bias=qkv_bias, backend="torch")
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    copies["torch.save(state_dict)"] = fresh.eval()
    copies["deepcopy"] = copy.deepcopy(probe)
    copies["pickle"] = pickle.loads(pickle.dumps(probe))
    for label, loaded in copies.items():
        assert loaded.backend == "torch" and not loaded.training, label
        assert loaded.head_dim == probe.head_dim and loaded.scale == probe.scale, label
        for got, want in zip(outputs(loaded), expected):
            assert torch.equal(got, want), label
    # A copy trains on its own: the original's parameters are untouched.
    trained = copies["pickle"].train()
    trained(x).sum().backward()
    assert probe.query_token.grad is None
