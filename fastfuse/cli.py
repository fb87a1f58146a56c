"""``python -m fastfuse COMMAND``: one subcommand per module, imported only when run.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("fastfuse.info", "print the backends, the build and why any is unavailable"),
    "extract": ("fastfuse.extract", "extract multi-layer features of a timm ViT to a cache"),
    "sweep": ("fastfuse.sweep", "train a hyper-parameter grid of probes in lockstep"),
    "study": ("fastfuse.study", "run probing studies: backbones x datasets x probe families, local or SLURM"),
    "bench": ("fastfuse.bench", "benchmark fastfuse against the paper's probe and peers"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastfuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            if error.name != module_name:
                raise
            continue  # command not part of this build of fastfuse
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        _modules[name] = module
    args = parser.parse_args(argv)
    return int(_modules[args.command].run(args) or 0)


_modules: dict = {}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
