"""Property-based tests (issue 8): random shapes, head counts, token specs, prefix counts, dtypes
and strides, every available backend against the unfused paper probe (SPEC §1) in float64.

Each example builds an AttentiveFusion with random parameters, loads them into
fastfuse.paper.PaperAttentiveProbe, feeds it the token stack built independently
(tests/reference.stack_tokens) and compares logits, attention and the gradients of the
inputs and of every parameter. Eval mode: BatchNorm uses its (random) running statistics, so
a batch of 0 or 1 is a valid input and identical samples (expanded views) are well conditioned.
Examples per backend: 50 (25 for Triton under the interpreter, ~0.15 s each); set
FASTFUSE_PROPERTY_EXAMPLES for a longer hunt.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastfuse
from fastfuse.paper import PaperAttentiveProbe

from reference import LAYOUTS, RANDOM_PROBLEM_TOLERANCE, make_layer, randomize_, rel_err, same_layout, stack_tokens


@st.composite
def problems(draw):
    spec = draw(st.sampled_from([None, "cls", "ap", "cls+ap", "all"]))
    if spec is None:  # a (B, N, D) token tensor
        num_prefix_tokens, lengths = 0, [draw(st.integers(1, 12))]
    else:
        num_prefix_tokens = draw(st.integers(0, 3))
        shortest = {"cls": 1, "ap": num_prefix_tokens + 1, "cls+ap": num_prefix_tokens + 1,
                    "all": 0}[spec]
        lengths = draw(st.lists(st.integers(shortest, shortest + 8), min_size=1, max_size=3))
        if spec == "all" and sum(lengths) == 0:
            lengths[0] = 1
    return {
        "batch": draw(st.integers(0, 4)),
        "dim": draw(st.integers(1, 24)),
        "heads": draw(st.integers(1, 4)),
        "head_dim": draw(st.integers(1, 8)),  # explicit: the default 2 * (D // H) may be 0
        "qkv_bias": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "spec": spec,
        "num_prefix_tokens": num_prefix_tokens,
        "lengths": lengths,
        "layouts": [draw(st.sampled_from(LAYOUTS)) for _ in lengths],
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_against_paper(backend, device, problem):
    dtype, dim, heads = problem["dtype"], problem["dim"], problem["heads"]
    generator = torch.Generator().manual_seed(problem["seed"])
    fused = fastfuse.AttentiveFusion(dim, heads, 5, head_dim=problem["head_dim"],
                                     qkv_bias=problem["qkv_bias"], backend=backend).double()
    randomize_(fused, seed=problem["seed"] % 1000)
    reference = PaperAttentiveProbe(dim, heads, 5, head_dim=problem["head_dim"],
                                    qkv_bias=problem["qkv_bias"]).double()
    reference.load_state_dict(fused.state_dict(), strict=True)
    fused = fused.to(device=device, dtype=dtype).eval()
    reference.eval()

    base = [make_layer(problem["batch"], length, dim, layout, generator)
            for length, layout in zip(problem["lengths"], problem["layouts"])]
    layers = [same_layout(layer, dtype, device) for layer in base]
    ref_layers = [layer.detach().double().cpu().requires_grad_() for layer in layers]

    spec, prefix = problem["spec"], problem["num_prefix_tokens"]
    if spec is None:
        logits, attention = fused(layers[0], return_attention=True)
        ref_logits, ref_attention = reference(ref_layers[0], return_attention=True)
    else:
        logits, attention = fused(layers, tokens=spec, num_prefix_tokens=prefix, return_attention=True)
        ref_logits, ref_attention = reference(stack_tokens(ref_layers, spec, prefix), return_attention=True)

    assert logits.shape == ref_logits.shape and attention.shape == ref_attention.shape
    assert attention.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = RANDOM_PROBLEM_TOLERANCE[dtype]
    for name, got, want in (("logits", logits, ref_logits), ("attention", attention, ref_attention)):
        error = rel_err(got, want, floor=1.0)
        assert error <= tol, f"{name}: relative error {error:.3g}"

    weights = torch.randn(ref_logits.shape, generator=generator, dtype=torch.float64)
    attn_weights = torch.randn(ref_attention.shape, generator=generator, dtype=torch.float64)
    loss = (logits * weights.to(logits)).sum() + (attention * attn_weights.to(attention)).sum()
    ref_loss = (ref_logits * weights).sum() + (ref_attention * attn_weights).sum()
    names = [name for name, _ in reference.named_parameters()]
    params = dict(fused.named_parameters())
    grads = torch.autograd.grad(loss, layers + [params[n] for n in names], allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_layers + list(reference.parameters()),
                                    allow_unused=True)
    ref_grads = [torch.zeros_like(p) if g is None else g
                 for g, p in zip(ref_grads, ref_layers + list(reference.parameters()))]
    common = max([g.abs().max().item() for g in ref_grads if g.numel()] + [1e-12])
    labels = [f"layer{i}" for i in range(len(layers))] + names
    for label, grad, ref_grad in zip(labels, grads, ref_grads):
        assert grad is not None and grad.shape == ref_grad.shape, label
        if not ref_grad.numel():
            continue
        own = ref_grad.abs().max().item()
        # Mathematically-zero gradients (N = 1, D = 1) are judged against the common scale.
        error = rel_err(grad, ref_grad, scale=own + 0.1 * common)
        assert error <= 10 * tol, f"{label}: relative error {error:.3g}, scale {own:.3g}"


def test_random_problems_match_paper(backend_device):
    backend, device = backend_device
    interpreted = backend == "triton" and device == "cpu"
    examples = int(os.environ.get("FASTFUSE_PROPERTY_EXAMPLES", 0)) or (25 if interpreted else 50)

    @settings(max_examples=examples // 4 if interpreted and examples > 25 else examples,
              deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(problem=problems())
    def run(problem):
        check_against_paper(backend, device, problem)

    run()


@pytest.mark.parametrize("spec", ["all", "cls+ap"])
def test_known_edge_cases(backend_device, spec):
    """Cases the strategies reach only rarely: D = 1 (LayerNorm output 0), one token, empty
    layers under "all", a batch of 0 or 1, heads of size 1."""
    backend, device = backend_device
    cases = [
        dict(batch=3, dim=1, heads=2, head_dim=1, lengths=[4, 2]),
        dict(batch=2, dim=5, heads=1, head_dim=1, lengths=[1, 1] if spec == "all" else [2, 2]),
        dict(batch=0, dim=7, heads=3, head_dim=2, lengths=[3, 4]),
        dict(batch=1, dim=4, heads=2, head_dim=2, lengths=[3, 2]),  # contiguous parts of dx
    ]
    if spec == "all":
        cases.append(dict(batch=2, dim=6, heads=2, head_dim=3, lengths=[0, 3, 0]))
    for case in cases:
        for dtype in (torch.float32, torch.float64):
            check_against_paper(backend, device, dict(
                case, qkv_bias=True, dtype=dtype, spec=spec, num_prefix_tokens=1,
                layouts=["transposed"] * len(case["lengths"]), seed=1))
