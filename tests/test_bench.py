"""Smoke test of the benchmark harness (fastfuse.bench) on tiny cases, in-process, in seconds.

It checks the machinery, not the speed: every record has its keys, the speedup against the paper
and the roofline are computed, a failing implementation becomes an unavailable row instead of
crashing the run, and the JSON and the scaling plots are written.
"""
import json

import pytest
import torch

from fastfuse.bench import impls
from fastfuse.bench.cases import Case, scaling_cases
from fastfuse.bench.report import case_shapes, write_json
from fastfuse.bench.roofline import measure_machine
from fastfuse.bench.runner import RECORD_KEYS, run_case

TINY = Case("tiny", batch=8, num_tokens=6, dim=32, heads=2, classes=5)
TINY_GATHER = Case("tiny-gather", batch=4, num_tokens=6, dim=32, heads=2, classes=5, layers=3,
                   layer_tokens=5, tokens_spec="cls+ap")
NAMES = ["paper", "ep", "fastfuse-torch"]


@pytest.fixture(scope="module")
def machine():
    return measure_machine("cpu", quick=True)


@pytest.mark.parametrize("case", [TINY, TINY_GATHER], ids=lambda case: case.name)
def test_records_complete(case, machine):
    records = run_case(case, NAMES, "cpu", machine, repeats=2)
    expected_rows = [(name, mode) for mode in ("train", "infer") for name in NAMES]
    assert [(r["impl"], r["mode"]) for r in records] == expected_rows
    for record in records:
        assert set(record) == set(RECORD_KEYS)
        assert record["unavailable"] is None and record["ms"] > 0
        assert record["roofline_ms"] > 0
        paper = next(r for r in records if r["impl"] == "paper" and r["mode"] == record["mode"])
        assert record["speedup_vs_paper"] == pytest.approx(paper["ms"] / record["ms"])


class _Broken(torch.nn.Module):
    def forward(self, tokens):
        raise RuntimeError("cannot compile this")


def test_failing_implementation_is_an_unavailable_row(machine, monkeypatch, capsys):
    monkeypatch.setitem(impls._IMPLS, "broken", impls.Impl("broken", lambda case: _Broken(),
                                                           lambda device: None))
    records = run_case(TINY, ["paper", "broken"], "cpu", machine, modes=("infer",), repeats=1)
    broken = next(r for r in records if r["impl"] == "broken")
    assert broken["ms"] is None and broken["speedup_vs_paper"] is None
    assert "cannot compile this" in broken["unavailable"]
    assert "cannot compile this" in capsys.readouterr().err
    assert next(r for r in records if r["impl"] == "paper")["ms"] > 0


def test_registry_says_why_not():
    runnable, skipped = impls.available("cpu")
    assert "paper" in runnable and "fastfuse-torch" in runnable
    assert "fastfuse-triton" not in runnable  # the interpreter is not benchmarked
    assert all(isinstance(reason, str) and reason for reason in skipped.values())


def test_json_and_plots(machine, tmp_path):
    sweep = [Case(f"s{n}", 4, n, 32, 2, classes=5) for n in (3, 6)]
    records = [r for case in sweep for r in run_case(case, ["paper", "fastfuse-torch"], "cpu",
                                                     machine, modes=("train",), repeats=1)]
    path = tmp_path / "bench.json"
    write_json(str(path), {"device": "cpu"}, sweep, records, wall_s=1.0,
               sweeps={"num_tokens": [case.name for case in sweep]})
    data = json.loads(path.read_text())
    assert data["records"] == records and data["cases"]["s3"]["num_tokens"] == 3
    pytest.importorskip("matplotlib")
    from fastfuse.bench.plots import plot_scaling

    paths = plot_scaling(records, case_shapes(sweep), data["sweeps"], str(tmp_path / "plots"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["scaling_N_train.png"]
    assert (tmp_path / "plots" / "scaling_N_train.png").stat().st_size > 1000


def test_scaling_grids_vary_one_axis():
    for axis, sweep in scaling_cases(quick=True).items():
        values = [getattr(case, axis) for case in sweep]
        assert values == sorted(set(values)) and len(values) >= 3
        others = {tuple(getattr(case, key) for key in ("batch", "num_tokens", "dim") if key != axis)
                  for case in sweep}
        assert len(others) == 1


def test_pooler_rows_upstream_and_fused(machine):
    """Every pooler row and its "+fuse" twin run, and the twin computes the upstream function."""
    from fastfuse.bench import peers

    names = [name for pooler in peers.POOLERS for name in (pooler, f"{pooler}+fuse")]
    runnable, skipped = impls.available("cpu", names)
    assert set(runnable) | set(skipped) == set(names)
    records = run_case(TINY, runnable, "cpu", machine, repeats=1, modes=("train",))
    assert all(record["unavailable"] is None and record["ms"] > 0 for record in records)
    tokens = torch.randn(4, TINY.num_tokens, TINY.dim, dtype=torch.float64)
    for pooler in runnable:
        if pooler.endswith("+fuse"):
            continue
        upstream = impls.build(pooler, TINY, "cpu").double().eval()
        folded = peers.fused(upstream, backend="torch")
        torch.testing.assert_close(folded(tokens), upstream(tokens), rtol=1e-9, atol=1e-12)


def test_json_load_average_is_taken_at_start_and_at_end(machine, tmp_path, monkeypatch):
    """machine.loadavg_start is read before the cases run, loadavg_end after them."""
    import argparse
    import os

    from fastfuse import bench
    from fastfuse.bench import runner

    clock = {"now": 1.0}
    monkeypatch.setattr(os, "getloadavg", lambda: (clock["now"],) * 3)

    def run_cases(cases, names, device, **kwargs):  # the load rises while the cases run
        clock["now"] = 7.0
        return [], machine

    monkeypatch.setattr(runner, "run_cases", run_cases)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    path = tmp_path / "bench.json"
    args = parser.parse_args(["--cases", "vitb-cls+ap-n24", "--impls", "paper", "--no-memory",
                              "--system-allocator", "--json", str(path)])
    assert bench.run(args) == 0
    info = json.loads(path.read_text())["machine"]
    assert info["loadavg_start"] == [1.0] * 3 and info["loadavg_end"] == [7.0] * 3


def test_floor_bytes_read_tokens_once_per_pass():
    """The roofline's bytes (docs/benchmarks.md): float32 tokens read once for inference and
    twice for training; a gathering case's training step reads its layers once (frozen training
    gathers once) and its (B, N, D) stack three times."""
    assert TINY.floor_bytes("infer") == 8 * 6 * 32 * 4
    assert TINY.floor_bytes("train") == 2 * 8 * 6 * 32 * 4
    layers = 4 * 3 * 5 * 32 * 4          # B x L x T x D float32
    stack = 4 * 6 * 32 * 4               # B x N x D float32
    assert TINY_GATHER.floor_bytes("infer") == layers
    assert TINY_GATHER.floor_bytes("train") == layers + 3 * stack
