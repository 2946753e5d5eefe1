"""Matplotlib figures from results. Nothing here computes an explanation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from .results import Saliency

__all__ = ["normalize_map", "overlay", "plot_saliency"]

NORMALIZE = ("per_image", "none")


def normalize_map(m: np.ndarray, how: str = "per_image") -> np.ndarray:
    """Scale a map for display. ``per_image``: to [0, 1] by its own min and max (a constant map
    becomes all zeros); ``none``: unchanged."""
    if how == "none":
        return m
    if how != "per_image":
        raise ValueError(f"normalize must be one of {NORMALIZE}")
    lo, hi = float(np.min(m)), float(np.max(m))
    return np.zeros_like(m) if hi - lo <= 0 else (m - lo) / (hi - lo)


def overlay(rgb: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heatmap, coloured with ``cmap`` (RGB order), over an RGB image in [0, 1]."""
    colored = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    return np.clip((1 - alpha) * rgb + alpha * colored, 0, 1)


def plot_saliency(
    result: Saliency,
    index: int = 0,
    *,
    normalize: str = "per_image",
    alpha: float = 0.5,
    cmap: str | None = None,
) -> Figure:
    """Input | heatmap (with colorbar) | overlay for one image of a :class:`Saliency`.

    Occlusion maps are signed, so they use a diverging colormap centred on zero; CAM maps use
    ``jet``. The title names the method, the layer and the class.
    """
    m = result.to_numpy()[index]
    rgb = result.rgb(index)
    signed = result.method == "occlusion"
    label = result.labels[index] if index < len(result.labels) else f"class {result.target[index]}"
    # a bare Figure, not pyplot: nothing global to close, shown once in notebooks
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb)
    axes[0].set_title("input")
    if signed:
        vmax = float(np.abs(m).max()) or 1.0
        im = axes[1].imshow(m, cmap=cmap or "RdBu_r", vmin=-vmax, vmax=vmax)
        axes[1].set_title("drop in score (red: hiding it hurts)")
        heat = normalize_map(np.clip(m, 0, None), "per_image")
    else:
        shown = normalize_map(m, normalize)
        im = axes[1].imshow(shown, cmap=cmap or "jet")
        axes[1].set_title(result.method + (" (normalised)" if normalize != "none" else ""))
        heat = normalize_map(m, "per_image")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(overlay(rgb, heat, alpha=alpha, cmap=cmap or "jet"))
    axes[2].set_title("overlay")
    for ax in axes:
        ax.axis("off")
    where = f" at {result.layer}" if result.layer else ""
    fig.suptitle(f"{result.method}{where}: {label}")
    fig.tight_layout()
    return fig


__all__ += ["plot_feature_images"]

if TYPE_CHECKING:
    from .results import FeatureImages


def plot_feature_images(result: FeatureImages, *, ncols: int | None = None) -> Figure:
    """A grid of feature-visualisation images, titled ``layer cN`` (or the class name) with the
    final objective; dead units are marked. Images are shown as they are (already in [0, 1])."""
    n = len(result.channels)
    ncols = max(1, min(ncols or min(n, 4), n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(2.4 * ncols, 2.9 * nrows + 0.3))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(result.rgb(i), interpolation="nearest")
        label = result.labels[i] if i < len(result.labels) else f"{result.layer} {result.channels[i]}"
        note = "  DEAD" if result.dead and result.dead[i] else ""
        ax.set_title(f"{label}{note}\n{result.kind} = {float(result.objective[i]):.3g}", fontsize=8)
    fig.suptitle(f"feature visualisation: {result.layer} ({result.settings.get('param', '')})", fontsize=10)
    fig.tight_layout()
    return fig
