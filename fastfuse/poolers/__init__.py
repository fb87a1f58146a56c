"""The field's attentive poolers, folded (SPEC §5), under their upstream names and state_dict keys.

    fastfuse.poolers.AttentionPoolLatent          timm (timm/layers/attention_pool.py)
    fastfuse.poolers.AttentivePooler              V-JEPA (facebookresearch/jepa)
    fastfuse.poolers.AttentiveClassifier          V-JEPA
    fastfuse.poolers.AttentionPoolingClassifier   AIM (apple/ml-aim)
    fastfuse.poolers.EfficientProbing             efficient probing (billpsomas/efficient-probing)
    fastfuse.fuse(module)                         any of the upstream modules (or a model holding
                                                  them) -> the folded equivalent

Modules: fold (the shared fold rules), one module per upstream family, fuse (the dispatch),
reference (unfused restatements of the non-package upstream modules, for the benchmarks).
"""
from .aim import AttentionPoolingClassifier
from .efficient_probing import EfficientProbing
from .fuse import fuse, supported
from .timm import AttentionPoolLatent
from .vjepa import AttentiveClassifier, AttentivePooler

__all__ = ["AttentionPoolLatent", "AttentivePooler", "AttentiveClassifier", "AttentionPoolingClassifier",
           "EfficientProbing", "fuse", "supported"]
