"""How a captured layer output lies on the image: the one place that decides it.

A layer's output becomes an (N, C, h, w) map by one of these layouts:

- ``"nchw"``: already a map (every CNN).
- ``"nhwc"``: channels last (N, h, w, C), as timm's Swin stages and the channels-last norms inside
  ConvNeXt blocks give; permuted.
- ``"tokens"``: (N, T, C) with ``k`` prefix tokens (class, distillation, register tokens: timm's
  ``num_prefix_tokens``) and a grid (timm's ``patch_embed.grid_size``, the input size over the
  patch size for ``dynamic_img_size`` models, else a square ``T - k``); the prefix tokens are
  dropped and the rest laid on the grid row by row, as pytorch-grad-cam's ``reshape_transform``.
- ``reshape=callable``: the caller's own ``tensor -> (N, C, h, w)`` (pytorch-grad-cam's recipe).

A 4-D output is NCHW unless the model has channels-last norms (``nn.LayerNorm`` over the last
axis) or says ``output_fmt="NHWC"``; in such a model the module's own channel count (its last
conv, linear or norm) and the input's aspect ratio decide, and anything undecided is an error
naming the shape and the ``layout=`` / ``reshape=`` override: never a silent guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

__all__ = [
    "LayerError",
    "Layout",
    "LayoutName",
    "Reshape",
    "map_layout",
    "layout_for",
    "required_input_size",
    "class_token_model",
]

LayoutName = Literal["nchw", "nhwc", "tokens"]
Reshape = Callable[[Tensor], Tensor]
LAYOUTS = ("nchw", "nhwc", "tokens")


class LayerError(ValueError):
    """An unknown layer name, a module that is not part of the model, or a layer output that is
    no map of the image (re-exported by :mod:`convlens.layers`)."""


_HOW = ("choose a layer whose output is a map (`convlens layers` shows each output's shape), or pass "
        "layout='nchw', 'nhwc' or 'tokens', or reshape=callable(tensor) -> (N, C, h, w)")


@dataclass(frozen=True)
class Layout:
    """How one layer's output becomes an (N, C, h, w) map.

    ``kind``: ``"nchw"``, ``"nhwc"``, ``"tokens"`` or ``"reshape"`` (a caller's callable ``fn``);
    ``prefix``: the leading tokens dropped (class, distillation, register tokens); ``grid``:
    the token grid (h, w).
    """

    kind: str
    prefix: int = 0
    grid: tuple[int, int] | None = None
    fn: Reshape | None = None

    def apply(self, t: Tensor) -> Tensor:
        """The (N, C, h, w) map of a captured output ``t`` (a view where possible; differentiable)."""
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            assert self.grid is not None
            n, _, c = t.shape
            return t[:, self.prefix :].reshape(n, *self.grid, c).permute(0, 3, 1, 2)
        assert self.fn is not None
        out = self.fn(t)
        if not isinstance(out, Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise LayerError(f"reshape= returned {shape}, not an (N, C, h, w) map")
        return out

    def describe(self) -> str:
        """A short name for tables and logs: ``nchw``, ``nhwc``, ``tokens 1+14x14``, ``reshape``."""
        if self.kind == "tokens" and self.grid is not None:
            return f"tokens {self.prefix}+{self.grid[0]}x{self.grid[1]}"
        return self.kind

    def settings(self) -> dict[str, object]:
        """What a result records about the layout (the prefix tokens dropped, the grid)."""
        out: dict[str, object] = {"layout": self.kind}
        if self.kind == "tokens":
            out.update(prefix_tokens=self.prefix, grid=list(self.grid or ()))
        return out


def map_layout(
    model: nn.Module,
    name: str,
    module: nn.Module | None,
    shape: tuple[int, ...],
    input_hw: tuple[int, int],
    *,
    layout: LayoutName | str | None = None,
    reshape: Reshape | None = None,
    batch: int | None = None,
    channels_last: bool | None = None,
) -> Layout:
    """The layout of ``module``'s output of ``shape`` for an input of ``input_hw`` (see module doc).

    Args:
        model: the whole model (its ``num_prefix_tokens``, ``patch_embed``, norms are read).
        name: the layer's name, for messages.
        module: the layer's module (its channel count is read), or None.
        shape: the captured output's shape, batch axis first.
        input_hw: the input's (H, W).
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"`` to override the inference.
        reshape: a callable ``tensor -> (N, C, h, w)``; wins over everything.
        batch: the input's batch size, when known: an output whose first axis differs (Swin's
            attention windows) is no map of the image.
        channels_last: whether the model can hold channels-last maps, when the caller knows
            (the layer table asks once, not per layer: a look at every module each time).
    Returns:
        The :class:`Layout`.
    Raises:
        LayerError: an unknown ``layout``, a shape that does not fit it, or a layout that cannot
            be inferred (the message names the shape and the override).

    Example::

        map_layout(vit, "blocks.11.norm1", vit.blocks[11].norm1, (1, 197, 192), (224, 224)).describe()
        # 'tokens 1+14x14'
    """
    shape = tuple(int(s) for s in shape)
    if reshape is not None:
        if not callable(reshape):
            raise TypeError(f"reshape must be a callable tensor -> (N, C, h, w), not {type(reshape).__name__}")
        return Layout("reshape", fn=reshape)
    if layout is not None and layout not in LAYOUTS:
        raise LayerError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    where = f"layer {name!r} outputs {shape}"
    if batch is not None and shape and shape[0] != batch:
        raise LayerError(f"{where} for a batch of {batch}: its first axis is not the batch; {_HOW}")
    if layout == "tokens" or (layout is None and len(shape) == 3):
        if len(shape) != 3:
            raise LayerError(f"{where}; layout='tokens' needs (N, T, C)")
        return _tokens(model, shape, input_hw, where)
    if len(shape) != 4:
        raise LayerError(f"{where}, not an (N, C, h, w) map of the image; {_HOW}")
    if layout is not None:
        return Layout(layout)
    if not (channels_last_model(model) if channels_last is None else channels_last):
        return Layout("nchw")
    c = _channels(module) if module is not None else None
    fits = {k: _fits(hw, input_hw) for k, hw in (("nchw", shape[2:4]), ("nhwc", shape[1:3]))}
    if c is not None and shape[1] != shape[3]:
        kind = "nchw" if shape[1] == c else "nhwc" if shape[3] == c else None
        if kind is not None and fits[kind]:
            return Layout(kind)
    if fits["nchw"] != fits["nhwc"] and c is None:
        return Layout("nchw" if fits["nchw"] else "nhwc")
    raise LayerError(f"{where} in a model with channels-last layers, and convlens cannot tell its layout; {_HOW}")


def layout_for(
    clf: object,
    name: str,
    module: nn.Module | None,
    shape: tuple[int, ...],
    input_hw: tuple[int, int],
    *,
    layout: LayoutName | str | None = None,
    reshape: Reshape | None = None,
    batch: int | None = None,
    channels_last: bool | None = None,
) -> Layout:
    """:func:`map_layout` for a technique: its own ``layout=``/``reshape=`` when given, else the
    classifier's (``Classifier(layout=..., reshape=...)``), else inferred from ``clf.model``."""
    if layout is None and reshape is None:
        layout, reshape = getattr(clf, "layout", None), getattr(clf, "reshape", None)
    model = clf.model  # type: ignore[attr-defined]
    return map_layout(model, name, module, shape, input_hw, layout=layout, reshape=reshape, batch=batch,
                      channels_last=channels_last)


def _tokens(model: nn.Module, shape: tuple[int, ...], input_hw: tuple[int, int], where: str) -> Layout:
    t = shape[1]
    k = getattr(model, "num_prefix_tokens", None)
    k = int(k) if isinstance(k, int) and not isinstance(k, bool) and k >= 0 else None
    grid = _model_grid(model, input_hw)
    if grid is not None and (k is None or k + grid[0] * grid[1] == t) and 0 <= t - grid[0] * grid[1] <= 16:
        return Layout("tokens", prefix=t - grid[0] * grid[1], grid=grid)
    side = math.isqrt(max(t - (k or 0), 0))
    if side > 0 and side * side == t - (k or 0):
        return Layout("tokens", prefix=k or 0, grid=(side, side))
    known = f"{k} prefix token(s) and " if k is not None else ""
    raise LayerError(f"{where}: {known}no token grid fits {t} tokens; {_HOW}")


def _model_grid(model: nn.Module, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid a timm-style model declares for this input: ``patch_embed.grid_size`` at its
    own image size, the input over the patch size otherwise (``dynamic_img_size``; a Hugging Face
    model's ``config.patch_size``)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None:  # a Hugging Face model says its patch size in its config
        patch = getattr(getattr(model, "config", None), "patch_size", None)
        return (input_hw[0] // patch, input_hw[1] // patch) if isinstance(patch, int) and patch > 0 else None
    img, grid, patch = (getattr(pe, a, None) for a in ("img_size", "grid_size", "patch_size"))
    if grid is not None and img is not None and tuple(img) == tuple(input_hw):
        return int(grid[0]), int(grid[1])
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        ceil = bool(getattr(pe, "dynamic_img_pad", False))
        h, w = input_hw
        return (-(-h // ph), -(-w // pw)) if ceil else (h // ph, w // pw)
    return None


def channels_last_model(model: nn.Module) -> bool:
    """Whether the model can hold channels-last maps: timm's ``output_fmt="NHWC"`` or a plain
    ``nn.LayerNorm`` (it normalises the last axis; timm's ``LayerNorm2d`` normalises channels)."""
    if str(getattr(model, "output_fmt", "")).upper() == "NHWC":
        return True
    return any(isinstance(m, nn.LayerNorm) and not type(m).__name__.endswith("2d") for m in model.modules())


def _channels(module: nn.Module) -> int | None:
    """The channel count a module's output has: its own (conv, linear, norm), else its last
    registered child's that has one."""
    for attr in ("out_channels", "out_features", "num_features"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    ns = getattr(module, "normalized_shape", None)
    if isinstance(ns, tuple) and ns:
        return int(ns[-1]) if not type(module).__name__.endswith("2d") else int(ns[0])
    for child in reversed(list(module.children())):
        c = _channels(child)
        if c is not None:
            return c
    return None


def _fits(hw: tuple[int, ...], input_hw: tuple[int, int]) -> bool:
    """Whether an (h, w) grid can cover an (H, W) input with about one stride on both axes."""
    h, w = hw
    big_h, big_w = input_hw
    if not (0 < h <= big_h and 0 < w <= big_w):
        return False
    sh, sw = big_h / h, big_w / w
    return max(sh, sw) / min(sh, sw) < 1.5


def required_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The only (H, W) a model takes, or None when it takes others: timm's ``patch_embed`` with
    ``strict_img_size`` and no ``dynamic_img_size`` (ViT, DeiT, EVA, Swin at their defaults).

    Example::

        required_input_size(timm.create_model("vit_tiny_patch16_224"))   # (224, 224)
    """
    pe = getattr(model, "patch_embed", None)
    if pe is None or not getattr(pe, "strict_img_size", False) or getattr(model, "dynamic_img_size", False):
        return None
    img = getattr(pe, "img_size", None)
    return (int(img[0]), int(img[1])) if img is not None else None


def class_token_model(model: nn.Module) -> bool:
    """A model whose head reads prefix tokens only (timm ``global_pool="token"`` with a class token;
    Hugging Face's ViT and DeiT classifiers): the final block's patch tokens never reach the output."""
    k = getattr(model, "num_prefix_tokens", 0)
    if isinstance(k, int) and k >= 1 and getattr(model, "global_pool", None) == "token":
        return True
    kind = getattr(getattr(model, "config", None), "model_type", None)
    return kind in ("vit", "deit") and type(model).__name__.endswith(_HF_HEADS)


_HF_HEADS = ("ForImageClassification", "ForImageClassificationWithTeacher")
