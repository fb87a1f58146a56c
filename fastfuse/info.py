"""``python -m fastfuse info``: what was built and which backends can run here."""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    import torch

    from . import __version__, _extension
    from .backends import backends

    variant, variant_reason = _extension.cpu_kernel_variant()
    report = {"fastfuse": __version__, "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
              "build": _extension.build_info(), "backends": backends(),
              "cpu_kernel_variant": variant, "cpu_kernel_variant_reason": variant_reason}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"fastfuse {report['fastfuse']}  torch {report['torch']}  CUDA build {report['torch_cuda']}"
          f"  GPU visible: {report['cuda_available']}")
    print(f"build: {report['build'] or 'no compiled extension found'}")
    built = ", ".join(report["build"].get("cpu_variants") or {}) or "unknown"
    print(f"CPU kernels: variant {variant or 'none'} runs here (built: {built}; {variant_reason})")
    for name, entry in report["backends"].items():
        mark = "yes" if entry["available"] else "no "
        print(f"  {name:<7} {mark}  {entry['reason']}")
    return 0
