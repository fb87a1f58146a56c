"""The CPU forward's vectorised exp (csrc/cpu/vector_exp.h) against the C library's expf: a
small C++ program (tests/native/vector_exp_check.cpp), compiled for every x86-64 level this CPU
runs, sweeps every 13th float of [-110, 89] through the vector and the scalar path."""
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from test_cpu_variants import LEVELS, _cpu_runs

ROOT = Path(__file__).resolve().parents[1]
COMPILER = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = [
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 levels only"),
    pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++ / c++ / $CXX)"),
]


@pytest.mark.parametrize("variant", list(LEVELS))
def test_vector_exp_matches_expf_within_one_ulp(variant, tmp_path):
    if not _cpu_runs(variant):
        pytest.skip(f"this CPU cannot run {variant}")
    program = tmp_path / "vector_exp_check"  # built as CMakeLists.txt builds the kernels (gnu++20)
    torch_include = Path(torch.__file__).resolve().parent / "include"
    build = subprocess.run(
        [COMPILER, "-O3", f"-march={LEVELS[variant]}", "-std=gnu++20", f"-DFASTFUSE_CPU_VARIANT={variant}",
         f"-I{ROOT / 'csrc'}", f"-I{torch_include}", str(ROOT / "tests" / "native" / "vector_exp_check.cpp"),
         "-o", str(program)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(program), "13"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["checked"] > 3 * 10**8 // 2, report
    assert report["special_wrong"] == 0, report  # -inf, inf, NaN, underflow, overflow, -0
    assert report["worst_ulps"] <= 1, report
    assert report["differ"] < 1e-4 * report["checked"], report  # ~1 in 13,000 (the header's claim)
    assert report["scalar_vs_vector"] == 0, report  # tails and lanes give the same bits
