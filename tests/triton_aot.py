"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, without a GPU, and the
register report of each build (ptxas -v): the check that no shipped config spills.

Run as a script (the interpreter must be off when triton is imported, so the tests call it in a
subprocess): ``python tests/triton_aot.py [--all] [--arch sm_90 ...]``. It prints one JSON line
per build: kernel, config index, arch, dtype, dim, addressing, 2-byte global stores, registers,
spill bytes.

What varies between builds, and so is covered: every config of each kernel's table
(kernels/triton/configs.py), the accumulation (float32 for float16 / bfloat16 / float32 tokens,
float64 for float64), the dot precision, the addressing mode (AFFINE reads rows; GATHERED adds
the averaging pass and the scratch), and D through Triton's specialisation of the ``dim``
argument (a multiple of 16 or not: D = 1000 builds differently from 384 / 768 / 1024 / 1280,
which share one build). ``--all`` covers every such combination; the default, a sample that
still reaches every config, keeps the CI test short.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
DIMS = (384, 768, 1000, 1024, 1280)
NUM_LAYERS = 3  # a tuple of layer pointers; its length only unrolls the per-layer select


def _signature(fn, constants: dict, dtype: str, dim: int) -> tuple[dict, dict]:
    token = DTYPES[dtype]
    acc = "fp64" if dtype == "float64" else "fp32"
    signature, specialised = {}, dict(constants)
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("layers", "grads"):
            signature[name] = ("*" + token,) * NUM_LAYERS
        elif name.endswith("table_ptr"):
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*" + acc
        elif name == "eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
    return signature, specialised


def _attrs(fn, signature: dict, dim: int) -> dict:
    """Triton's launch-time specialisation: pointers 16-byte aligned, ``dim`` divisible by 16
    when it is (the other integers are taken as unknown: the conservative build)."""
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        kind = signature[name]
        if isinstance(kind, tuple):
            for element in range(len(kind)):
                attrs[(index, element)] = [["tt.divisibility", 16]]
        elif kind.startswith("*"):
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "dim" and dim % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def _ptxas_report(ptx: str, arch: str) -> dict:
    # Triton targets sm_90a on Hopper (its PTX says so): assemble for the same target.
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)
    arch = target.group(1) if target else arch
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", source,
                                 "-o", os.path.join(folder, "kernel.cubin")],
                                capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr[-2000:]}")
    log = result.stderr + result.stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    return dict(registers=int(registers.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)))


def build(kernel_name: str, index: int, arch: str, dtype: str, dim: int, addressing: int) -> dict:
    from fastfuse.kernels.triton.configs import config_tables
    from fastfuse.kernels.triton.pool_backward import pool_backward_kernel
    from fastfuse.kernels.triton.pool_forward import pool_forward_kernel

    kernel = {"forward": pool_forward_kernel, "backward": pool_backward_kernel}[kernel_name]
    block_n, block_d, block_h, warps, stages, maxnreg, _ = config_tables()[kernel_name][index]
    fn = kernel.fn
    half = dtype in ("float16", "bfloat16")
    vector = 16 // {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype]
    constants = dict(BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_H=block_h, TOKEN_DTYPE=dtype,
                     ADDRESSING=addressing, ROW_ALIGN=vector if dim % vector == 0 else 1,
                     DIM_ALIGN=vector if dim % vector == 0 and dim % 16 else 1,
                     ACC=tl.float64 if dtype == "float64" else tl.float32,
                     DOT_PRECISION="tf32" if half else "ieee", stride_d=1,
                     LAYERNORM=True)  # normalize="layernorm": the heavier form
    if kernel_name == "forward":
        constants.update(SMALLEST_NORMAL=2.0 ** (-1022 if dtype == "float64" else -126))
    if kernel_name == "backward":
        constants.update(HAS_GRAD_ATTENTION=True, NEED_DX=True,
                         GRAD_ALIGN=vector if dim % vector == 0 else 1)
    signature, constants = _signature(fn, constants, dtype, dim)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants,
                                       attrs=_attrs(fn, signature, dim))
    options = dict(num_warps=warps, num_stages=stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    capability = int(arch.removeprefix("sm_"))
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    # 2-byte global stores: a float16 / bfloat16 gradient row written element by element.
    narrow_stores = len(re.findall(r"\bst\.global(?:\.[a-z]+)*\.(?:b16|u16|s16|f16|bf16)\b", ptx))
    return dict(kernel=kernel_name, config=index, arch=arch, dtype=dtype, dim=dim,
                addressing=addressing, narrow_stores=narrow_stores, **_ptxas_report(ptx, arch))


def _dtypes(classes) -> list[str]:
    names = {"half": ["bfloat16", "float16"], "float32": ["float32"], "float64": ["float64"]}
    return [name for cls in classes for name in names[cls]]


def plan(everything: bool, archs) -> list[tuple]:
    """(kernel, config, arch, dtype, dim, addressing) builds, each config with the dtypes it
    serves (configs.py): all of them (``everything``), or a sample in which every config
    appears once per arch, the dtype / D class / addressing mode rotating."""
    from fastfuse.kernels.triton.configs import config_tables

    builds = []
    shapes = list(itertools.product((768, 1000), (2, 0)))
    step = 0
    for kernel, table in config_tables().items():
        for index, row in enumerate(table):
            dtypes = _dtypes(row[6])
            if everything:
                builds += [(kernel, index, arch, dtype, dim, mode)
                           for arch, dtype, (dim, mode) in itertools.product(archs, dtypes, shapes)]
                continue
            for arch in archs:
                dim, mode = shapes[step % len(shapes)]
                builds.append((kernel, index, arch, dtypes[step % len(dtypes)], dim, mode))
                step += 1
    return builds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every config x dtype x D class x mode")
    parser.add_argument("--arch", action="append", choices=("sm_80", "sm_90"),
                        help="target(s); default both")
    args = parser.parse_args(argv)
    failures = 0
    for build_args in plan(args.all, args.arch or ("sm_80", "sm_90")):
        report = build(*build_args)
        failures += report["spill_stores"] > 0 or report["spill_loads"] > 0
        print(json.dumps(report), flush=True)
    print(f"built {len(plan(args.all, args.arch or ('sm_80', 'sm_90')))} kernels, "
          f"{failures} with spills", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
