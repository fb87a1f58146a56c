"""Every file fastfuse writes goes through here: atomic replacement, strict JSON, reserved
space, and one lock per output folder.

- :func:`atomic_path` / :func:`atomic_write`: write to a temporary file in the same folder,
  fsync, then ``os.replace`` it over the target. The previous version stays loadable until the
  new one is complete; a failure removes the temporary file and re-raises.
- :func:`write_json`: strict JSON (``allow_nan=False``), so no bare NaN/Infinity tokens reach a
  file that other parsers must read; non-finite floats are the caller's to map (e.g. to None).
- :func:`reserve_space`: allocates a file's blocks before it is memory-mapped, so a full disk is
  an ``OSError`` naming the path and the bytes needed, not a SIGBUS halfway through.
- :class:`FolderLock`: an exclusive ``flock`` on ``DIR/.fastfuse.lock`` held while a run writes
  DIR; a second run is refused with a message naming the holder (pid, host, command). The lock
  dies with its process (kill -9 included), so a stale lock file never blocks a later run.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

LOCK_NAME = ".fastfuse.lock"
TEMP_PREFIX = ".fastfuse-tmp-"


class FolderLockedError(RuntimeError):
    """Another process holds the lock of an output folder."""


@contextlib.contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it replaces ``path`` atomically.

    ``suffix`` keeps an extension that writers key on (``np.save`` appends ".npy" otherwise,
    matplotlib picks the format from it).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=TEMP_PREFIX + target.name + ".", suffix=suffix,
                                    dir=target.parent)
    os.close(handle)
    temp_path = Path(temp)
    try:
        yield temp_path
        _fsync_file(temp_path)
        os.replace(temp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """``open()`` for writing whose result appears at ``path`` only once it is complete."""
    if not any(flag in mode for flag in "wx"):
        raise ValueError(f"atomic_write opens files for writing; mode must contain 'w', got {mode!r}")
    with atomic_path(path) as temp:
        with open(temp, mode, **open_kwargs) as handle:
            yield handle


def write_text(path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path, payload: Any, *, indent: int | None = 1) -> None:
    """Strict JSON, written atomically; raises ValueError on NaN/Infinity before touching ``path``."""
    text = json.dumps(payload, indent=indent, allow_nan=False)
    write_text(path, text + "\n")


def without_nonfinite(value: Any) -> Any:
    """``value`` with every NaN/infinite float (in nested dicts, lists, tuples) replaced by None,
    for :func:`write_json` where a missing number is an answer (a diverged loss, a failed case)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {key: without_nonfinite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nonfinite(item) for item in value]
    return value


def read_json(path, *, what: str = "file") -> Any:
    """Reads JSON, raising ValueError that names the file when it is empty or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text: {error}") from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None


def torch_save(obj: Any, path) -> None:
    import torch  # local: keeps this module importable without torch's import cost

    with atomic_path(path) as temp:
        torch.save(obj, temp)


def save_figure(figure, path, **savefig_kwargs) -> None:
    suffix = Path(path).suffix
    with atomic_path(path, suffix=suffix) as temp:
        figure.savefig(temp, **savefig_kwargs)


def reserve_space(path, num_bytes: int) -> None:
    """Allocates ``num_bytes`` for ``path`` on disk now, so later memory-mapped writes cannot
    hit a full disk; raises OSError naming the path and the size when the space is not there."""
    if num_bytes <= 0:
        return
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, num_bytes)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            _reserve_by_writing(path, num_bytes)
            return
        raise OSError(error.errno, f"cannot reserve {num_bytes} bytes for {path} "
                      f"({os.strerror(error.errno)}); free some space or choose another folder",
                      str(path)) from None


def _reserve_by_writing(path, num_bytes: int) -> None:
    # Filesystems without fallocate: write zeros past the current end so the blocks exist.
    block = b"\0" * (1 << 20)
    try:
        with open(path, "r+b") as handle:
            handle.seek(0, os.SEEK_END)
            remaining = num_bytes - handle.tell()
            while remaining > 0:
                remaining -= handle.write(block[:min(len(block), remaining)])
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OSError(error.errno, f"cannot reserve {num_bytes} bytes for {path} "
                      f"({os.strerror(error.errno or 0)})", str(path)) from None


def remove_temporaries(folder) -> None:
    """Removes temporary files that a killed writer left in ``folder`` (call while locked)."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(TEMP_PREFIX + "*"):
            leftover.unlink(missing_ok=True)


def check_writable(path, *, what: str = "output file") -> None:
    """Raises OSError naming ``path`` unless a file can be created beside it (run before long work
    whose result goes there). Creates the parent folder; leaves no file behind."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{what} {target} is a directory", str(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=TEMP_PREFIX + target.name + ".", dir=target.parent)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {what} {target}: {os.strerror(error.errno or 0)}",
                      str(target)) from None
    os.close(handle)
    os.unlink(temp)


def fsync_path(path) -> None:
    """Flushes a file written in place (e.g. through a memory map) to disk before its rename."""
    _fsync_file(Path(path))


def folder_entries(folder) -> list[Path]:
    """What ``folder`` holds besides fastfuse's lock file and temporary files ([] if absent)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir()
                  if entry.name != LOCK_NAME and not entry.name.startswith(TEMP_PREFIX))


class FolderLock:
    """Exclusive lock of an output folder for the life of a run (``with FolderLock(dir):``)."""

    def __init__(self, folder, *, purpose: str = "writing"):
        self.folder = Path(folder)
        self.purpose = purpose
        self._handle = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderLockedError(
                f"{self.folder} is in use by {holder}; wait for that run to finish or use "
                f"another output folder") from None
        handle.seek(0)
        handle.truncate()
        command = " ".join(sys.argv) if sys.argv else "python"
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({self.purpose}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command})\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
