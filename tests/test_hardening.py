"""Hardening (issue 8): bad input never crashes, odd layouts and poisoned samples stay correct,
CPU results are reproducible, torch.compile matches eager, half precision, fallbacks when the
compiled extension is missing or broken, and save/load round trips.

Bad-input messages, inputs-not-modified and the empty batch are in test_module.py /
test_backends.py; here only what those do not cover.
"""
import copy
import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

import fastfuse
from fastfuse import _extension
from fastfuse.paper import PaperAttentiveProbe

from reference import randomize_

dispatch = sys.modules["fastfuse.backends"]  # the package: fastfuse.backends is the report function
PACKAGE_DIR = Path(fastfuse.__file__).resolve().parent


def make_probe(backend, device, *, dim=16, heads=2, classes=3, seed=0, **kwargs):
    probe = fastfuse.AttentiveFusion(dim, heads, classes, backend=backend, **kwargs)
    return randomize_(probe, seed=seed).to(device)


def grads_of(output, inputs, probe):
    """Gradients of a fixed random projection of ``output`` w.r.t. inputs and parameters."""
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(9)).to(output)
    return torch.autograd.grad((output * weights).sum(), list(inputs) + list(probe.parameters()))


def run_python(code, *args, env=None, cwd=None, timeout=240):
    """A fresh interpreter, so that an abort or a segfault fails the test instead of pytest."""
    full_env = {**os.environ, "FASTFUSE_BACKEND": "", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def cpu_backend_available():
    entry = fastfuse.backends()["cpu"]
    return entry["available"], entry["reason"]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_bad_input_devices_dtypes_and_arguments():
    probe = fastfuse.AttentiveFusion(16, 2, 3)
    cpu_x = torch.randn(2, 4, 16)
    meta_x = torch.randn(2, 4, 16, device="meta")  # stands in for a second device
    cases = [
        (lambda: probe(meta_x), ValueError, "x is on meta but the probe's parameters are on cpu"),
        (lambda: probe([cpu_x, meta_x]), ValueError, r"x\[1\] is on meta but x\[0\] is on cpu"),
        (lambda: fastfuse.attentive_pool(cpu_x, torch.randn(2, 16, device="meta")), ValueError,
         "score_weight is on meta but the tokens are on cpu"),
        (lambda: fastfuse.attentive_pool(meta_x, torch.randn(2, 16, device="meta"), backend="cpu"),
         RuntimeError, "backend 'cpu' cannot run this input.*serves cpu tensors, got a meta tensor"),
        (lambda: probe([cpu_x, cpu_x.double()]), TypeError,
         r"x\[1\] has dtype torch.float64 but x\[0\] has torch.float32"),
        (lambda: probe([cpu_x, cpu_x.half()]), TypeError, r"x\[1\] has dtype torch.float16"),
        (lambda: probe(cpu_x.to(torch.complex64)), TypeError, "x must be a floating tensor"),
        (lambda: probe([cpu_x], num_prefix_tokens=True), TypeError, "num_prefix_tokens must be an int"),
        (lambda: probe([cpu_x], tokens=3), ValueError, "tokens must be one of"),
        (lambda: fastfuse.attentive_pool(torch.randn(2, 3, 0), torch.randn(2, 0)), ValueError,
         "x has feature size 0"),
        (lambda: fastfuse.attentive_pool(cpu_x, torch.randn(2, 16).long()), TypeError,
         "score_weight must be a floating tensor"),
        (lambda: fastfuse.attentive_pool(cpu_x, [[0.0] * 16]), TypeError,
         "score_weight must be a torch.Tensor"),
        (lambda: fastfuse.attentive_pool(cpu_x, torch.randn(16)), ValueError,
         r"score_weight must have shape \(heads, 16\)"),
        (lambda: fastfuse.attentive_pool(cpu_x, torch.randn(0, 16)), ValueError,
         r"score_weight must have shape \(heads, 16\)"),
        (lambda: fastfuse.attentive_pool(cpu_x, torch.randn(2, 16), eps=-1e-5), ValueError,
         "eps must be a finite number >= 0"),
        (lambda: fastfuse.attentive_pool(cpu_x, torch.randn(2, 16), eps=float("nan")), ValueError,
         "eps must be"),
        (lambda: fastfuse.attentive_pool(cpu_x, torch.randn(2, 16), eps="1e-5"), ValueError,
         "eps must be"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_state_dict_missing_unexpected_and_wrong_shape_name_the_key():
    probe = fastfuse.AttentiveFusion(16, 2, 3)
    state = probe.state_dict()

    missing = {k: v for k, v in state.items() if k != "classifier.bias"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*classifier\.bias"):
        probe.load_state_dict(missing)

    with_bias = fastfuse.AttentiveFusion(16, 2, 3, qkv_bias=True).state_dict()
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*attn_block\.cross_attn\.q_bias"):
        probe.load_state_dict(with_bias)

    other_classes = fastfuse.AttentiveFusion(16, 2, 5).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for classifier\.weight.*\[5, 16\].*\[3, 16\]"):
        probe.load_state_dict(other_classes)

    # H * head_dim differs (8 vs 32). A checkpoint with the same H * head_dim but another H
    # cannot be told apart: the paper's keys do not record H (docs/hardening.md).
    other_heads = PaperAttentiveProbe(16, 4, 3, head_dim=2).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for attn_block\.cross_attn\.k\.weight"):
        probe.load_state_dict(other_heads)
    # A failed strict load leaves a usable module behind.
    assert probe(torch.randn(2, 4, 16)).shape == (2, 3)


_KERNEL_ABUSE_SCRIPT = textwrap.dedent("""
    import json, torch, fastfuse
    from fastfuse import _extension
    loaded, reason = _extension.load()
    assert loaded, reason
    ops = torch.ops.fastfuse
    # The backward schema may or may not carry the trailing layers_need_grad flag.
    extra = [True] if len(ops.fused_pool_backward.default._schema.arguments) >= 11 else []
    def backward(*args):
        return ops.fused_pool_backward(*args, *extra)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g)
    w = torch.randn(3, 6, generator=g)
    pooled, attention, mean, rstd = ops.fused_pool_forward([x], w, "cls+ap", 1, 1e-5)  # N = 2
    gp = torch.randn_like(pooled)
    backward(gp, torch.randn_like(attention), [x], w, pooled, attention, mean, rstd, "cls+ap", 1)

    fwd = ops.fused_pool_forward
    cases = {
        "no layers": lambda: fwd([], w, "all", 0, 1e-5),
        "2-D layer": lambda: fwd([torch.randn(2, 6)], w, "all", 0, 1e-5),
        "4-D layer": lambda: fwd([torch.randn(2, 5, 6, 1)], w, "all", 0, 1e-5),
        "D mismatch with weight": lambda: fwd([torch.randn(2, 5, 7)], w, "all", 0, 1e-5),
        "D mismatch between layers": lambda: fwd([x, torch.randn(2, 5, 7)], w, "all", 0, 1e-5),
        "B mismatch between layers": lambda: fwd([x, torch.randn(3, 5, 6)], w, "all", 0, 1e-5),
        "dtype mismatch between layers": lambda: fwd([x, x.double()], w, "all", 0, 1e-5),
        "D = 0": lambda: fwd([torch.randn(2, 5, 0)], torch.randn(3, 0), "all", 0, 1e-5),
        "integer layers": lambda: fwd([torch.ones(2, 5, 6, dtype=torch.int32)], w, "all", 0, 1e-5),
        "bool layers": lambda: fwd([torch.ones(2, 5, 6, dtype=torch.bool)], w, "all", 0, 1e-5),
        "token spec ''": lambda: fwd([x], w, "", 0, 1e-5),
        "token spec 'CLS'": lambda: fwd([x], w, "CLS", 0, 1e-5),
        "token spec with NUL": lambda: fwd([x], w, "cls\\x00", 0, 1e-5),
        "num_prefix_tokens == T (ap)": lambda: fwd([x], w, "ap", 5, 1e-5),
        "num_prefix_tokens > T (cls+ap)": lambda: fwd([x], w, "cls+ap", 9, 1e-5),
        "num_prefix_tokens huge": lambda: fwd([x], w, "ap", 2**62, 1e-5),
        "num_prefix_tokens < 0": lambda: fwd([x], w, "ap", -1, 1e-5),
        "cls of an empty layer": lambda: fwd([torch.randn(2, 0, 6)], w, "cls", 0, 1e-5),
        "1-D weight": lambda: fwd([x], torch.randn(6), "all", 0, 1e-5),
        "3-D weight": lambda: fwd([x], torch.randn(1, 3, 6), "all", 0, 1e-5),
        "weight with H = 0": lambda: fwd([x], torch.randn(0, 6), "all", 0, 1e-5),
        "float64 weight for float32 layers": lambda: fwd([x], w.double(), "all", 0, 1e-5),
        "float16 weight": lambda: fwd([x.half()], w.half(), "all", 0, 1e-5),
        "float32 weight for float64 layers": lambda: fwd([x.double()], w, "all", 0, 1e-5),
        "integer weight": lambda: fwd([x], w.long(), "all", 0, 1e-5),
        "grad_pooled wrong D": lambda: backward(torch.randn(2, 3, 5), None, [x], w, pooled, attention, mean, rstd, "cls+ap", 1),
        "grad_pooled wrong B": lambda: backward(torch.randn(3, 3, 6), None, [x], w, pooled, attention, mean, rstd, "cls+ap", 1),
        "grad_pooled float64": lambda: backward(gp.double(), None, [x], w, pooled, attention, mean, rstd, "cls+ap", 1),
        "grad_attention wrong N": lambda: backward(gp, torch.randn(2, 3, 3), [x], w, pooled, attention, mean, rstd, "cls+ap", 1),
        "grad_attention float64": lambda: backward(gp, attention.double(), [x], w, pooled, attention, mean, rstd, "cls+ap", 1),
        "pooled wrong H": lambda: backward(gp, None, [x], w, torch.randn(2, 4, 6), attention, mean, rstd, "cls+ap", 1),
        "attention wrong N": lambda: backward(gp, None, [x], w, pooled, torch.randn(2, 3, 7), mean, rstd, "cls+ap", 1),
        "attention for another spec": lambda: backward(gp, None, [x], w, pooled, attention, mean, rstd, "all", 0),
        "mean wrong shape": lambda: backward(gp, None, [x], w, pooled, attention, torch.randn(2, 3), rstd, "cls+ap", 1),
        "rstd float64": lambda: backward(gp, None, [x], w, pooled, attention, mean, rstd.double(), "cls+ap", 1),
        "backward bad token spec": lambda: backward(gp, None, [x], w, pooled, attention, mean, rstd, "mean", 1),
        "backward num_prefix_tokens >= T": lambda: backward(gp, None, [x], w, pooled, attention, mean, rstd, "cls+ap", 5),
        "backward wrong weight shape": lambda: backward(gp, None, [x], torch.randn(3, 7), pooled, attention, mean, rstd, "cls+ap", 1),
        "backward weight dtype": lambda: backward(gp, None, [x], w.double(), pooled, attention, mean, rstd, "cls+ap", 1),
        "backward no layers": lambda: backward(gp, None, [], w, pooled, attention, mean, rstd, "cls+ap", 1),
        "normalize 'rms'": lambda: fwd([x], w, "all", 0, 1e-5, "rms"),
        "backward normalize ''": lambda: ops.fused_pool_backward(gp, None, [x], w, pooled, attention, mean, rstd, "cls+ap", 1, True, ""),
        "moments no layers": lambda: ops.fused_token_moments([], "all", 0),
        "moments bad token spec": lambda: ops.fused_token_moments([x], "mean", 0),
        "moments integer layers": lambda: ops.fused_token_moments([torch.ones(2, 5, 6, dtype=torch.int32)], "all", 0),
        "moments num_prefix_tokens == T": lambda: ops.fused_token_moments([x], "ap", 5),
    }
    failures = {}
    for name, call in cases.items():
        try:
            call()
        except RuntimeError as error:
            if "fastfuse" not in str(error):
                failures[name] = "RuntimeError without 'fastfuse': " + str(error)[:200]
        except Exception as error:
            failures[name] = type(error).__name__ + ": " + str(error)[:200]
        else:
            failures[name] = "no error"
    print(json.dumps({"checked": len(cases), "failures": failures}))
""")


def test_compiled_kernels_reject_bad_arguments_without_crashing():
    available, reason = cpu_backend_available()
    if not available:
        pytest.skip(f"cpu backend unavailable: {reason}")
    result = run_python(_KERNEL_ABUSE_SCRIPT, timeout=120)
    assert result.returncode == 0, (f"the process died (rc {result.returncode}): "
                                    f"{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["checked"] >= 40
    assert report["failures"] == {}, report["failures"]


# --------------------------------------------------------------------------------------------
# Layouts: non-contiguous, expanded (stride 0 along the batch) and sliced views
# --------------------------------------------------------------------------------------------

BATCH, NUM_TOKENS, DIM = 4, 9, 16


def _leaf(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 1.5 + 0.3).requires_grad_()


# name -> (shape of the storage, storage -> (B, N, D) view)
VIEWS = {
    "transposed": ((NUM_TOKENS, BATCH, DIM + 2), lambda s: s.transpose(0, 1)[..., 1:DIM + 1]),
    "expanded": ((1, NUM_TOKENS, DIM), lambda s: s.expand(BATCH, -1, -1)),
    "sliced": ((BATCH + 3, NUM_TOKENS + 4, 2 * DIM + 1), lambda s: s[1:BATCH + 1, 2:NUM_TOKENS + 2, 1::2]),
}


@pytest.mark.parametrize("form", ["tokens", "layers"])
def test_views_match_contiguous_copies(backend_device, form):
    backend, device = backend_device
    probe = make_probe(backend, device).eval()
    names = list(VIEWS)
    storages = [_leaf(VIEWS[name][0], seed).to(device).detach().requires_grad_()
                for seed, name in enumerate(names)]

    def run(contiguous):
        views = [VIEWS[name][1](storage) for name, storage in zip(names, storages)]
        assert all(not view.is_contiguous() for view in views)
        if views[1].stride(0) != 0:
            raise AssertionError("the expanded view should have batch stride 0")
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


# --------------------------------------------------------------------------------------------
# NaN / Inf stay in their sample (eval mode: BatchNorm uses running statistics)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Reproducibility and threads
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_training_step_is_bitwise_reproducible(backend):
    if backend == "cpu" and not cpu_backend_available()[0]:
        pytest.skip(f"cpu backend unavailable: {cpu_backend_available()[1]}")
    # Big enough that the compiled kernels split the batch over two OpenMP threads.
    initial = make_probe(backend, "cpu", dim=64, heads=4, classes=5).train()
    generator = torch.Generator().manual_seed(4)
    layers = [torch.randn(48, t, 64, generator=generator) for t in (40, 25)]
    labels = torch.randint(0, 5, (48,), generator=generator)

    def step():
        probe = copy.deepcopy(initial)
        optimizer = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
        inputs = [layer.clone().requires_grad_() for layer in layers]
        logits, attention = probe(inputs, tokens="all", return_attention=True)
        loss = torch.nn.functional.cross_entropy(logits, labels) + attention.square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in probe.parameters()] + [x.grad for x in inputs]
        optimizer.step()
        return [logits, attention] + grads + [p.detach() for p in probe.parameters()] + \
            [probe.bn.running_mean, probe.bn.running_var]

    first, second = step(), step()
    for index, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {index} differs between two identical training steps"


@pytest.mark.parametrize("with_grad", [False, True], ids=["no_grad", "grad"])
def test_two_threads_share_one_module(backend_device, with_grad):
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter is not thread-safe (it patches triton.language while "
                    "a kernel runs: 'Did you forget to add @triton.jit ?'); GPU launches are")
    probe = make_probe(backend, device, dim=24, heads=3).eval()
    generator = torch.Generator().manual_seed(5)
    inputs = [[torch.randn(6, t, 24, generator=generator).to(device) for t in (7, 5)] for _ in range(2)]
    rounds = 6

    def compute(layers):
        if not with_grad:
            with torch.no_grad():
                return [probe(layers, tokens="cls+ap")]
        layers = [layer.clone().requires_grad_() for layer in layers]
        logits = probe(layers, tokens="cls+ap")
        return [logits.detach(), *grads_of(logits, layers, probe)]

    expected = [compute(layers) for layers in inputs]
    results, errors = [[], []], []
    barrier = threading.Barrier(2)

    def worker(index):
        try:
            barrier.wait(timeout=60)
            for _ in range(rounds):
                results[index].append(compute(inputs[index]))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    assert not errors, errors
    for index in range(2):
        assert len(results[index]) == rounds
        for result in results[index]:
            for got, want in zip(result, expected[index]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

def _compare_compiled(probe, compiler, make_inputs, call, rtol, atol):
    """Eager and compiled (on a deep copy, so BatchNorm statistics start equal): forward,
    gradients of inputs and parameters, and the updated running statistics."""
    compiled_probe = copy.deepcopy(probe)
    compiled = torch.compile(compiled_probe, fullgraph=True, backend=compiler)
    results = []
    for module, fn in ((compiled_probe, compiled), (probe, probe)):
        inputs = make_inputs()
        logits, attention = call(fn, inputs)
        flat = torch.cat([logits.flatten(), attention.flatten()])
        results.append([flat, *grads_of(flat, inputs, module), module.bn.running_mean])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("form", ["tokens", "layers"])
def test_compile_fullgraph_matches_eager(backend_device, form, monkeypatch):
    backend, device = backend_device
    torch._dynamo.reset()
    # Compiling must also work as the first call of a process, before anything loaded the
    # compiled extension (its loader takes a lock, which dynamo cannot trace).
    monkeypatch.setattr(_extension, "_state", None)
    probe = make_probe(backend, device).train()
    generator = torch.Generator().manual_seed(6)
    if form == "tokens":
        data = [torch.randn(4, 7, 16, generator=generator).to(device)]

        def call(fn, inputs):
            return fn(inputs[0], return_attention=True)
    else:
        data = [torch.randn(4, t, 16, generator=generator).to(device) for t in (6, 9)]

        def call(fn, inputs):
            return fn(inputs, tokens="cls+ap", num_prefix_tokens=2, return_attention=True)

    def make_inputs():
        return [tensor.clone().requires_grad_() for tensor in data]

    _compare_compiled(probe, "aot_eager", make_inputs, call, rtol=1e-6, atol=1e-6)


def test_compile_with_inductor_cpu_backend():
    """The default compiler once (it generates and builds C++ here: ~20 s on two cores)."""
    if not cpu_backend_available()[0]:
        pytest.skip(f"cpu backend unavailable: {cpu_backend_available()[1]}")
    torch._dynamo.reset()
    probe = make_probe("cpu", "cpu").train()
    data = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(7))
    _compare_compiled(probe, "inductor", lambda: [data.clone().requires_grad_()],
                      lambda fn, inputs: fn(inputs[0], return_attention=True), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Half precision on CPU
# --------------------------------------------------------------------------------------------

HALF_GRAD_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_tokens_accumulate_in_float32(backend_device, dtype):
    """Every backend here declares half dtypes: half tokens are computed in float32, so the
    result equals (to float32 rounding) that of the same values passed as float32."""
    backend, device = backend_device
    assert dtype in dispatch.get(backend).dtypes
    probe = make_probe(backend, device, dim=24, heads=3).eval()
    generator = torch.Generator().manual_seed(8)
    data = [torch.randn(3, t, 24, generator=generator).to(device=device, dtype=dtype) for t in (9, 6)]
    results = []
    for as_dtype in (dtype, torch.float32):
        layers = [layer.to(as_dtype).requires_grad_() for layer in data]
        logits, attention = probe(layers, tokens="cls+ap", return_attention=True)
        assert logits.dtype == attention.dtype == torch.float32
        flat = torch.cat([logits.flatten(), attention.flatten()])
        grads = grads_of(flat, layers, probe)
        assert grads[0].dtype == as_dtype  # layer gradients come back in the layer's dtype
        results.append([flat, *grads])
    (flat, *grads), (flat_32, *grads_32) = results
    torch.testing.assert_close(flat, flat_32, rtol=1e-5, atol=1e-6)
    for index, (grad, grad_32) in enumerate(zip(grads, grads_32)):
        rtol = HALF_GRAD_RTOL[dtype] if index < len(data) else 1e-5  # layer grads are rounded
        scale = grad_32.abs().max().item()
        error = (grad.float() - grad_32).abs().max().item()
        assert error <= rtol * scale + 1e-7, f"gradient {index}: {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_module_with_float32_parameters_takes_half_tokens(dtype):
    """auto backend: half tokens are close to the float32 result of the unrounded tokens."""
    probe = make_probe(None, "cpu", dim=32, heads=4).eval()
    tokens = torch.randn(6, 20, 32, generator=torch.Generator().manual_seed(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every backend "auto" picks on CPU takes half tokens
        logits = probe(tokens.to(dtype))
    expected = probe(tokens)
    error = (logits - expected).abs().max().item() / expected.abs().max().item()
    assert logits.dtype == torch.float32 and error < {torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_backend_without_half_dtypes_refuses_with_type_error_or_auto_falls_back(dtype, monkeypatch):
    """A backend that does not declare a dtype: asked for explicitly, a TypeError naming the
    dtype; under "auto", the pure-PyTorch backend with one warning. (No backend here lacks
    half support today, so one is simulated: the cpu entry limited to float32/float64.)"""
    limited = dataclasses.replace(dispatch.get("cpu"), availability=lambda: (True, "simulated"),
                                  dtypes=(torch.float32, torch.float64))
    monkeypatch.setitem(dispatch._BACKENDS, "cpu", limited)
    monkeypatch.setattr(dispatch, "_warned", set())
    tokens = torch.randn(3, 5, 16).to(dtype)
    with pytest.raises(TypeError, match=f"backend 'cpu' cannot run this input.*dtype {dtype}"):
        make_probe("cpu", "cpu")(tokens)
    probe = make_probe(None, "cpu").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            logits = probe(tokens)
    messages = [str(w.message) for w in caught if "fastfuse" in str(w.message)]
    assert len(messages) == 1 and "pure-PyTorch" in messages[0] and str(dtype) in messages[0], messages
    torch.testing.assert_close(logits, make_probe("torch", "cpu").eval()(tokens))


# --------------------------------------------------------------------------------------------
# Missing, disabled or broken compiled extension
# --------------------------------------------------------------------------------------------

_FALLBACK_SCRIPT = textwrap.dedent("""
    import copy, sys, warnings, torch
    import fastfuse
    package_dir, expected = sys.argv[1], sys.argv[2]
    assert fastfuse.__file__.startswith(package_dir), fastfuse.__file__
    report = fastfuse.backends()
    assert report["torch"]["available"], report
    for name in ("cpu", "cuda"):
        entry = report.get(name)
        if entry is not None:
            assert not entry["available"] and expected in entry["reason"], (name, entry)
    probe = fastfuse.AttentiveFusion(8, 2, 3).eval()
    x = torch.randn(4, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [probe(x) for _ in range(3)]
        layers = [torch.randn(4, 6, 8, requires_grad=True)]
        copy.deepcopy(probe).train()(layers, tokens="cls+ap").sum().backward()
    messages = [str(w.message) for w in caught if "fastfuse" in str(w.message)]
    assert len(messages) == 1 and "pure-PyTorch" in messages[0] and expected in messages[0], messages
    probe.backend = "torch"
    assert all(torch.equal(out, probe(x)) for out in outputs)
    try:
        fastfuse.AttentiveFusion(8, 2, 3, backend="cpu")(x)
    except RuntimeError as error:
        assert expected in str(error), error
    else:
        raise SystemExit("the explicit cpu backend did not raise")
    print("ok")
""")


def _copy_package(destination: Path, library_text=None, edit_schema=False) -> Path:
    """A copy of the package without its compiled library, or with a corrupt one."""
    target = destination / "fastfuse"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    if library_text is not None:
        (target / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_text(library_text)
    if edit_schema:  # the Python schema moved on, the library was not rebuilt
        library = next(PACKAGE_DIR.glob("_C*.so"))
        shutil.copy2(library, target / library.name)
        schemas = target / "backends" / "compiled_ops.py"
        text = schemas.read_text()
        assert "int num_prefix_tokens, float eps, " in text
        schemas.write_text(text.replace("int num_prefix_tokens, float eps, ",
                                        "int num_prefix_tokens, float eps, bool extra, "))
    return destination


FALLBACK_CASES = {
    # name: (how to prepare, the words the report must contain)
    "disabled": ("FASTFUSE_NO_EXTENSION=1", "FASTFUSE_NO_EXTENSION"),
    "missing": ("no _C*.so in the package", "not built"),
    "broken": ("a text file named _C*.so", "failed"),
}


@pytest.fixture(scope="module")
def fallback_runs(tmp_path_factory):
    """Start every fallback case at once (each is a fresh interpreter importing torch)."""
    processes = {}
    for name in FALLBACK_CASES:
        env = {"FASTFUSE_BACKEND": ""}
        if name == "disabled":
            root = PACKAGE_DIR.parent
            env["FASTFUSE_NO_EXTENSION"] = "1"
        else:
            root = _copy_package(tmp_path_factory.mktemp(name),
                                 library_text="not a shared library\n" if name == "broken" else None)
            env["FASTFUSE_NO_EXTENSION"] = ""
        env["PYTHONPATH"] = str(root)
        processes[name] = subprocess.Popen(
            [sys.executable, "-c", _FALLBACK_SCRIPT, str(root), FALLBACK_CASES[name][1]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
            env={**os.environ, **env})
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_extension_fallback(fallback_runs, case):
    stdout, stderr = fallback_runs[case].communicate(timeout=300)
    assert fallback_runs[case].returncode == 0 and "ok" in stdout, stderr[-3000:]


def test_stale_extension_is_reported_not_fatal(tmp_path):
    """A library built before a schema change would abort the process when loaded (the C++
    registration throws inside dlopen); the loader's schema hash refuses it with a reason."""
    if next(PACKAGE_DIR.glob("_C*.so"), None) is None:
        pytest.skip("no compiled library to make stale")
    root = _copy_package(tmp_path, edit_schema=True)
    code = ("import sys, fastfuse; entry = fastfuse.backends()['cpu']; "
            "assert not entry['available'], entry; print(entry['reason'])")
    result = run_python(code, env={"PYTHONPATH": str(root), "FASTFUSE_NO_EXTENSION": ""}, cwd=root)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-1500:]}"
    assert "built against other op schemas" in result.stdout


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------

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
