"""Issue 12: nothing lost, nothing silently wrong. Each test reproduces one failure of the files
around the kernels (kill -9, full disk, two runs on one folder, corrupt inputs, non-finite data)
and checks what fastfuse guarantees now (docs/reliability.md lists them)."""
import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastfuse import storage
from fastfuse.features import load_features, load_metadata, save_features
from fastfuse.sweep import load_best_probe, run_sweep
from fastfuse.sweep import results as results_io
from fastfuse.sweep.data import from_tensors

ROOT = Path(__file__).resolve().parents[1]
DIM, TOKENS, CLASSES = 8, 4, 3
RUN = dict(num_heads=2, epochs=2, batch_size=16, progress=False, backend="torch")
GRID = {"lr": [1e-2], "wd": [1e-4, 1e-2], "seed": [0]}


def synthetic(directory, *, sizes=(("train", 48), ("val", 24), ("test", 24)), dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, TOKENS, DIM, generator=generator)
    for split, size in sizes:
        labels = torch.arange(size) % CLASSES
        features = centres[labels] + 0.5 * torch.randn(size, TOKENS, DIM, generator=generator)
        save_features(directory, split, features.to(dtype), labels, meta={"model": "synthetic", "tokens": "cls+ap"})
    return directory


def strict_json(path):
    """Parses as a strict parser does: NaN/Infinity tokens are errors."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def temporaries(folder):
    return sorted(path.name for path in Path(folder).rglob(storage.TEMP_PREFIX + "*"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def finished_sweep(features_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return run_sweep(features_dir, GRID, out=out, plots=False, **RUN), out


# --- 1. results.json written in place ------------------------------------------------------

def _failing_writes(monkeypatch, fragment):
    """open() for writing a file whose name holds ``fragment`` writes half, then hits ENOSPC."""
    real_open = io.open

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def patched(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if fragment in os.fspath(file) and ("w" in mode or "a" in mode):
            return HalfWriter(handle)
        return handle

    monkeypatch.setattr(builtins, "open", patched)
    monkeypatch.setattr(io, "open", patched)


def test_results_json_survives_a_failed_rewrite(finished_sweep, monkeypatch):
    results, out = finished_sweep
    before = (out / "results.json").read_bytes()
    _failing_writes(monkeypatch, "results.json")
    with pytest.raises(OSError):
        results_io.write(results, out, checkpoint=None, plots=False)
    monkeypatch.undo()
    assert (out / "results.json").read_bytes() == before       # the previous version, whole
    assert load_best_probe(out) is not None
    assert temporaries(out) == []


# --- 2. save_features over an existing split ------------------------------------------------

def test_failed_overwrite_keeps_the_previous_split(tmp_path):
    synthetic(tmp_path, sizes=(("train", 12),))
    before_features, before_labels = (tensor.clone() for tensor in load_features(tmp_path, "train"))
    with pytest.raises(TypeError, match="JSON serialisable"):
        save_features(tmp_path, "train", torch.zeros(5, 2, 3), torch.zeros(5, dtype=torch.long),
                      meta={"bad": object()})
    features, labels = load_features(tmp_path, "train")
    assert torch.equal(features, before_features) and torch.equal(labels, before_labels)
    assert temporaries(tmp_path) == []


# --- 3. full disk -----------------------------------------------------------------------------

def _full_disk(monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_space)


def test_full_disk_is_an_oserror_before_any_write(tmp_path, monkeypatch):
    synthetic(tmp_path, sizes=(("train", 12),))
    before = load_features(tmp_path, "train")[0].clone()
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match=r"cannot reserve \d+ bytes for .*train_features\.npy") as error:
        save_features(tmp_path, "train", torch.ones(40, 6, 16), torch.zeros(40, dtype=torch.long))
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert temporaries(tmp_path) == []                          # no disk-sized leftovers
    assert torch.equal(load_features(tmp_path, "train")[0], before)


# --- 4. two runs on one output folder ---------------------------------------------------------

def test_second_extract_on_a_locked_folder_is_refused(tmp_path, capsys):
    from fastfuse.cli import main

    out = tmp_path / "cache"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from fastfuse.storage import FolderLock
            with FolderLock({str(out)!r}, purpose="fastfuse extract"):
                print("locked", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["extract", "--model", "vit_tiny_patch16_224", "--data", "digits", "--out", str(out)])
        assert code == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err   # names the holder
    finally:
        holder.kill()
        holder.wait()
    assert storage.folder_entries(out) == []                    # the refused run wrote nothing


# --- 5. resume with a random backbone ---------------------------------------------------------

def test_extract_resume_rebuilds_the_same_random_backbone(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    from fastfuse.cli import main

    out = tmp_path / "digits"
    argv = ["extract", "--model", "vit_tiny_patch16_224", "--img-size", "16", "--data", "digits",
            "--layers", "-1", "--tokens", "cls", "--batch-size", "512", "--out", str(out)]
    assert main(argv + ["--seed", "7"]) == 0
    first = load_features(out, "val")[0].clone()
    assert load_metadata(out, "val")["init_seed"] == 7
    for name in ("val.json", "test.json"):                       # as if killed after train
        (out / name).unlink()
    torch.manual_seed(12345)                                      # another process, another RNG
    assert main(argv + ["--seed", "7", "--resume"]) == 0
    assert torch.equal(load_features(out, "val")[0], first)
    (out / "test.json").unlink()
    capsys.readouterr()
    assert main(argv + ["--seed", "8", "--resume"]) == 2          # another backbone: refused
    assert "init_seed" in capsys.readouterr().err


# --- 6. non-finite data, diverged probes, strict JSON -----------------------------------------

def test_nan_sample_is_named_or_dropped(tmp_path):
    synthetic(tmp_path)
    features, labels = (tensor.clone() for tensor in load_features(tmp_path, "train"))
    features[5, 1, 2] = float("nan")
    features[9, 0, 0] = float("inf")
    save_features(tmp_path, "train", features, labels, meta={"model": "synthetic", "tokens": "cls+ap"})
    with pytest.raises(ValueError, match=r"split 'train'.*sample indices 5, 9"):
        load_features(tmp_path, "train")
    with pytest.raises(ValueError, match="split 'train'"):
        run_sweep(tmp_path, GRID, **RUN)
    kept, kept_labels = load_features(tmp_path, "train", nonfinite="drop")
    assert len(kept) == len(features) - 2 and bool(torch.isfinite(kept).all())
    assert torch.equal(kept_labels, labels[[i for i in range(len(labels)) if i not in (5, 9)]])
    results = run_sweep(tmp_path, GRID, nonfinite="drop", **RUN)
    assert results["best"]["test_acc"] > 0.5


def test_diverging_probe_is_marked_and_never_best(features_dir, tmp_path):
    grid = {"lr": [1e-2, 1e6], "wd": [1e-2], "seed": [0]}
    results = run_sweep(features_dir, grid, out=tmp_path, plots=False, **RUN)
    alone = run_sweep(features_dir, {"lr": [1e-2], "wd": [1e-2], "seed": [0]}, **RUN)
    by_lr = {row["lr"]: row for row in results["probes"]}
    assert by_lr[1e6]["diverged"] and by_lr[1e6]["diverged_epoch"] >= 1
    assert not by_lr[1e-2]["diverged"]
    assert results["best"]["lr"] == 1e-2 and results["best"]["probe_index"] == by_lr[1e-2]["index"]
    # The others go on as if the diverging probe were not there.
    other = alone["probes"][0]
    assert by_lr[1e-2]["val_acc"] == other["val_acc"] and by_lr[1e-2]["test_acc"] == other["test_acc"]
    on_disk = strict_json(tmp_path / "results.json")            # no NaN tokens
    row = next(row for row in on_disk["probes"] if row["lr"] == 1e6)
    assert row["diverged"] is True and None in row["train_loss"]
    assert "True" in (tmp_path / "results.csv").read_text()


def test_all_diverged_reports_no_best(features_dir, tmp_path):
    from fastfuse.cli import main

    code = main(["sweep", "--features", str(features_dir), "--lr", "1e6", "--wd", "1e-2", "--num-heads", "2",
                 "--epochs", "2", "--batch-size", "16", "--out", str(tmp_path), "--no-progress",
                 "--backend", "torch", "--no-baselines"])
    assert code == 1
    assert strict_json(tmp_path / "results.json")["best"] is None
    assert not (tmp_path / "best_probe.pt").exists()
    with pytest.raises(ValueError, match="diverged"):
        load_best_probe(tmp_path)


# --- 8. sweep outputs: refusal, overwrite, resume after kill -9 --------------------------------

def test_second_sweep_into_a_used_folder(features_dir, finished_sweep, tmp_path):
    from fastfuse.sweep.runner import SweepOutputError

    out = tmp_path / "sweep"
    run_sweep(features_dir, GRID, out=out, plots=True, **RUN)
    assert (out / "attention.png").exists()
    other = {"lr": [3e-2], "wd": [1e-3], "seed": [1]}
    with pytest.raises(SweepOutputError, match="not empty"):
        run_sweep(features_dir, other, out=out, **RUN)
    with pytest.raises(SweepOutputError, match="another sweep"):
        run_sweep(features_dir, other, out=out, resume=True, **RUN)
    results = run_sweep(features_dir, other, out=out, overwrite=True, plots=False, **RUN)
    assert not (out / "attention.png").exists()                 # the first sweep's plot is gone
    assert strict_json(out / "results.json")["grid"]["lr"] == [3e-2] == [results["best"]["lr"]]


KILL_AFTER_FIRST_EPOCH = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from fastfuse import storage
from fastfuse.sweep import run_sweep, train

real_save = storage.torch_save
def save_then_die(state, path):
    real_save(state, path)
    if "checkpoints" in str(path) and state["epoch"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)                 # kill -9 right after epoch 1
train.storage = type("S", (), {"torch_save": staticmethod(save_then_die)})
run_sweep(sys.argv[1], {"lr": [1e-2, 3e-2], "wd": [1e-4], "seed": [0, 1]}, out=sys.argv[2],
          num_heads=2, epochs=3, batch_size=16, progress=False, backend="torch", plots=False)
"""


def test_sweep_resume_after_kill_equals_uninterrupted(features_dir, tmp_path):
    grid = {"lr": [1e-2, 3e-2], "wd": [1e-4], "seed": [0, 1]}
    settings = dict(RUN, epochs=3)
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, str(features_dir), str(out)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "results.json").exists() and list((out / "checkpoints").glob("*.pt"))
    resumed = run_sweep(features_dir, grid, out=out, resume=True, plots=False, **settings)
    uninterrupted = run_sweep(features_dir, grid, plots=False, **settings)
    for name in ("probes",):
        for row, other in zip(resumed[name], uninterrupted[name]):
            for key in ("val_acc", "test_acc_per_epoch", "train_loss", "best_epoch", "test_acc"):
                assert row[key] == other[key], key
    for name in resumed["baselines"]:
        assert ([row["val_acc"] for row in resumed["baselines"][name]["probes"]]
                == [row["val_acc"] for row in uninterrupted["baselines"][name]["probes"]])
    assert resumed["best"]["probe_index"] == uninterrupted["best"]["probe_index"]
    assert not (out / "checkpoints").exists()                   # removed once the results are written
    checkpoint = torch.load(out / "best_probe.pt", weights_only=True)
    assert all(bool(torch.isfinite(value.float()).all()) for value in checkpoint.values())
    again = run_sweep(features_dir, grid, out=out, resume=True, **settings)   # finished: reused
    assert again["probes"] == strict_json(out / "results.json")["probes"]


# --- 9. input files checked against their JSON --------------------------------------------------

def _cache(tmp_path, **meta):
    directory = tmp_path / "cache"
    save_features(directory, "train", torch.randn(6, 2, 3), torch.tensor([0, 1, 2, 0, 1, 2]),
                  meta={"tokens": "cls+ap", **meta})
    return directory


def test_files_contradicting_their_json_are_refused(tmp_path):
    directory = _cache(tmp_path)
    np.save(directory / "train_features.npy", np.zeros((6, 2, 3), dtype=np.float64))
    with pytest.raises(ValueError, match=r"train_features\.npy holds float64 .* says float32"):
        load_features(directory, "train")
    directory = _cache(tmp_path)
    np.save(directory / "train_features.npy", np.zeros((6, 2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"train_features\.npy holds float32 \(6, 2, 4\)"):
        load_features(directory, "train")


def test_float_labels_unknown_format_and_label_range(tmp_path):
    directory = _cache(tmp_path)
    np.save(directory / "train_labels.npy", np.array([0, 1, 2, 0, 1, 2.5]))
    with pytest.raises(ValueError, match=r"train_labels\.npy holds float64 values; labels must be integers"):
        load_features(directory, "train")
    directory = _cache(tmp_path)
    meta = json.loads((directory / "train.json").read_text())
    (directory / "train.json").write_text(json.dumps(dict(meta, format="fastfuse-features-v9")))
    with pytest.raises(ValueError, match=r"train\.json: unknown format 'fastfuse-features-v9'"):
        load_features(directory, "train")
    directory = _cache(tmp_path, classes=["a", "b"])             # label 2 with 2 classes
    with pytest.raises(ValueError, match=r"holds label 2 but .*records 2 classes"):
        load_features(directory, "train")


def test_one_class_and_huge_labels_are_refused():
    tokens = torch.randn(8, 2, 4)
    one_class = (tokens, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 classes"):
        from_tensors(one_class, one_class, one_class)
    huge = (tokens, torch.tensor([0, 1, 0, 1, 0, 1, 0, 10 ** 9]))
    with pytest.raises(ValueError, match="labels go up to 1000000000"):
        from_tensors(huge, huge, huge)
    with pytest.raises(TypeError, match="labels must be integers"):
        from_tensors((tokens, torch.zeros(8)), one_class, one_class)


# --- 12. corrupt files and numbers out of range -------------------------------------------------

@pytest.mark.parametrize("text,message", [("", "is empty"), ("{\"format\": ", "is not valid JSON"),
                                          ("[1, 2]", "must hold a JSON object"),
                                          ("{\"format\": \"fastfuse-features-v1\", \"shape\": [6, 2]}",
                                           "'shape' must be three positive integers")])
def test_corrupt_split_json(tmp_path, text, message):
    directory = _cache(tmp_path)
    (directory / "train.json").write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_features(directory, "train")
    assert "train.json" in str(error.value)


def test_truncated_npy(tmp_path):
    directory = _cache(tmp_path)
    path = directory / "train_features.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train_features\.npy is not a readable \.npy array"):
        load_features(directory, "train")


def test_cli_numbers_checked_at_parse_time(features_dir, tmp_path, capsys):
    from fastfuse.cli import main

    for argv, option in ((["sweep", "--features", str(features_dir), "--seeds", str(2 ** 64)], "--seeds"),
                         (["sweep", "--features", str(features_dir), "--epochs", "0"], "--epochs"),
                         (["bench", "--repeats", "-1"], "--repeats"),
                         (["extract", "--model", "m", "--data", "digits", "--out", str(tmp_path),
                           "--batch-size", "0"], "--batch-size")):
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2
        assert f"argument {option}" in capsys.readouterr().err


def test_bench_json_path_checked_before_the_run(tmp_path, monkeypatch, capsys):
    from fastfuse.bench import runner
    from fastfuse.cli import main

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark ran although its --json file cannot be written")
    monkeypatch.setattr(runner, "run_cases", no_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["bench", "--quick", "--json", str(blocker / "out.json")]) == 2
    assert "out.json" in capsys.readouterr().err


def test_no_extension_accepts_only_documented_values():
    code = ("import fastfuse; entry = fastfuse.backends()['cpu']; "
            "print(entry['available'], entry['reason'])")
    for value, loads in (("yes", False), ("1", False)):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "FASTFUSE_NO_EXTENSION": value,
                                     "FASTFUSE_BACKEND": ""})
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("False") and "FASTFUSE_NO_EXTENSION" in result.stdout
        if value == "yes":
            assert "'yes' is not understood" in result.stdout
