"""AttentiveFusion as a drop-in for the paper's probe: checkpoints, errors, backend choice."""
import os
import subprocess
import sys

import pytest
import torch

import fastfuse
from fastfuse.paper import PaperAttentiveProbe

from reference import TOLERANCE, randomize_, rel_err

PAPER_KEYS = {
    "query_token", "attn_block.norm_q.weight", "attn_block.norm_q.bias", "attn_block.norm_k.weight",
    "attn_block.norm_k.bias", "attn_block.norm_v.weight", "attn_block.norm_v.bias",
    "attn_block.cross_attn.q.weight", "attn_block.cross_attn.k.weight", "attn_block.cross_attn.v.weight",
    "attn_block.cross_attn.proj.weight", "attn_block.cross_attn.proj.bias", "bn.weight", "bn.bias",
    "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "classifier.weight", "classifier.bias",
}


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_state_dict_layout_and_round_trip(qkv_bias):
    probe = fastfuse.AttentiveFusion(48, 4, 10, qkv_bias=qkv_bias)
    expected = PAPER_KEYS | ({"attn_block.cross_attn.q_bias", "attn_block.cross_attn.v_bias"} if qkv_bias else set())
    assert set(probe.state_dict()) == expected
    shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    assert shapes["query_token"] == (1, 1, 48)
    assert shapes["attn_block.cross_attn.k.weight"] == (4 * 24, 48)  # head_dim = 2 * (48 // 4)
    assert shapes["attn_block.cross_attn.proj.weight"] == (48, 96)

    paper = randomize_(PaperAttentiveProbe(48, 4, 10, qkv_bias=qkv_bias))
    probe.load_state_dict(paper.state_dict(), strict=True)          # paper -> fastfuse
    back = PaperAttentiveProbe(48, 4, 10, qkv_bias=qkv_bias)
    back.load_state_dict(probe.state_dict(), strict=True)           # fastfuse -> paper
    for key, value in paper.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # The loaded probe computes the paper's function (float64: the fold is exact, SPEC §2).
    x = torch.randn(5, 6, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    paper, probe = paper.double().eval(), probe.double().eval()
    assert rel_err(probe(x), paper(x)) < TOLERANCE[torch.float64]


def test_head_dim_default_and_override():
    assert fastfuse.AttentiveFusion(768, 12, 100).head_dim == 128
    assert fastfuse.AttentiveFusion(768, 12, 100, head_dim=64).head_dim == 64


def test_bad_input_messages():
    probe = fastfuse.AttentiveFusion(16, 2, 3)
    cases = [
        (lambda: probe(torch.randn(4, 16)), ValueError, "shape \\(batch, tokens, dim\\)"),
        (lambda: probe(torch.randn(2, 4, 15)), ValueError, "feature size 15.*dim=16"),
        (lambda: probe(torch.ones(2, 4, 16, dtype=torch.int64)), TypeError, "floating"),
        (lambda: probe(torch.ones(2, 4, 16, dtype=torch.bool)), TypeError, "floating"),
        (lambda: probe([]), ValueError, "empty list of layers"),
        (lambda: probe([torch.randn(2, 4, 16)], tokens="mean"), ValueError, "tokens must be one of"),
        (lambda: probe(torch.randn(2, 4, 16), tokens="cls"), ValueError, "tokens must be None"),
        (lambda: probe([torch.randn(2, 4, 16)], tokens="ap", num_prefix_tokens=4), ValueError,
         "num_prefix_tokens=4 must be smaller"),
        (lambda: probe([torch.randn(2, 4, 16), torch.randn(2, 4, 8)]), ValueError, "x\\[1\\] has feature size 8"),
        (lambda: probe([torch.randn(2, 4, 16), torch.randn(3, 4, 16)]), ValueError, "x\\[1\\] has batch size 3"),
        (lambda: probe([torch.randn(2, 4, 16)], num_prefix_tokens=-1), ValueError, "num_prefix_tokens must be >= 0"),
        (lambda: probe("tokens"), TypeError, "x must be"),
        (lambda: fastfuse.AttentiveFusion(16, 2, 3, backend="gpu"), ValueError, "one of \\('auto', 'torch'"),
        (lambda: fastfuse.attentive_pool(torch.randn(2, 3, 16), torch.randn(2, 8)), ValueError,
         "score_weight must have shape \\(heads, 16\\)"),
        (lambda: fastfuse.attentive_pool(torch.randn(2, 3, 16), torch.randn(2, 16), backend="fast"), ValueError,
         "backend must be one of"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTFUSE_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTFUSE_BACKEND must be one of"):
        fastfuse.attentive_pool(torch.randn(2, 3, 8), torch.randn(1, 8))
    monkeypatch.setenv("FASTFUSE_BACKEND", "torch")
    pooled, _ = fastfuse.attentive_pool(torch.randn(2, 3, 8), torch.randn(1, 8))
    assert pooled.shape == (2, 1, 8)


def test_backends_report():
    report = fastfuse.backends()
    assert {"torch", "cpu"} <= set(report)
    for entry in report.values():
        assert isinstance(entry["available"], bool) and isinstance(entry["reason"], str) and entry["reason"]
    assert report["torch"]["available"]


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=300)


def test_no_extension_falls_back_with_one_warning():
    code = (
        "import warnings, torch, fastfuse\n"
        "warnings.simplefilter('always')\n"
        "r = fastfuse.backends()['cpu']\n"
        "assert not r['available'] and 'FASTFUSE_NO_EXTENSION' in r['reason'], r\n"
        "p = fastfuse.AttentiveFusion(8, 2, 3)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3): p(torch.randn(2, 4, 8))\n"
        "msgs = [str(x.message) for x in w if 'fastfuse' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'pure-PyTorch' in msgs[0], msgs\n"
        "try:\n"
        "    fastfuse.AttentiveFusion(8, 2, 3, backend='cpu')(torch.randn(2, 4, 8))\n"
        "except RuntimeError as e:\n"
        "    assert 'FASTFUSE_NO_EXTENSION' in str(e)\n"
        "else:\n"
        "    raise SystemExit('explicit cpu backend did not raise')\n"
        "print('ok')\n"
    )
    result = run_python(code, FASTFUSE_NO_EXTENSION="1", FASTFUSE_BACKEND="")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
