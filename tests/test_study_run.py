"""Running studies: units skipped when complete, failures recorded, kill -9 then rerun gives the
results of an uninterrupted run, locks, the report, and the launchers (local workers, submitit's
local executor, the sbatch script of a dry run)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastfuse.cli import main
from fastfuse.features import save_features
from fastfuse.storage import FolderLock, FolderLockedError
from fastfuse.study import SlurmOptions, launch_local, open_study, prepare_study, run_task, submit
from fastfuse.study.units import cell_dir, read_record

ROOT = Path(__file__).resolve().parents[1]


def write_cache(directory, seed, num_tokens=6, dim=16, classes=3):
    """A small feature cache with class structure (cls+ap of 3 layers)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, num_tokens, dim, generator=generator)
    for split, size in (("train", 48), ("val", 24), ("test", 24)):
        labels = torch.arange(size) % classes
        features = centres[labels] + 0.8 * torch.randn(size, num_tokens, dim, generator=generator)
        save_features(directory, split, features, labels, meta={"model": "cached", "tokens": "cls+ap"})


def study_text(datasets: str, epochs: int = 2) -> str:
    return f"""
[study]
name = "t"
[[backbones]]
name = "vit_tiny_patch16_224"
label = "tiny"
img_size = 32
{datasets}
[features]
batch_size = 128
[probes]
num_heads = 2
epochs = {epochs}
batch_size = 16
[grid]
lr = [1e-3, 1e-2]
wd = [1e-4]
seeds = [0, 1]
"""


CACHED = """
[[datasets]]
name = "cached-a"
features = "cache_a"
backbone = "tiny"
[[datasets]]
name = "cached-b"
features = "cache_b"
backbone = "tiny"
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def cached_study(tmp_path):
    write_cache(tmp_path / "cache_a", 0)
    write_cache(tmp_path / "cache_b", 1)
    path = tmp_path / "study.toml"
    path.write_text(study_text(CACHED, epochs=3))
    return path


def sweep_outcome(study_dir, cell):
    """What must not depend on interruptions: every probe's per-epoch metrics, the best choices."""
    results = json.loads((cell_dir(study_dir, cell) / "sweeps/attentive-fusion/results.json").read_text())
    def rows(entries):
        return [{key: value for key, value in row.items() if "seconds" not in key} for row in entries]
    return {"probes": rows(results["probes"]), "best": results["best"],
            "baselines": {name: rows(entry["probes"]) for name, entry in results["baselines"].items()}}


def test_run_skip_fail_retry_force_and_report(tmp_path, capsys):
    study = tmp_path / "study.toml"
    write_cache(tmp_path / "cache_a", 0)
    study.write_text(study_text("""
[[datasets]]
name = "gratings"
builtin = "synthetic-gratings"
[[datasets]]
name = "cached-a"
features = "cache_a"
backbone = "tiny"
[[datasets]]
name = "broken"
path = "no_such_folder"
"""))
    out = tmp_path / "run"
    assert main(["study", "run", str(study), "--out", str(out), "--no-progress"]) == 1  # one cell fails
    main(["study", "status", str(out)])
    status = capsys.readouterr().out
    assert "tiny__gratings" in status and "tiny__broken" in status
    assert "1 failed" in status and "2 done" in status and "FileNotFoundError" in status
    failure = json.loads((cell_dir(out, "tiny__broken") / "failed.json").read_text())
    assert "Traceback" in failure["traceback"] and failure["unit"] == "features"

    table = (out / "report/table.md").read_text()
    assert "tiny: AttentiveFusion, all layers" in table and "Not complete yet: tiny__broken" in table
    rows = (out / "report/table.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3  # two finished cells x three families
    assert (out / "report/gain.png").stat().st_size > 0
    assert (out / "report/heatmaps/tiny__gratings__attentive-fusion.png").stat().st_size > 0
    features = torch.from_numpy(__import__("numpy").load(cell_dir(out, "tiny__gratings") / "features/train_features.npy"))
    assert features.shape[1:] == (26, 192)  # cls+ap of 12 norm2 + final norm, ViT-tiny width

    records = {unit: read_record(out, "tiny__gratings", unit) for unit in ("features", "sweeps/attentive-fusion")}
    failed_before = failure["time"], (cell_dir(out, "tiny__broken") / "failed.json").stat().st_mtime_ns
    assert main(["study", "run", str(out), "--no-progress"]) == 1                        # continue: nothing redone
    assert {unit: read_record(out, "tiny__gratings", unit) for unit in records} == records
    assert (cell_dir(out, "tiny__broken") / "failed.json").stat().st_mtime_ns == failed_before[1]
    assert "--retry-failed" in capsys.readouterr().err
    assert main(["study", "run", str(out), "--retry-failed", "--no-progress"]) == 1    # retried, fails again
    assert (cell_dir(out, "tiny__broken") / "failed.json").stat().st_mtime_ns != failed_before[1]

    study.write_text(study.read_text().replace("epochs = 2", "epochs = 1"))             # a changed configuration
    assert main(["study", "run", str(study), "--out", str(out), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert read_record(out, "tiny__gratings", "sweeps/attentive-fusion") == records["sweeps/attentive-fusion"]
    assert main(["study", "run", str(study), "--out", str(out), "--force", "--no-progress"]) == 1
    assert read_record(out, "tiny__gratings", "features") == records["features"]      # features unchanged: kept
    assert read_record(out, "tiny__gratings", "sweeps/attentive-fusion")["config_hash"] != \
        records["sweeps/attentive-fusion"]["config_hash"]


def test_kill_9_then_rerun_equals_uninterrupted(cached_study, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    spec, _ = prepare_study(cached_study, whole)
    launch_local(whole, [cell.id for cell in spec.cells()], progress=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "fastfuse", "study", "run", str(cached_study), "--out",
                                str(killed), "--no-progress"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    first_sweep = cell_dir(killed, "tiny__cached-a") / "sweeps/attentive-fusion.unit.json"
    while not first_sweep.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)   # mid-study: the second cell is pending or half done
    process.wait()
    assert read_record(killed, "tiny__cached-b", "sweeps/attentive-fusion") is None
    assert main(["study", "run", str(killed), "--no-progress"]) == 0
    for cell in ("tiny__cached-a", "tiny__cached-b"):
        assert sweep_outcome(killed, cell) == sweep_outcome(whole, cell)


def test_locks_refuse_concurrent_runs(cached_study, tmp_path):
    out = tmp_path / "run"
    spec, _ = prepare_study(cached_study, out)
    with FolderLock(cell_dir(out, "tiny__cached-a")):
        states = run_task(str(out), ["tiny__cached-a", "tiny__cached-b"], progress=False)
    assert states == {"tiny__cached-a": "busy", "tiny__cached-b": "done"}
    assert read_record(out, "tiny__cached-a", "features") is None
    with FolderLock(out):
        with pytest.raises(FolderLockedError, match="in use by pid"):
            prepare_study(cached_study, out)


def test_local_workers_per_device(cached_study, tmp_path):
    out = tmp_path / "run"
    spec, _ = prepare_study(cached_study, out)
    states = launch_local(out, [cell.id for cell in spec.cells()], devices="cpu,cpu", progress=False)
    assert states == {"tiny__cached-a": "done", "tiny__cached-b": "done"}


def test_submitit_job_array_runs_the_cells(cached_study, tmp_path):
    out = tmp_path / "run"
    spec, _ = prepare_study(cached_study, out)
    cells = [cell.id for cell in spec.cells()]
    jobs = submit(out, cells, SlurmOptions(time_min=10, cpus_per_task=1), cells_per_task=1, cluster="local")
    assert len(jobs) == 2
    assert [job.result() for job in jobs] == [{cells[0]: "done"}, {cells[1]: "done"}]
    assert all(read_record(out, cell, "sweeps/attentive-fusion") for cell in cells)


def test_slurm_dry_run_prints_the_array_and_resources(cached_study, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["study", "run", str(cached_study), "--out", str(out), "--launcher", "slurm", "--slurm-dry-run",
                 "--slurm-partition", "gpu-long", "--slurm-gpus-per-task", "2", "--slurm-cpus-per-task", "8",
                 "--slurm-mem", "32", "--slurm-time", "90"])
    script = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu-long", "#SBATCH --gpus-per-task=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --time=90", "submitit.core._submit"):
        assert line in script
    assert not list((out / "cells").glob("*/*.unit.json")) if (out / "cells").exists() else True
