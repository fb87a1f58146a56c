"""The implementations a benchmark compares: a registry of name -> (build, why-not).

Every built module takes the case's input as the runner makes it (a (B, N, D) token tensor,
or for a gathering case the list of L layer activations) and returns logits. Only fastfuse
gathers from the layers itself; every other implementation first stacks the gathered tokens
in PyTorch, as a user of it would.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..backends import backends as backend_report
from ..gather import gather_tokens
from ..module import AttentiveFusion
from ..paper import PaperAttentiveProbe
from . import peers
from .cases import Case


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[Case], torch.nn.Module]      # a CPU module for (B, N, D) tokens
    unavailable: Callable[[str], Optional[str]]   # device -> why it cannot run there, or None
    gathers: bool = False                         # takes the layer list itself
    compiles: bool = False                        # wrap in torch.compile after moving to device


_IMPLS: dict[str, Impl] = {}


def register(impl: Impl) -> None:
    _IMPLS[impl.name] = impl


def _always(device: str) -> None:
    return None


def _fastfuse_unavailable(backend: str) -> Callable[[str], Optional[str]]:
    def unavailable(device: str) -> Optional[str]:
        entry = backend_report().get(backend)
        if entry is None:
            return f"fastfuse has no {backend!r} backend in this build"
        if not entry["available"]:
            return entry["reason"]
        if device.split(":")[0] not in entry["devices"]:
            return f"serves {'/'.join(entry['devices'])} tensors, not {device}"
        if backend == "triton" and device == "cpu":
            return "Triton on CPU runs only under the interpreter (correctness, not speed)"
        return None
    return unavailable


def _paper(case: Case) -> torch.nn.Module:
    return PaperAttentiveProbe(case.dim, case.heads, case.classes)


register(Impl("paper", _paper, _always))
register(Impl("paper+torch.compile", _paper, peers.compile_unavailable_reason, compiles=True))
for _name, (_build, _source) in peers.POOLERS.items():
    _why_not = (lambda device: peers.timm_unavailable_reason()) if _name.startswith("timm") else _always
    register(Impl(_name, lambda case, build=_build: build(case.dim, case.heads, case.classes), _why_not))
    register(Impl(f"{_name}+fuse",
                  lambda case, build=_build: peers.fused(build(case.dim, case.heads, case.classes)), _why_not))
for _backend in ("torch", "cpu", "triton", "cuda"):
    register(Impl(f"fastfuse-{_backend}",
                  lambda case, backend=_backend: AttentiveFusion(case.dim, case.heads, case.classes,
                                                                 backend=backend),
                  _fastfuse_unavailable(_backend), gathers=True))


def names() -> list[str]:
    return list(_IMPLS)


def available(device: str, wanted: Optional[list[str]] = None) -> tuple[list[str], dict[str, str]]:
    """(implementations that can run on this device, {skipped name: reason}), registry order."""
    runnable, skipped = [], {}
    for name, impl in _IMPLS.items():
        if wanted is not None and name not in wanted:
            continue
        reason = impl.unavailable(device)
        if reason is None:
            runnable.append(name)
        else:
            skipped[name] = reason
    return runnable, skipped


class _StackThenProbe(torch.nn.Module):
    """The unfused way to feed layer activations: stack the gathered tokens, then probe."""

    def __init__(self, probe: torch.nn.Module, tokens_spec: str):
        super().__init__()
        self.probe, self.tokens_spec = probe, tokens_spec

    def forward(self, layers):
        return self.probe(gather_tokens(layers, self.tokens_spec, 1, layers[0].dtype))


class _FusedGather(torch.nn.Module):
    """fastfuse reads the CLS / AP tokens from the layer activations inside the op."""

    def __init__(self, probe: AttentiveFusion, tokens_spec: str):
        super().__init__()
        self.probe, self.tokens_spec = probe, tokens_spec

    def forward(self, layers):
        return self.probe(layers, tokens=self.tokens_spec)


def build(name: str, case: Case, device: str, seed: int = 0) -> torch.nn.Module:
    """The implementation for this case on this device, with reproducible parameters."""
    impl = _IMPLS[name]
    torch.manual_seed(seed)
    module = impl.build(case)
    if case.layers:
        module = (_FusedGather if impl.gathers else _StackThenProbe)(module, case.tokens_spec)
    module = module.to(device)
    return peers.compiled(module) if impl.compiles else module
