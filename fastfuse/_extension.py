"""Loads the compiled kernels: fastfuse/_C*.so, built from CMakeLists.txt by setup.py.

The library only adds ``TORCH_LIBRARY_IMPL`` kernels (CPU, and CUDA when built) to the schemas
of :mod:`fastfuse.backends.compiled_ops`, which are therefore imported first. Loading is optional:
:func:`load` never raises and says in words why the kernels are unavailable.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_BUILD_INFO = _PACKAGE_DIR / "_build_info.json"
CUDA_RESOURCE_REPORT = _PACKAGE_DIR / "_cuda_resource_usage.txt"  # written by a CUDA build
_BUILD_COMMAND = "export CUDA_HOME=/usr/local/cuda; pip install --no-build-isolation -e ."
_DISABLE_VARIABLE = "FASTFUSE_NO_EXTENSION"

_lock = threading.Lock()
_state: tuple[bool, str] | None = None


def build_info() -> dict:
    """The metadata written beside the library at build time ({} when there is none)."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def library_path() -> Path | None:
    """The compiled library in the package folder (the newest, if several were built)."""
    candidates = [path for path in _PACKAGE_DIR.glob("_C*.so") if path.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda path: path.stat().st_mtime)


def _describe_build(info: dict) -> str:
    if not info:
        return f"no build metadata ({_BUILD_INFO.name} missing)"
    return (f"built for torch {info.get('torch_version')}, CUDA {info.get('cuda_version')}, "
            f"Python {info.get('python_version')}, CPU arch {info.get('cpu_arch')}, "
            f"CPU kernel variants {', '.join(info.get('cpu_variants') or {}) or 'unknown'}")


def _load_once() -> tuple[bool, str]:
    try:
        import torch

        from .backends import compiled_ops  # schemas before the kernels
    except Exception as error:  # noqa: BLE001 - reported, never raised
        return False, f"cannot import torch / fastfuse.backends.compiled_ops: {error}"
    path = library_path()
    if path is None:
        return False, (f"the compiled kernels are not built (no _C*.so in {_PACKAGE_DIR}); build "
                       f"them from the repository root with `{_BUILD_COMMAND}`")
    # A library registered against other op schemas aborts the process when loaded (the
    # registration throws inside the dynamic loader), so a stale build is refused up front.
    expected = build_info().get("schema_sha256")
    if expected is not None:
        actual = hashlib.sha256(Path(compiled_ops.__file__).read_bytes()).hexdigest()
        if actual != expected:
            return False, (f"{path} was built against other op schemas "
                           f"(fastfuse/backends/compiled_ops.py changed since the build); "
                           f"rebuild with `{_BUILD_COMMAND}`")
    try:
        torch.ops.load_library(str(path))
    except Exception as error:  # noqa: BLE001
        detail = f"{type(error).__name__}: {error}"
        if error.__cause__ is not None:  # torch wraps the loader's own message (e.g. undefined symbol)
            detail += f" ({error.__cause__})"
        running = (f"running torch {torch.__version__}, CUDA {torch.version.cuda}, "
                   f"Python {platform.python_version()}")
        return False, (f"loading {path} failed: {detail} "
                       f"[{_describe_build(build_info())}; {running}]; rebuild with "
                       f"`{_BUILD_COMMAND}`")
    return True, f"loaded {path} ({_describe_build(build_info())})"


def load() -> tuple[bool, str]:
    """Load the compiled kernels once; returns (loaded, reason). Never raises."""
    global _state
    if _state is not None:
        # Decided once per process (a loaded library cannot be unloaded). This lock-free path
        # is also what torch.compile traces when backend selection asks again.
        return _state
    switch = os.environ.get(_DISABLE_VARIABLE, "")
    if switch == "1":
        return False, f"disabled by {_DISABLE_VARIABLE}=1"
    if switch not in ("", "0"):  # never guess what another spelling meant
        return False, (f"{_DISABLE_VARIABLE}={switch!r} is not understood: set it to 1 to disable the "
                       "compiled kernels, or to 0 (or leave it unset) to load them")
    with _lock:
        if _state is None:
            try:
                _state = _load_once()
            except Exception as error:  # noqa: BLE001
                _state = (False, f"loading the compiled kernels failed: {error}")
        return _state


def built_with_cuda() -> bool:
    """Whether the library holds CUDA kernels (from the dispatcher once loaded, else the metadata)."""
    if _state is not None and _state[0]:
        try:
            import torch

            return bool(torch._C._dispatch_has_kernel_for_dispatch_key(
                "fastfuse::fused_pool_forward", "CUDA"))
        except Exception:  # noqa: BLE001
            pass
    return bool(build_info().get("cuda_kernels", False))


def cpu_kernel_variant() -> tuple[str | None, str]:
    """(variant, reason): which instruction-set variant of the CPU kernels runs here
    (csrc/library/cpu_dispatch.cpp: the best built one this CPU supports, or FASTFUSE_CPU_ISA's),
    or (None, why not)."""
    loaded, reason = load()
    if not loaded:
        return None, reason
    import torch

    if not hasattr(torch.ops.fastfuse, "cpu_kernel_variant"):
        return None, "the loaded library predates the CPU kernel variants; rebuild it"
    try:
        return str(torch.ops.fastfuse.cpu_kernel_variant()), "chosen at run time (FASTFUSE_CPU_ISA overrides)"
    except RuntimeError as error:
        return None, str(error)
