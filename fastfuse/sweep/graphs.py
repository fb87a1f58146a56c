"""CUDA graphs for the lockstep sweep's training step (GPU only; CPU runs are untouched).

A probe step launches a few dozen small kernels (the fused pooling op, the (H, D) folding, the
value / output projections, BatchNorm, the loss) whose launch overhead rivals their run time at
sweep shapes. ``GraphedForward`` records a probe chunk's forward and backward once, as two CUDA
graphs (``torch.cuda.make_graphed_callables``), and replays them for every full batch; the
optimizer and the loss run eagerly around them. It applies when:

- the tensors live on a CUDA device (never on CPU: there ``wrap`` returns the module as it is);
- the batch has the captured shape: the last, partial batch of an epoch (and evaluation, in
  eval mode) runs the module's own forward;
- the backend launches without host synchronisation or host-to-device copies (the triton and
  cuda backends; see fastfuse/backends/triton.py) -- a capture that fails (a backend that
  synchronises) is reported once as a warning and the step stays eager.

Capturing runs a few warm-up forwards on the first batch; the BatchNorm running statistics they
would update are restored afterwards, so a graphed run trains exactly like an eager one.
FASTFUSE_CUDA_GRAPHS=0 turns it off.
"""
from __future__ import annotations

import os
import warnings

import torch


def enabled(device) -> bool:
    """CUDA graphs for the sweep step: on a CUDA device, unless FASTFUSE_CUDA_GRAPHS=0."""
    return torch.device(device).type == "cuda" and os.environ.get("FASTFUSE_CUDA_GRAPHS", "1") != "0"


class GraphedForward:
    """Calls ``module(inputs)``: through a captured CUDA graph for inputs of the captured shape in
    training mode, else through the module's own forward. Captured on the first eligible call."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.eager_forward = module.forward  # kept: make_graphed_callables replaces module.forward
        self.graphed = None
        self.shape = None
        self.failed = False

    def _capture(self, inputs: torch.Tensor) -> None:
        buffers = {name: value.clone() for name, value in self.module.named_buffers()}
        try:
            self.graphed = torch.cuda.make_graphed_callables(self.module, (inputs.detach(),))
            self.shape = tuple(inputs.shape)
        except Exception as error:  # noqa: BLE001 - any capture failure means: stay eager
            self.failed = True
            self.module.forward = self.eager_forward
            warnings.warn(f"CUDA graph capture of the sweep step failed, running eagerly: {error}",
                          RuntimeWarning, stacklevel=3)
        finally:
            with torch.no_grad():  # the warm-up forwards moved the BatchNorm running statistics
                for name, value in self.module.named_buffers():
                    value.copy_(buffers[name])

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.module.training or self.failed or not inputs.is_cuda:
            return self.eager_forward(inputs)
        if self.graphed is None:
            self._capture(inputs)
            if self.failed:
                return self.eager_forward(inputs)
        if tuple(inputs.shape) != self.shape:
            return self.eager_forward(inputs)
        return self.graphed(inputs)


def wrap(module: torch.nn.Module, device):
    """``GraphedForward(module)`` when CUDA graphs apply to ``device``, else ``module`` itself."""
    return GraphedForward(module) if enabled(device) else module
