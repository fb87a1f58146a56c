"""Builds fastfuse's compiled kernels by running CMake; CMakeLists.txt is the build definition.

    export CUDA_HOME=/usr/local/cuda
    pip install --no-build-isolation -e .   # editable: fastfuse/_C*.so lands in the source tree
    pip install --no-build-isolation .

cmake and ninja are build requirements (pyproject.toml; requirements-dev.txt for builds without
isolation): the ones installed beside this Python come first, then PATH. Switches, read from the
environment and passed to CMake (documented in CMakeLists.txt): FASTFUSE_CUDA=auto|1|0,
FASTFUSE_CPU_ARCH (default auto: one CPU kernel variant per x86-64 level), CUDA_HOME, MAX_JOBS.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Written by CMake beside the library; an in-place build copies them into the package too.
BUILD_OUTPUTS = ("_build_info.json", "_cuda_resource_usage.txt")


def _tool(name: str) -> str | None:
    """A build tool from this Python's environment (the PyPI cmake / ninja), else from PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None or ninja is None:
            raise RuntimeError("fastfuse: building the compiled kernels needs cmake >= 3.18 and ninja "
                               "(`pip install cmake ninja`)")
        library = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake-ninja"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFASTFUSE_OUTPUT_DIR={library.parent}",
            f"-DFASTFUSE_LIBRARY_NAME={library.name}",
            f"-DFASTFUSE_CUDA={os.environ.get('FASTFUSE_CUDA', 'AUTO')}",
            f"-DFASTFUSE_CPU_ARCH={os.environ.get('FASTFUSE_CPU_ARCH', 'AUTO')}",
        ])
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        self._built_dirs = getattr(self, "_built_dirs", []) + [library.parent]

    def run(self):
        super().run()
        if self.inplace:
            # Editable / --inplace: setuptools copied the library into the source tree; the
            # files CMake wrote beside it go along (and stale ones from an earlier build go).
            package_dir = ROOT / "fastfuse"
            for built in getattr(self, "_built_dirs", []):
                if built == package_dir:
                    continue
                for name in BUILD_OUTPUTS:
                    if (built / name).is_file():
                        shutil.copyfile(built / name, package_dir / name)
                    elif (package_dir / name).is_file():
                        (package_dir / name).unlink()


setup(
    ext_modules=[Extension("fastfuse._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
