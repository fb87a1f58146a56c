"""Probe families a study can ask for, checked against what :mod:`fastfuse.sweep` trains.

A fused family is one lockstep sweep per cell (``fastfuse.sweep.run_sweep``). The linear
families are the sweep's baselines: they are trained inside the first fused family's sweep of a
cell, on the same batches with the same grid, so they never need a sweep of their own.
"""
from __future__ import annotations

import inspect

ATTENTIVE_FUSION = "attentive-fusion"
LINEAR_FAMILIES = {
    # study family -> the sweep's baseline name (fastfuse.sweep.train.BASELINES)
    "linear-last-cls": "last_cls",
    "linear-all-cls+ap": "concat",
}
TITLES = {
    "linear-last-cls": "linear, last layer CLS",
    "linear-all-cls+ap": "linear, all layers CLS+AP",
    ATTENTIVE_FUSION: "AttentiveFusion, all layers",
}
DEFAULT_FAMILIES = ("linear-last-cls", "linear-all-cls+ap", ATTENTIVE_FUSION)


def fused_families() -> tuple[str, ...]:
    """The fused probe families this build's sweep can train.

    AttentiveFusion always; more when the sweep declares them (``fastfuse.sweep.families``
    with a ``FAMILIES`` mapping, and ``run_sweep(probe=...)`` to select one).
    """
    names = [ATTENTIVE_FUSION]
    try:
        from ..sweep import families as sweep_families
    except ImportError:
        return tuple(names)
    declared = getattr(sweep_families, "FAMILIES", None) or getattr(sweep_families, "PROBE_FAMILIES", None) or ()
    if _sweep_selects_probe():
        names += [str(name) for name in declared if str(name) not in names]
    return tuple(names)


def _sweep_selects_probe() -> bool:
    from ..sweep import run_sweep

    return "probe" in inspect.signature(run_sweep).parameters


def sweep_kwargs(family: str) -> dict:
    """The run_sweep arguments that select ``family`` (none for AttentiveFusion, the default)."""
    return {} if family == ATTENTIVE_FUSION else {"probe": family}


def known_families() -> tuple[str, ...]:
    return tuple(LINEAR_FAMILIES) + fused_families()


def title(family: str) -> str:
    return TITLES.get(family, family)


def validate(families) -> tuple[str, ...]:
    """A non-empty, repeat-free list of known family names, with at least one fused family
    (the linear probes train beside it)."""
    if isinstance(families, str) or not isinstance(families, (list, tuple)) or not families:
        raise ValueError(f"probes.families must be a non-empty list of names, got {families!r}")
    known = known_families()
    for name in families:
        if name not in known:
            raise ValueError(f"probes.families: unknown family {name!r}; this fastfuse knows {list(known)}")
    if len(set(families)) != len(families):
        raise ValueError(f"probes.families repeats a name: {list(families)}")
    if not any(name not in LINEAR_FAMILIES for name in families):
        raise ValueError("probes.families needs at least one fused family (e.g. 'attentive-fusion'): the "
                         "linear probes are trained beside it, in its lockstep sweep")
    return tuple(families)
