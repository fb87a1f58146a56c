"""The CUDA kernels' resource report: registers, spills and stack per kernel and arch.

A build tool: CMakeLists.txt compiles csrc/cuda/*.cu with ``-Xptxas -v`` through this script,
and everything it writes stays in the build directory or beside the built library:

    cuda_resource_report.py capture FRAGMENT_DIR nvcc ...   (the CUDA compiler launcher)
        runs the compiler, passes its output through, and keeps the ptxas lines of that
        source in FRAGMENT_DIR/<source>.ptxas (in the build directory)
    cuda_resource_report.py collect FRAGMENT_DIR REPORT SOURCE...   (after linking)
        writes REPORT (the build's _cuda_resource_usage.txt, copied beside the library as
        fastfuse/_cuda_resource_usage.txt): a summary table, then the ptxas lines verbatim

Run with no arguments (or with a report's path) to print the table of the installed library's
report. tests/test_cuda_build.py parses reports with :func:`parse` and checks them against the
cubins of the built library.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "fastfuse" / "_cuda_resource_usage.txt"


def _storage():
    """fastfuse/storage.py, loaded by path: the build runs this before fastfuse is importable."""
    spec = importlib.util.spec_from_file_location("_fastfuse_storage", ROOT / "fastfuse" / "storage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
_RAW_MARKER = "# ptxas output (-Xptxas -v), verbatim:"
_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_FUNCTION_PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (\S+)")


@dataclasses.dataclass
class KernelResources:
    name: str            # mangled
    arch: str            # sm_80, sm_90
    registers: int = -1
    stack_frame: int = -1  # bytes of local memory per thread
    spill_stores: int = -1
    spill_loads: int = -1
    static_shared: int = 0  # dynamic shared memory (the kernels' tiles) is sized at launch


def parse(text: str) -> list[KernelResources]:
    """Every entry function of ptxas -v output, with its registers, stack frame and spills.

    ptxas prints, per entry and arch: "Compiling entry function 'NAME' for 'sm_XX'", then
    "Function properties for NAME" followed by "N bytes stack frame, N bytes spill stores,
    N bytes spill loads", then "Used N registers, ... N bytes smem ...". Each value must be
    found for each entry, or this raises.
    """
    kernels: list[KernelResources] = []
    current: KernelResources | None = None
    properties_of: str | None = None
    for line in text.splitlines():
        if match := _ENTRY.search(line):
            current = KernelResources(match.group(1), match.group(2))
            kernels.append(current)
            properties_of = None
        elif match := _FUNCTION_PROPERTIES.search(line):
            properties_of = match.group(1)
        elif (match := _FRAME.search(line)) and current is not None and properties_of == current.name:
            current.stack_frame, current.spill_stores, current.spill_loads = map(int, match.groups())
        elif (match := _USED.search(line)) and current is not None:
            current.registers = int(match.group(1))
            if smem := _SMEM.search(line):
                current.static_shared = int(smem.group(1))
    for kernel in kernels:
        missing = [field for field in ("registers", "stack_frame", "spill_stores", "spill_loads")
                   if getattr(kernel, field) < 0]
        if missing:
            raise ValueError(f"ptxas report: no {', '.join(missing)} for {kernel.name} ({kernel.arch})")
    return kernels


def raw_section(report_text: str) -> str:
    """The verbatim ptxas lines of a report file."""
    _, _, raw = report_text.partition(_RAW_MARKER)
    return raw


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {name: name for name in names}
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    readable = result.stdout.splitlines()
    if result.returncode != 0 or len(readable) != len(names):
        return {name: name for name in names}
    return dict(zip(names, readable))


def short_name(readable: str) -> str:
    """'void fastfuse::cuda::fused_pool_forward_kernel<c10::Half, float>(...)' ->
    'fused_pool_forward_kernel<c10::Half, float>'."""
    head = readable.split("(", 1)[0].removeprefix("void ")
    return head.replace("fastfuse::cuda::", "").strip()


def table(kernels: list[KernelResources]) -> str:
    names = demangle(sorted({kernel.name for kernel in kernels}))
    rows = [("kernel", "arch", "registers", "stack frame", "spill stores", "spill loads")]
    for kernel in sorted(kernels, key=lambda k: (short_name(names[k.name]), k.arch)):
        rows.append((short_name(names[kernel.name]), kernel.arch, str(kernel.registers),
                     f"{kernel.stack_frame} B", f"{kernel.spill_stores} B", f"{kernel.spill_loads} B"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def _source_of(command: list[str]) -> str:
    for index, argument in enumerate(command):
        if argument == "-c" and index + 1 < len(command):
            return Path(command[index + 1]).name
    sources = [argument for argument in command if argument.endswith(".cu")]
    return Path(sources[-1]).name if sources else "unknown.cu"


def capture(fragment_dir: Path, command: list[str]) -> int:
    result = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    # ptxas -v writes its report to stderr; keep the build log quiet apart from real messages.
    kept = [line for line in result.stderr.splitlines(keepends=True)
            if not (line.startswith("ptxas info") or _FRAME.search(line))]
    sys.stderr.write("".join(kept))
    if result.returncode == 0:
        fragment_dir.mkdir(parents=True, exist_ok=True)
        # "Compile time" lines change every build; dropping them keeps the report stable.
        ptxas = [line for line in result.stderr.splitlines()
                 if (line.startswith("ptxas") or _FRAME.search(line)) and "Compile time" not in line]
        _storage().write_text(fragment_dir / f"{_source_of(command)}.ptxas", "\n".join(ptxas) + "\n")
    return result.returncode


def collect(fragment_dir: Path, report: Path, sources: list[str]) -> int:
    raw = []
    for source in sorted(Path(source).name for source in sources):
        fragment = fragment_dir / f"{source}.ptxas"
        if not fragment.is_file():
            print(f"cuda_resource_report: no ptxas output for {source} in {fragment_dir}; "
                  "was it compiled through the launcher?", file=sys.stderr)
            return 1
        raw.append(f"## {source}\n{fragment.read_text()}")
    raw_text = "".join(raw)
    kernels = parse(raw_text)
    _storage().write_text(
        report,
        "# Resource usage of the CUDA kernels (csrc/cuda), written by the build (CMakeLists.txt:\n"
        "# nvcc -Xptxas -v through tools/cuda_resource_report.py). Do not edit; rebuild.\n"
        "# Shared memory is dynamic (sized per launch from D, H and the tile), so not listed.\n\n"
        f"{table(kernels)}\n\n{_RAW_MARKER}\n{raw_text}")
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "capture":
        return capture(Path(argv[1]), argv[2:])
    if argv and argv[0] == "collect":
        return collect(Path(argv[1]), Path(argv[2]), argv[3:])
    report = Path(argv[0]) if argv else REPORT
    if not report.is_file():
        print(f"{report} does not exist: build with CUDA (see docs/cuda.md)", file=sys.stderr)
        return 1
    print(table(parse(raw_section(report.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
