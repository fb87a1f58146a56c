"""Triton kernels of the fused op (SPEC §2-§3), one module per kernel family.

Imported lazily by ``fastfuse/backends/triton.py``: ``@triton.jit`` decides at decoration time
whether a kernel runs compiled or under the interpreter (TRITON_INTERPRET=1), so these modules
must be imported after that variable is settled, and never at ``import fastfuse``.

    configs.py        launch configurations (autotuned on a GPU, one under the interpreter)
    tokens.py         how a tile of gathered tokens is addressed and loaded (shared helpers)
    pool_forward.py   scores, streaming softmax, pooled sum (forward)
    pool_backward.py  softmax and LayerNorm backward, d tokens / d layers, d score weight
"""
