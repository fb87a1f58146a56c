"""``fastfuse.fuse``: swap the attentive poolers of a model for their folded twins.

Dispatch is one small table on the module's type. timm's pooler is matched by class (timm is
a package); V-JEPA, AIM and efficient probing are not packages (users vendor their source), so
their modules are matched by class name and then checked attribute by attribute when folded.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

from torch import nn

from .aim import AttentionPoolingClassifier
from .efficient_probing import EfficientProbing
from .timm import AttentionPoolLatent
from .vjepa import AttentiveClassifier, AttentivePooler

FUSED_CLASSES = (AttentionPoolLatent, AttentivePooler, AttentiveClassifier, AttentionPoolingClassifier,
                 EfficientProbing)

# upstream class name -> (where it comes from, fused class)
_BY_NAME = {
    "AttentionPoolLatent": ("timm, timm/layers/attention_pool.py", AttentionPoolLatent),
    "AttentivePooler": ("facebookresearch/jepa, src/models/attentive_pooler.py", AttentivePooler),
    "AttentiveClassifier": ("facebookresearch/jepa, src/models/attentive_pooler.py", AttentiveClassifier),
    "AttentionPoolingClassifier": ("apple/ml-aim, aim-v1/aim/v1/torch/layers.py", AttentionPoolingClassifier),
    "EfficientProbing": ("billpsomas/efficient-probing, poolings/ep.py", EfficientProbing),
}


def _converter(module: nn.Module) -> Optional[Callable]:
    if isinstance(module, FUSED_CLASSES):
        return None
    entry = _BY_NAME.get(type(module).__name__)
    return None if entry is None else entry[1].from_upstream


def supported() -> dict:
    """Upstream class name -> its source, for messages and docs."""
    return {name: source for name, (source, _cls) in _BY_NAME.items()}


def fuse(module: nn.Module, inplace: bool = False, *, backend: Optional[str] = None) -> nn.Module:
    """The folded equivalent of ``module``: a pooler of :func:`supported`, or a model holding some.

    A pooler is returned as its fused class (same state_dict keys, same outputs and gradients).
    In a model every pooler submodule is replaced: in ``module`` itself with ``inplace=True``
    (and ``module`` is returned), else in a deep copy. Training mode, device, dtype and
    ``requires_grad`` flags carry over. A pooler configuration that does not fold raises
    ValueError naming the option; a model without any pooler raises ValueError too.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    convert = _converter(module)
    if convert is not None:
        return convert(module, backend)
    if isinstance(module, FUSED_CLASSES):
        return module if inplace else copy.deepcopy(module)
    target = module if inplace else copy.deepcopy(module)
    replaced = _replace_children(target, backend)
    if not replaced and not _contains_fused(target):
        raise ValueError(f"no attentive pooler found in {type(module).__name__}: fuse() folds "
                         + ", ".join(f"{name} ({source})" for name, source in supported().items()))
    return target


def _replace_children(parent: nn.Module, backend: Optional[str]) -> int:
    count = 0
    for name, child in list(parent.named_children()):
        convert = _converter(child)
        if convert is not None:
            setattr(parent, name, convert(child, backend))
            count += 1
        elif not isinstance(child, FUSED_CLASSES):
            count += _replace_children(child, backend)
    return count


def _contains_fused(module: nn.Module) -> bool:
    return any(isinstance(child, FUSED_CLASSES) for child in module.modules())
