"""Arrays -> PNG bytes for the page. Nothing here computes an explanation (see ``plotting.py``
for the figures; this is the same colouring, encoded fast for a browser)."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image

from .._scaling import minmax
from ..display import data_uri

__all__ = ["png", "data_uri", "rgb_png", "heat_png", "signed_png", "channel_pngs"]

_LUTS: dict[str, np.ndarray] = {}


def _lut(cmap: str) -> np.ndarray:
    """(256, 3) uint8 colour table of a matplotlib colormap (looked up once)."""
    if cmap not in _LUTS:
        _LUTS[cmap] = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    return _LUTS[cmap]


def png(a: np.ndarray) -> bytes:
    """An (H, W, 3|4) uint8 array as PNG bytes (fast compression: these are sent, not stored)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def rgb_png(rgb: np.ndarray, max_side: int | None = None) -> bytes:
    """An (H, W, 3) float RGB image in [0, 1] as PNG, shrunk to ``max_side`` if given."""
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def heat_png(m: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> bytes:
    """A map coloured with ``cmap`` between ``vmin`` and ``vmax`` (values outside are clipped)."""
    span = vmax - vmin
    t = np.zeros_like(m, dtype=np.float32) if span <= 0 else (m - vmin) / span
    idx = (np.clip(t, 0, 1) * 255 + 0.5).astype(np.uint8)
    return png(_lut(cmap)[idx])


def signed_png(m: np.ndarray, cmap: str = "RdBu_r") -> bytes:
    """A signed map (occlusion drops) on a diverging colormap centred on zero; its alpha follows
    ``|m| / max|m|``, so windows that do not matter show the photo (as in ``plot_saliency``)."""
    vmax = float(np.abs(m).max()) or 1.0
    idx = (np.clip((m / vmax + 1) / 2, 0, 1) * 255 + 0.5).astype(np.uint8)
    alpha = (np.clip(np.abs(m) / vmax, 0, 1) * 255 + 0.5).astype(np.uint8)
    return png(np.dstack([_lut(cmap)[idx], alpha]))


def channel_pngs(maps: np.ndarray, size: int = 96) -> list[bytes]:
    """(k, h, w) channel maps as viridis PNGs on one shared scale (min..max over all k, so
    strengths compare), each scaled up to ``size`` px with nearest neighbours (the cells stay visible)."""
    out = []
    for t in minmax(maps):
        img = Image.fromarray(_lut("viridis")[(np.clip(t, 0, 1) * 255 + 0.5).astype(np.uint8)])
        scale = max(1, size // max(t.shape))
        img = img.resize((t.shape[1] * scale, t.shape[0] * scale), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out
