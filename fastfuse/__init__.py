"""fastfuse: fused attentive multi-layer fusion probes for PyTorch (see SPEC.md)."""
from .backends import backends
from .features import load_features, load_metadata, save_features
from .gather import TOKEN_SPECS
from .module import AttentiveFusion
from .moments import token_moments
from .ops import attentive_pool
from .paper import PaperAttentiveProbe
from .poolers import fuse
from .taps import LayerTap

__version__ = "0.1.0"
__all__ = ["AttentiveFusion", "attentive_pool", "backends", "PaperAttentiveProbe", "TOKEN_SPECS",
           "LayerTap", "fuse", "save_features", "load_features", "load_metadata", "__version__",
           "token_moments"]
