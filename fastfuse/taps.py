"""LayerTap: the activations of many layers of a ViT backbone, captured by forward hooks.

``acts = tap(images)`` runs the model once and returns one (B, T, D) tensor per tapped module,
exactly the tensors the model computed (no copy, no stack), ready for the fused op with a token
spec (SPEC §3): ``AttentiveFusion(...)(acts, tokens="cls+ap", num_prefix_tokens=tap.num_prefix_tokens)``.

Works with timm ``VisionTransformer``-like models: ``model.blocks`` (a sequence of blocks with
``norm2``), ``model.norm``, and ``model.num_prefix_tokens`` (or ``cls_token`` / ``reg_token``).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch
from torch import nn

LAYER_PRESETS = ("paper", "blocks")


class _StopForward(Exception):
    """Raised by the last hook once every tapped module has run: the rest of the model is
    not needed, so a tap of early blocks costs only those blocks."""


def _blocks(model: nn.Module) -> Sequence[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ValueError(
            f"model ({type(model).__name__}) has no `blocks` sequence of transformer blocks: "
            "layers='paper', 'blocks' and block indices need a timm VisionTransformer-like model; "
            "pass layers as a list of module names instead")
    return blocks


def _resolve_layer_names(model: nn.Module, layers) -> list[str]:
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ValueError(f"layers must be one of {LAYER_PRESETS}, a list of module names or a "
                             f"list of block indices, got {layers!r}")
        blocks = _blocks(model)
        if layers == "blocks":
            return [f"blocks.{index}" for index in range(len(blocks))]
        for index, block in enumerate(blocks):
            if not isinstance(getattr(block, "norm2", None), nn.Module):
                raise ValueError(
                    f"layers='paper' taps every block's norm2, but block {index} "
                    f"({type(block).__name__}) has no norm2 module; use layers='blocks' or module names")
        if not isinstance(getattr(model, "norm", None), nn.Module):
            raise ValueError(f"layers='paper' taps the final `norm`, but model ({type(model).__name__}) "
                             "has no `norm` module; use layers='blocks' or module names")
        # timm replaces `norm` by Identity when it normalises after pooling (fc_norm): the tap
        # then reads the last block's output, the residual stream the classifier pools.
        return [f"blocks.{index}.norm2" for index in range(len(blocks))] + ["norm"]
    if not isinstance(layers, (list, tuple)) or len(layers) == 0:
        raise TypeError(f"layers must be 'paper', 'blocks', or a non-empty list of module names or "
                        f"of block indices, got {layers!r}")
    if all(isinstance(item, str) for item in layers):
        names = list(layers)
    elif all(isinstance(item, int) and not isinstance(item, bool) for item in layers):
        num_blocks = len(_blocks(model))
        names = []
        for index in layers:
            if not -num_blocks <= index < num_blocks:
                raise ValueError(f"layers contains block index {index}, but the model has "
                                 f"{num_blocks} blocks (valid: {-num_blocks}..{num_blocks - 1})")
            names.append(f"blocks.{index % num_blocks}")
    else:
        raise TypeError(f"layers must be a list of module names (str) or of block indices (int), "
                        f"not a mix; got {layers!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a module more than once: {names}")
    return names


def _model_prefix_tokens(model: nn.Module) -> Optional[int]:
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    if not (hasattr(model, "cls_token") or hasattr(model, "reg_token")):
        return None
    count = 0 if getattr(model, "cls_token", None) is None else 1
    registers = getattr(model, "reg_token", None)
    return count + (0 if registers is None else registers.shape[1])


class LayerTap:
    """Callable that runs ``model`` and returns the activations of the chosen layers.

    Args:
        model: a timm ``VisionTransformer``-like backbone (or, with module names, any module).
        layers: ``"paper"``: every block's ``norm2`` output (the LayerNorm of the residual stream
            before each MLP) plus the final ``norm``, the paper's choice; ``"blocks"``: every
            block's output; a list of module names (``model.named_modules()`` keys); or a list
            of block indices (negative ones count from the end), meaning those blocks' outputs.
        keep_grad: False (default) runs the model under ``torch.no_grad()``: a frozen backbone,
            no graph kept. True leaves grad mode as the caller set it, so the activations carry
            the graph back into the backbone (fine-tuning).
        num_prefix_tokens: override of the prefix-token count (CLS plus registers); by default
            it is read from the model (``num_prefix_tokens``, else ``cls_token`` / ``reg_token``).

    The model's train/eval mode is never changed: call ``model.eval()`` for a frozen backbone
    (timm creates models in train mode; dropout and drop-path would then stay active). Not
    ``torch.inference_mode``: its tensors could not be saved for the probe's backward.

    The activations come in the order of ``tap.layer_names`` (depth order for the presets, the
    given order for lists). The model stops as soon as every tapped module has run, so a tap of
    early blocks skips the later ones. Hooks capture only during ``tap(...)``; plain calls of the
    model are unaffected, and no activation outlives the call's result. ``tap.close()`` (or
    leaving a ``with LayerTap(...) as tap:`` block) removes the hooks.
    """

    def __init__(self, model: nn.Module, layers: Union[str, Sequence[str], Sequence[int]] = "paper",
                 *, keep_grad: bool = False, num_prefix_tokens: Optional[int] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(keep_grad, bool):
            raise TypeError(f"keep_grad must be a bool, got {type(keep_grad).__name__}")
        names = _resolve_layer_names(model, layers)
        modules = dict(model.named_modules())
        unknown = [name for name in names if name not in modules]
        if unknown:
            raise ValueError(f"layers names modules that model ({type(model).__name__}) does not "
                             f"have: {unknown}; see model.named_modules() for valid names")
        if num_prefix_tokens is None:
            num_prefix_tokens = _model_prefix_tokens(model)
            if num_prefix_tokens is None:
                raise ValueError(
                    f"cannot tell how many prefix tokens model ({type(model).__name__}) has (no "
                    "num_prefix_tokens, cls_token or reg_token attribute): pass num_prefix_tokens=")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        self.model = model
        self.layer_names = names
        self.num_prefix_tokens = num_prefix_tokens
        self.keep_grad = keep_grad
        self._captured: list = [None] * len(names)
        self._pending = 0
        self._active = False
        self._handles = [modules[name].register_forward_hook(self._make_hook(index))
                         for index, name in enumerate(names)]

    def _make_hook(self, index: int):
        name = self.layer_names[index]

        def hook(module, inputs, output):
            if not self._active:
                return None
            if not isinstance(output, torch.Tensor) or output.dim() != 3:
                described = (f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor)
                             else type(output).__name__)
                raise ValueError(f"layer {name!r} returned {described}; LayerTap needs modules "
                                 "whose output is a (batch, tokens, dim) tensor")
            if self._captured[index] is not None:
                raise RuntimeError(f"layer {name!r} ran more than once in one forward pass; "
                                   "LayerTap captures one activation per module")
            self._captured[index] = output
            self._pending -= 1
            if self._pending == 0:
                raise _StopForward
            return None

        return hook

    def __call__(self, images, *args, **kwargs) -> list[torch.Tensor]:
        """Run the model on ``images`` (extra arguments pass through) and return the activations."""
        if self._handles is None:
            raise RuntimeError("this LayerTap is closed: its hooks were removed")
        if self._active:
            raise RuntimeError("LayerTap called re-entrantly (the model calls its own tap)")
        self._captured = [None] * len(self.layer_names)
        self._pending = len(self.layer_names)
        self._active = True
        grad_context = contextlib.nullcontext() if self.keep_grad else torch.no_grad()
        try:
            with grad_context:
                self.model(images, *args, **kwargs)
        except _StopForward:
            pass
        finally:
            self._active = False
            captured, self._captured = self._captured, [None] * len(self.layer_names)
        missing = [name for name, act in zip(self.layer_names, captured) if act is None]
        if missing:
            raise RuntimeError(f"layers {missing} did not run during the model's forward pass")
        return captured

    def close(self) -> None:
        """Remove the hooks; the model is left as it was before the tap."""
        if self._handles is not None:
            for handle in self._handles:
                handle.remove()
            self._handles = None

    def __enter__(self) -> "LayerTap":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"LayerTap({type(self.model).__name__}, {len(self.layer_names)} layers, "
                f"num_prefix_tokens={self.num_prefix_tokens}, keep_grad={self.keep_grad}"
                f"{', closed' if self._handles is None else ''})")
