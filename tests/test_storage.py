"""fastfuse.storage: atomic replacement, strict JSON, reserved space, folder locks."""
import json
import multiprocessing
import os

import pytest

from fastfuse import storage


def test_failed_write_keeps_previous_version_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    storage.write_json(target, {"run": 1})
    with pytest.raises(RuntimeError):
        with storage.atomic_write(target) as handle:
            handle.write('{"run": 2')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_write_json_is_strict_and_leaves_target_untouched(tmp_path):
    target = tmp_path / "r.json"
    storage.write_json(target, {"loss": 1.0})
    with pytest.raises(ValueError):
        storage.write_json(target, {"loss": float("nan")})
    assert json.loads(target.read_text()) == {"loss": 1.0}


@pytest.mark.parametrize("content", ["", "{", "\xff"])
def test_read_json_names_the_file(tmp_path, content):
    target = tmp_path / "split.json"
    target.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match="split.json"):
        storage.read_json(target, what="feature metadata")


def test_reserve_space_allocates_blocks(tmp_path):
    target = tmp_path / "big.bin"
    target.touch()
    storage.reserve_space(target, 1 << 20)
    assert os.stat(target).st_blocks * 512 >= 1 << 20


def test_reserve_space_reports_path_and_size_when_disk_is_full(tmp_path):
    target = tmp_path / "huge.bin"
    target.touch()
    with pytest.raises(OSError, match=r"huge\.bin") as info:
        storage.reserve_space(target, 1 << 62)
    assert str(1 << 62) in str(info.value)


def _hold_lock(folder, ready, release):
    with storage.FolderLock(folder, purpose="test"):
        ready.set()
        release.wait(30)


def test_second_run_on_locked_folder_is_refused_with_holder(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(storage.FolderLockedError, match=f"pid {holder.pid}"):
            storage.FolderLock(tmp_path).acquire()
    finally:
        release.set()
        holder.join(30)
    with storage.FolderLock(tmp_path):  # released with its holder
        pass


def test_lock_of_killed_holder_does_not_block(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(60)
    holder.kill()
    holder.join(30)
    with storage.FolderLock(tmp_path):
        pass
