"""The eval-mode composed head (fastfuse/composed_head.py) against the paper's unfused probe.

float64 at 1e-10, on both sides of the break-even point (D=16, H=2, hd=16: the composed map is
cheaper while C < 64), and after every way parameters change: optimizer steps, load_state_dict,
dtype moves and in-place writes to buffers. The cache must never serve a stale map.
"""
import copy
import io

import pytest
import torch

import fastfuse
from fastfuse.composed_head import composed_is_cheaper
from fastfuse.paper import PaperAttentiveProbe
from fastfuse.sweep.stacked import StackedAttentiveFusion

from reference import randomize_

DIM, HEADS = 16, 2
SMALL_C, LARGE_C = 5, 80      # below and above the break-even C = 64
TOL = dict(rtol=1e-10, atol=1e-10)


def pair(num_classes, qkv_bias=False, seed=0):
    paper = randomize_(PaperAttentiveProbe(DIM, HEADS, num_classes, qkv_bias=qkv_bias).double(), seed=seed)
    probe = fastfuse.AttentiveFusion(DIM, HEADS, num_classes, qkv_bias=qkv_bias).double()
    probe.load_state_dict(paper.state_dict(), strict=True)
    return paper.eval(), probe.eval()


def tokens(batch=7, num_tokens=6, seed=1):
    return torch.randn(batch, num_tokens, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cost_rule():
    assert composed_is_cheaper(100, 12, 128, 768)      # ViT-B, C=100
    assert not composed_is_cheaper(1000, 12, 128, 768)  # ImageNet-1k
    assert composed_is_cheaper(SMALL_C, HEADS, 16, DIM)
    assert not composed_is_cheaper(LARGE_C, HEADS, 16, DIM)


@pytest.mark.parametrize("num_classes", [SMALL_C, LARGE_C])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_eval_matches_paper(num_classes, qkv_bias, context):
    paper, probe = pair(num_classes, qkv_bias)
    x = tokens()
    manager = torch.no_grad if context == "no_grad" else torch.inference_mode
    with manager():
        assert probe._uses_composed_head() == (num_classes == SMALL_C)
        expected, expected_attention = paper(x, return_attention=True)
        for _ in range(2):  # the second call is served by the cache
            logits, attention = probe(x, return_attention=True)
            torch.testing.assert_close(logits, expected, **TOL)
            torch.testing.assert_close(attention, expected_attention, **TOL)
            torch.testing.assert_close(probe(x), expected, **TOL)


def test_cache_follows_optimizer_steps_and_loads():
    paper, probe = pair(SMALL_C, qkv_bias=True)
    x, labels = tokens(), torch.arange(7) % SMALL_C
    optimizers = [torch.optim.AdamW(probe.parameters(), lr=0.05), torch.optim.SGD(probe.parameters(), lr=0.1)]
    with torch.no_grad():
        probe(x)  # build the map
    for optimizer in optimizers:
        probe.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(x), labels).backward()
        optimizer.step()             # parameters and BN running statistics change in place
        probe.eval()
        paper.load_state_dict(probe.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(probe(x), paper(x), **TOL)
    fresh = randomize_(PaperAttentiveProbe(DIM, HEADS, SMALL_C, qkv_bias=True).double(), seed=5).eval()
    probe.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(probe(x), fresh(x), **TOL)
        probe.bn.running_mean.add_(0.5)           # an in-place write to a buffer
        fresh.bn.running_mean.add_(0.5)
        torch.testing.assert_close(probe(x), fresh(x), **TOL)


def test_cache_follows_dtype_moves():
    paper, _ = pair(SMALL_C)
    probe = fastfuse.AttentiveFusion(DIM, HEADS, SMALL_C)
    probe.load_state_dict(paper.state_dict())      # float32 copy of the parameters
    probe.eval()
    x = tokens()
    with torch.no_grad():
        probe(x.float())                            # a float32 map is cached
        probe.double()
        reference = PaperAttentiveProbe(DIM, HEADS, SMALL_C).double().eval()
        reference.load_state_dict(probe.state_dict())
        torch.testing.assert_close(probe(x), reference(x), **TOL)
        probe.to(torch.float32)
        torch.testing.assert_close(probe(x.float()), reference(x).float(), rtol=1e-4, atol=1e-5)


def test_copies_and_pickles_start_with_an_empty_cache():
    paper, probe = pair(SMALL_C)
    x = tokens()
    with torch.no_grad():
        probe(x)
        clone = copy.deepcopy(probe)
        buffer = io.BytesIO()
        torch.save(probe, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            clone.classifier.bias.add_(1.0)
            paper.classifier.bias.add_(1.0)
        torch.testing.assert_close(clone(x), paper(x), **TOL)
        torch.testing.assert_close(loaded(x), paper(x) - 1.0, **TOL)


@pytest.mark.parametrize("training", [True, False])
def test_gradients_unaffected(training):
    """With a graph into the parameters (training, or eval with grad enabled) no cached map is used."""
    paper, probe = pair(SMALL_C, qkv_bias=True)
    paper.train(training), probe.train(training)
    x, labels = tokens(), torch.arange(7) % SMALL_C
    with torch.no_grad():
        probe.eval()(x)  # a cached map exists; it must not leak into the graph
    probe.train(training)
    assert not probe._uses_composed_head()
    for module in (paper, probe):
        torch.nn.functional.cross_entropy(module(x), labels).backward()
    paper_grads = dict(paper.named_parameters())
    for name, parameter in probe.named_parameters():
        torch.testing.assert_close(parameter.grad, paper_grads[name].grad, **TOL, msg=name)


def test_input_gradient_through_composed_head():
    """Frozen parameters in eval mode: the composed map is used and inputs still get gradients."""
    paper, probe = pair(SMALL_C)
    probe.requires_grad_(False), paper.requires_grad_(False)
    assert probe._uses_composed_head()
    x = tokens().requires_grad_(True)
    x_paper = x.detach().clone().requires_grad_(True)
    probe(x).square().sum().backward()
    paper(x_paper).square().sum().backward()
    torch.testing.assert_close(x.grad, x_paper.grad, **TOL)


@pytest.mark.parametrize("num_classes", [SMALL_C, LARGE_C])
def test_stacked_eval_matches_paper(num_classes):
    papers = [randomize_(PaperAttentiveProbe(DIM, HEADS, num_classes, qkv_bias=True).double(), seed=s).eval()
              for s in range(3)]
    probes = []
    for paper in papers:
        probe = fastfuse.AttentiveFusion(DIM, HEADS, num_classes, qkv_bias=True).double()
        probe.load_state_dict(paper.state_dict())
        probes.append(probe)
    stacked = StackedAttentiveFusion(probes).eval()
    x, labels = tokens(), torch.arange(7) % num_classes
    with torch.no_grad():
        assert stacked._uses_composed_head() == (num_classes == SMALL_C)
        logits, attention = stacked(x, return_attention=True)
    for index, paper in enumerate(papers):
        expected, expected_attention = paper(x, return_attention=True)
        torch.testing.assert_close(logits[:, index], expected.detach(), **TOL)
        torch.testing.assert_close(attention[:, index], expected_attention.detach(), **TOL)
    # One training step of every probe, then eval again: the cache must follow.
    stacked.train()
    optimizer = torch.optim.SGD(stacked.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(stacked(x).flatten(0, 1), labels.repeat_interleave(3)).backward()
    optimizer.step()
    stacked.eval()
    with torch.no_grad():
        logits = stacked(x)
        for index in range(3):
            reference = PaperAttentiveProbe(DIM, HEADS, num_classes, qkv_bias=True).double().eval()
            reference.load_state_dict(stacked.unstack(index))
            torch.testing.assert_close(logits[:, index], reference(x), **TOL)
