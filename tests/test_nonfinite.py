"""NaN / Inf stay in their sample, in every backend (eval mode: BatchNorm uses running statistics)."""
import pytest
import torch

from helpers import make_probe


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter's numpy
@pytest.mark.parametrize("form", ["tokens", "layers"])
def test_nan_and_inf_stay_in_their_sample(backend_device, form):
    backend, device = backend_device
    probe = make_probe(backend, device).eval()
    generator = torch.Generator().manual_seed(3)
    if form == "tokens":
        clean = [torch.randn(5, 11, 16, generator=generator).to(device)]
        kwargs = {}
    else:
        clean = [torch.randn(5, t, 16, generator=generator).to(device) for t in (6, 8)]
        kwargs = {"tokens": "cls+ap", "num_prefix_tokens": 1}
    poisoned = [layer.clone() for layer in clean]
    poisoned[0][1, 3, 2] = float("nan")        # sample 1: a patch token ("ap" averages it)
    poisoned[-1][3, 0, 5] = float("inf")       # sample 3: the CLS token of the last layer
    poisoned[0][4, 2, 0] = -float("inf")       # sample 4
    bad, good = [1, 3, 4], [0, 2]
    x_clean = clean[0] if form == "tokens" else clean
    x_poisoned = poisoned[0] if form == "tokens" else poisoned
    with torch.no_grad():
        logits_clean, attention_clean = probe(x_clean, return_attention=True, **kwargs)
        logits, attention = probe(x_poisoned, return_attention=True, **kwargs)
    assert torch.isfinite(logits[good]).all() and torch.isfinite(attention[good]).all()
    assert torch.equal(logits[good], logits_clean[good])
    assert torch.equal(attention[good], attention_clean[good])
    for sample in bad:  # the poison shows: no silently finite answer
        assert not torch.isfinite(logits[sample]).all(), f"sample {sample} came out finite"
    # Twice, so that scratch memory reused by a kernel cannot carry the NaN into later calls.
    with torch.no_grad():
        again = probe(x_clean, **kwargs)
    assert torch.equal(again, logits_clean)
