"""fastfuse: fused attentive multi-layer fusion probes for PyTorch (see SPEC.md)."""
from .backends import backends
from .gather import TOKEN_SPECS
from .module import AttentiveFusion
from .ops import attentive_pool
from .paper import PaperAttentiveProbe

__version__ = "0.1.0"
__all__ = ["AttentiveFusion", "attentive_pool", "backends", "PaperAttentiveProbe", "TOKEN_SPECS",
           "__version__"]
