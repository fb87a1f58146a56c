"""Kernel sources, one sub-package per language (``triton``); imported only by their backends."""
