"""Builds fastfuse's compiled kernels by running CMake; CMakeLists.txt is the build definition.

    export CUDA_HOME=/usr/local/cuda
    pip install --no-build-isolation -e .   # editable: fastfuse/_C*.so lands in the source tree
    pip install --no-build-isolation .

Switches, read from the environment and passed to CMake (documented in CMakeLists.txt):
FASTFUSE_CUDA=auto|1|0, FASTFUSE_CPU_ARCH (default native), CUDA_HOME, MAX_JOBS.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_INFO = "_build_info.json"


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("fastfuse: building the compiled kernels needs cmake >= 3.18 on PATH")
        library = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFASTFUSE_OUTPUT_DIR={library.parent}",
            f"-DFASTFUSE_LIBRARY_NAME={library.name}",
            f"-DFASTFUSE_CUDA={os.environ.get('FASTFUSE_CUDA', 'AUTO')}",
            f"-DFASTFUSE_CPU_ARCH={os.environ.get('FASTFUSE_CPU_ARCH', 'native')}",
        ])
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        self._built_dirs = getattr(self, "_built_dirs", []) + [library.parent]

    def run(self):
        super().run()
        if self.inplace:
            # Editable / --inplace: setuptools copied the library into the source tree; the
            # build metadata CMake wrote beside it goes along.
            package_dir = ROOT / "fastfuse"
            for built in getattr(self, "_built_dirs", []):
                if built != package_dir:
                    shutil.copyfile(built / BUILD_INFO, package_dir / BUILD_INFO)


setup(
    ext_modules=[Extension("fastfuse._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
