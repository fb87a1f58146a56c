"""Non-contiguous, expanded (batch stride 0) and sliced views give what their contiguous copies
give, forward and backward, in every backend (layouts: tests/reference.py)."""
import pytest
import torch

from helpers import grads_of, make_probe
from reference import layout_storage_shape, layout_view, values


BATCH, NUM_TOKENS, DIM = 4, 9, 16


VIEWS = ("transposed", "expanded", "sliced")


@pytest.mark.parametrize("form", ["tokens", "layers"])
def test_views_match_contiguous_copies(backend_device, form):
    backend, device = backend_device
    probe = make_probe(backend, device).eval()
    names = list(VIEWS)
    generator = torch.Generator().manual_seed(0)
    storages = [values(layout_storage_shape(name, BATCH, NUM_TOKENS, DIM), generator, torch.float32)
                .to(device).requires_grad_() for name in names]

    def run(contiguous):
        views = [layout_view(name, storage, BATCH, NUM_TOKENS, DIM) for name, storage in zip(names, storages)]
        assert all(not view.is_contiguous() for view in views)
        assert views[1].stride(0) == 0, "the expanded view should have batch stride 0"
        if contiguous:
            views = [view.contiguous() for view in views]
        outputs = []
        if form == "tokens":
            for view in views:
                logits, attention = probe(view, return_attention=True)
                outputs += [logits, attention]
        else:
            logits, attention = probe(views, tokens="cls+ap", num_prefix_tokens=2, return_attention=True)
            outputs += [logits, attention]
        flat = torch.cat([out.flatten() for out in outputs])
        return [flat] + list(grads_of(flat, storages, probe))

    for label, got, want in zip(["outputs", *names, "parameters"], run(False), run(True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{label}: {m}")
