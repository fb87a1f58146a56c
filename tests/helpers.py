"""Small helpers the test files share (not the oracle: that is tests/reference.py)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import fastfuse

from reference import randomize_

PACKAGE_DIR = Path(fastfuse.__file__).resolve().parent
dispatch = sys.modules["fastfuse.backends"]  # the package: fastfuse.backends is the report function


def make_probe(backend, device, *, dim=16, heads=2, classes=3, seed=0, **kwargs):
    probe = fastfuse.AttentiveFusion(dim, heads, classes, backend=backend, **kwargs)
    return randomize_(probe, seed=seed).to(device)


def grads_of(output, inputs, probe):
    """Gradients of a fixed random projection of ``output`` w.r.t. inputs and parameters."""
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(9)).to(output)
    return torch.autograd.grad((output * weights).sum(), list(inputs) + list(probe.parameters()))


def run_python(code, *args, env=None, cwd=None, timeout=240):
    """A fresh interpreter, so that an abort or a segfault fails the test instead of pytest."""
    full_env = {**os.environ, "FASTFUSE_BACKEND": "", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def cpu_backend_available():
    entry = fastfuse.backends()["cpu"]
    return entry["available"], entry["reason"]
