"""How results show themselves: a short terminal repr and a picture in Jupyter, with no set-up.

One decorator, :func:`rich_display`, gives a result class

- ``__repr__``: at most three lines (type, method, layer, targets; shapes, dtype, device; the
  settings), never a tensor dump and never an absolute path (a path is shown by its file name);
- ``_repr_png_``: the result's own ``.plot()`` figure with a one-line caption of the settings
  that made it, as PNG bytes. Jupyter calls it by itself: no pyplot, no ``%matplotlib``, nothing
  registered globally, the user's matplotlib set-up untouched.

:class:`convlens.plotting.ResultFigure` is the ``Figure`` that ``.plot()`` returns: a plain
matplotlib figure that also shows itself as the last line of a notebook cell, by the same
:func:`figure_png`. This module imports no matplotlib, so ``import convlens`` stays light.

A class may refine what is shown by defining ``_repr_lines(self) -> list[str]`` (the repr),
``_display_caption(self) -> str`` or ``_display_figure(self) -> Figure``.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .methods.registry import METHOD_TITLES  # how each method's name is written for people

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["rich_display", "summary_lines", "caption", "figure_png", "short", "PNG_SIGNATURE", "METHOD_TITLES",
           "data_uri"]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: the widest line a repr prints, in characters
WIDTH = 110
#: resolution of notebook pictures (the saved PNGs have their own)
DPI = 80

T = TypeVar("T", bound=type)


def data_uri(data: bytes) -> str:
    """PNG (or JPEG) bytes as a ``data:`` URI for an ``<img src>``: the report's figures and
    thumbnails and the explorer's maps."""
    kind = "png" if data[:8] == PNG_SIGNATURE else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def figure_png(fig: Figure, *, dpi: int = DPI) -> bytes:
    """``fig`` as PNG bytes (tight bounding box), drawn on a private Agg canvas; pyplot is not used.

    Example::

        png = figure_png(cam.plot(index=0))
        Path("cam.png").write_bytes(png)
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


# -- text ---------------------------------------------------------------------------------------
def _clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _is_array(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (int, float, np.generic))


def short(value: Any, width: int = 40) -> str:
    """A value in a few characters: arrays and tensors by shape, long sequences cut with their
    length, absolute paths by file name, floats to 4 significant digits.

    Example::

        short(torch.zeros(3, 7, 7))   # '(3, 7, 7)'
        short(list(range(20)))        # '[0, 1, 2, … (20)]'
    """
    if _is_array(value):
        return str(tuple(value.shape))
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.isabs(value)):
        return Path(value).name  # never the folder of an installed file, which says nothing about the run
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return _clip(value, width)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}={short(v, 16)}" for k, v in list(value.items())[:3])
        return "{" + inner + (", …" if len(value) > 3 else "") + "}"
    if isinstance(value, Sequence):
        items = [short(v, 16) for v in value[:3]]
        more = f", … ({len(value)})" if len(value) > 3 else ""
        text = ", ".join(items) + more
        return _clip(f"({text})" if isinstance(value, tuple) else f"[{text}]", width)
    return _clip(str(value), width)


def _fields(obj: Any) -> list[tuple[str, Any]]:
    """(name, value) of what a repr may show: dataclass fields with ``repr=True``, else public attributes."""
    if dataclasses.is_dataclass(obj):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr]
    return [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]


def _targets(obj: Any, limit: int = 3) -> str:
    """``label [index]`` per row, from ``labels`` and ``target`` when the result has them."""
    labels = list(getattr(obj, "labels", None) or [])
    target = getattr(obj, "target", None)
    target = list(target) if isinstance(target, Sequence) and not isinstance(target, str) else []
    n = max(len(labels), len(target))
    parts = []
    for i in range(min(n, limit)):
        label = labels[i] if i < len(labels) else ""
        index = f"[{target[i]}]" if i < len(target) and isinstance(target[i], int) else ""
        parts.append(" ".join(p for p in (label, index) if p))
    return ", ".join(parts) + (f", … ({n} rows)" if n > limit else "")


def _device(obj: Any) -> str:
    """``dtype on device`` of the first tensor (or array) among the fields."""
    for _, v in _fields(obj):
        cands = list(v.values()) if isinstance(v, Mapping) else [v]
        for t in cands:
            if _is_array(t):
                dtype = str(t.dtype).removeprefix("torch.")
                device = getattr(t, "device", "cpu")  # numpy arrays live in host memory
                return f"{dtype} on {device}"
    return ""


def summary_lines(obj: Any) -> list[str]:
    """The generic three-line summary of a result (see the module docstring).

    Line 1: ``Type: method at layer for label [index], …``; line 2: the shape of every tensor
    field (a dict of tensors: its first entries), then ``dtype on device``; line 3: the settings
    and the remaining short fields as ``key=value``. Each line is cut at :data:`WIDTH` characters.

    Example::

        summary_lines(cam)  # ['Saliency: gradcam at blocks.6 for Egyptian cat [285]', 'maps (1, 224, 224), ...', ...]
    """
    name = type(obj).__name__
    method = getattr(obj, "method", None)
    layer = getattr(obj, "layer", None)
    head = f"{name}: {method}" if isinstance(method, str) else name
    if isinstance(layer, str) and layer:
        head += f" at {layer}"
    targets = _targets(obj)
    if targets:
        head += f" for {targets}"
    shapes, rest = [], []
    shown = {"method", "layer", "labels", "target", "settings"}
    for key, value in _fields(obj):
        if key in shown:
            continue
        if _is_array(value):
            shapes.append(f"{key} {tuple(value.shape)}")
        elif isinstance(value, Mapping) and value and all(_is_array(v) for v in value.values()):
            first = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(value.items())[:2])
            shapes.append(f"{key}: {len(value)} × [{first}{', …' if len(value) > 2 else ''}]")
        else:
            rest.append(f"{key}={short(value, 24)}")
    device = _device(obj)
    lines = [head]
    if shapes or device:
        lines.append(", ".join(shapes) + (f"; {device}" if device else ""))
    settings = getattr(obj, "settings", None)
    settings = ", ".join(f"{k}={short(v, 24)}" for k, v in settings.items()) if isinstance(settings, Mapping) else ""
    if rest or settings:
        lines.append("; ".join(p for p in (", ".join(rest), settings and f"settings: {settings}") if p))
    return [_clip(line) for line in lines[:3]]


def _long(value: Any) -> bool:
    """A sequence of more than four items, or of sequences."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        return False
    return len(value) > 4 or any(isinstance(v, Sequence) and not isinstance(v, str) for v in value)


def caption(obj: Any) -> str:
    """One line naming the settings that made ``obj``: its method, layer and targets, then
    ``settings`` as ``key=value``, cut to :data:`WIDTH` characters.

    Example::

        caption(cam)  # 'gradcam · blocks.6 · Egyptian cat [285] · layer_shape=(320, 7, 7), image_index=[0]'
    """
    parts = [str(v) for v in (getattr(obj, "method", None), getattr(obj, "layer", None)) if isinstance(v, str)]
    targets = _targets(obj)
    if targets:
        parts.append(targets)
    settings = getattr(obj, "settings", None)
    if isinstance(settings, Mapping) and settings:
        # the knobs, not the bookkeeping derived from them (window positions, per-row indices)
        knobs = {k: v for k, v in settings.items() if not _long(v)}
        parts.append(", ".join(f"{k}={short(v, 24)}" for k, v in knobs.items()))
    return _clip(" · ".join(parts) or type(obj).__name__, 140)


# -- the decorator --------------------------------------------------------------------------
def _repr(self: Any) -> str:
    lines = self._repr_lines() if hasattr(self, "_repr_lines") else summary_lines(self)
    return "\n".join(_clip(str(line)) for line in list(lines)[:3])


def _repr_png_(self: Any) -> bytes:
    fig = self._display_figure() if hasattr(self, "_display_figure") else self.plot()
    text = self._display_caption() if hasattr(self, "_display_caption") else caption(self)
    if text:
        # below the axes (the PNG's tight bounding box grows to include it), cut to the figure's
        # width: a 9 pt character is about 5 pt wide
        fig.text(0.01, 0.0, _clip(text, max(40, int(fig.get_figwidth() * 72 / 5.2))), ha="left", va="top",
                 fontsize=9, color="0.3")
    return figure_png(fig)


def rich_display(cls: T) -> T:
    """Class decorator: a short ``__repr__`` and, for a class with ``.plot()``, ``_repr_png_``.

    Put it above (or below) ``@dataclass``: the ``__repr__`` is replaced either way (a dataclass's
    generated one would dump every tensor). A class with its own ``_repr_png_`` or ``_repr_html_``
    (the :class:`~convlens.explain.Report`) keeps it and gets no PNG.

    Example::

        @rich_display
        @dataclass(frozen=True)
        class DeletionCurve: ...
    """
    cls.__repr__ = _repr  # type: ignore[assignment]
    if callable(getattr(cls, "plot", None)) and not hasattr(cls, "_repr_png_") and not hasattr(cls, "_repr_html_"):
        cls._repr_png_ = _repr_png_  # type: ignore[attr-defined]
    return cls
