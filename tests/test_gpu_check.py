"""scripts/gpu_check.sh: without a GPU it skips cleanly; the summary writer on fake results."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fastfuse.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip path of a machine without a GPU")
def test_script_skips_cleanly_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON_FOR_TESTS", __import__("sys").executable)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert gpu_check.SKIP_MESSAGE in result.stdout
    assert not (tmp_path / "out").exists()


def test_summary_of_fake_results():
    results = dict(device="Fake GPU", torch="0.0", started="2026-01-01T00:00:00+00:00", total_seconds=12.0,
                   steps=[dict(name="tests", returncode=0, seconds=10.0, tail="5 passed"),
                          dict(name="config 1", returncode=1, seconds=2.0, tail="1 failed | x")],
                   bench_rows=[dict(case="gpu-a", impl="fastfuse-triton", mode="train", ms=1.5, vs_floor=1.25)])
    text = gpu_check.summary_markdown(results)
    assert text.startswith("# GPU check: Fake GPU")
    assert "| tests | ok | 10.0 | 5 passed |" in text
    assert "| config 1 | FAILED (1) | 2.0 | 1 failed \\| x |" in text
    assert "| gpu-a | fastfuse-triton | train | 1.500 | 1.25 |" in text
    assert text.rstrip().endswith("Failed: config 1.")


def test_steps_cover_every_forced_config(tmp_path):
    from fastfuse.kernels.triton.configs import config_tables

    steps = gpu_check._steps(tmp_path, "python")
    forced = sorted(int(step["env"]["FASTFUSE_TRITON_CONFIG"]) for step in steps
                    if "FASTFUSE_TRITON_CONFIG" in step["env"])
    assert forced == list(range(max(len(table) for table in config_tables().values())))
    assert sum(step["limit_s"] for step in steps) <= 8 * 60  # the script's budget on one GPU
    assert steps[0]["env"]["FASTFUSE_REQUIRE_BACKENDS"] == "torch,cuda,triton"
