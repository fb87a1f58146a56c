"""Bad input never crashes and is refused in words: arguments of the public API, state dicts,
and the compiled kernels called directly with every malformed argument (in a subprocess, so a
segfault fails the test instead of pytest)."""
import json
import textwrap

import pytest
import torch

import fastfuse
from fastfuse.paper import PaperAttentiveProbe

from helpers import cpu_backend_available, run_python


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
    def backward(*args):
        return ops.fused_pool_backward(*args, True)  # layers_need_grad

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
        "gather no layers": lambda: ops.fused_gather_tokens([], "cls+ap", 1),
        "gather bad token spec": lambda: ops.fused_gather_tokens([x], "mean", 1),
        "gather integer layers": lambda: ops.fused_gather_tokens([torch.ones(2, 5, 6, dtype=torch.int32)], "cls", 1),
        "gather num_prefix_tokens == T": lambda: ops.fused_gather_tokens([x], "ap", 5),
        "gather layers on different D": lambda: ops.fused_gather_tokens([x, torch.randn(2, 5, 7)], "cls", 1),
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
