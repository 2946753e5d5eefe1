"""Matplotlib figures from results. Nothing here computes an explanation."""

from __future__ import annotations

from typing import Any, Literal

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ._scaling import minmax
from .display import figure_png

# The results are typed ``Any`` here: this module draws them and knows them by their fields only
# (``convlens.results`` imports it; importing ``convlens.results`` back would be a circle).

__all__ = [
    "ResultFigure", "normalize_map", "overlay", "plot_saliency", "plot_activations", "plot_feature_images",
    "plot_curves", "plot_sanity", "plot_class_sensitivity", "plot_comparison", "plot_trust",
]

Normalize = Literal["per_image", "none"]
NORMALIZE: tuple[Normalize, ...] = ("per_image", "none")
Layout = Literal["tiles", "rows"]
#: which channels an activation grid shows: the most active, the first k, or chosen indices
#: (one list for every layer, or a dict of lists per layer)
Channels = Literal["top", "first"] | list[int] | dict[str, list[int]]


class ResultFigure(Figure):
    """A matplotlib ``Figure`` that displays itself in Jupyter through ``_repr_png_``.

    What every ``.plot()`` returns (make new figures with it too): no backend, no pyplot, nothing
    registered globally, so it shows up in a fresh kernel as the last line of a cell, and it is
    shown once where ``%matplotlib inline`` is on (that backend's formatter for figures takes
    precedence over this method, and a figure pyplot does not know is never flushed by it).

    Example::

        fig = ResultFigure(figsize=(4, 3)); fig.subplots().plot([0, 1])
        fig  # the last line of a notebook cell: the picture
    """

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def normalize_map(m: np.ndarray, how: Normalize = "per_image") -> np.ndarray:
    """Scale a map for display. ``per_image``: to [0, 1] by its own min and max (a constant map
    becomes all zeros); ``none``: unchanged.

    Args:
        m: a map (H, W), any real dtype.
        how: ``"per_image"`` or ``"none"``.
    Returns:
        An array of ``m``'s shape and dtype (``m`` itself for ``"none"``).
    Raises:
        ValueError: another ``how``.
    """
    if how == "none":
        return m
    if how != "per_image":
        raise ValueError(f"normalize must be one of {NORMALIZE}")
    return minmax(m)


def overlay(
    rgb: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet", weight: np.ndarray | None = None
) -> np.ndarray:
    """Blend a [0, 1] heatmap, coloured with ``cmap`` (RGB order), over an RGB image in [0, 1]:
    ``(1 - a) * rgb + a * cmap(heat)`` with ``a = alpha * weight``.

    Args:
        rgb: (H, W, 3) float array in [0, 1].
        heat: (H, W) float array; clipped to [0, 1].
        alpha: the heatmap's opacity.
        cmap: a matplotlib colormap name.
        weight: (H, W) in [0, 1], scales the opacity per pixel, so that pixels that do not matter
            show the photo itself.
    Returns:
        (H, W, 3) float64 array in [0, 1].
    Raises:
        KeyError: an unknown colormap name (matplotlib's error).
    """
    colored = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    a = alpha if weight is None else alpha * np.clip(weight, 0, 1)[..., None]
    return np.clip((1 - a) * rgb + a * colored, 0, 1)


def plot_saliency(
    result: Any,  # a convlens.results.Saliency
    index: int = 0,
    *,
    normalize: Normalize = "per_image",
    alpha: float = 0.5,
    cmap: str | None = None,
) -> Figure:
    """Input | heatmap (with colorbar) | overlay for one image of a :class:`Saliency`.

    Occlusion maps are signed, so they use a diverging colormap centred on zero, also in the
    overlay, whose opacity there follows the size of the drop; CAM maps use ``jet``. The title
    names the method, the layer and the class.

    Args:
        result: a :class:`convlens.Saliency` (its maps on any device).
        index: the row to draw.
        normalize: the heatmap panel's scaling of a CAM map (:func:`normalize_map`); the overlay
            is always scaled per image, an occlusion map always centred on zero.
        alpha: the overlay's opacity.
        cmap: a matplotlib colormap (default ``jet``, ``RdBu_r`` for occlusion).
    Returns:
        A :class:`ResultFigure` with three panels.
    Raises:
        ValueError: another ``normalize``.
        IndexError: ``index`` out of range.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, not {normalize!r}")
    m = result.to_numpy()[index]
    rgb = result.rgb(index)
    signed = result.method == "occlusion"
    label = result.labels[index] if index < len(result.labels) else f"class {result.target[index]}"
    # a bare Figure, not pyplot: nothing global to close; it shows itself once in notebooks
    fig = ResultFigure(figsize=(12, 4.2))
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb)
    axes[0].set_title("input")
    if signed:
        vmax = float(np.abs(m).max()) or 1.0
        im = axes[1].imshow(m, cmap=cmap or "RdBu_r", vmin=-vmax, vmax=vmax)
        axes[1].set_title("drop in score (red: hiding it hurts)")
        # same colours as the heatmap; opacity follows |drop|, so windows that do not matter show the photo
        heat, weight, cmap = (m / vmax + 1) / 2, np.abs(m) / vmax, cmap or "RdBu_r"
    else:
        shown = normalize_map(m, normalize)
        im = axes[1].imshow(shown, cmap=cmap or "jet")
        axes[1].set_title(result.method + (" (normalised)" if normalize != "none" else ""))
        heat, weight, cmap = normalize_map(m, "per_image"), None, cmap or "jet"
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(overlay(rgb, heat, alpha=alpha, cmap=cmap, weight=weight))
    axes[2].set_title("overlay")
    for ax in axes:
        ax.axis("off")
    where = f" at {result.layer}" if result.layer else ""
    fig.suptitle(f"{result.method}{where}: {label}")
    # a fixed layout (saving trims the margins): tight_layout measured every text, 0.07 s a figure
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.25)
    return fig


def _channel_choice(result: Any, name: str, index: int, channels: object, k: int) -> list[int]:
    c = result.maps[name].shape[1]
    if channels == "top":
        return result.top_channels(name, k)[index].tolist()
    if channels == "first":
        return list(range(min(k, c)))
    chosen = channels.get(name, []) if isinstance(channels, dict) else channels
    if isinstance(chosen, str) or not all(isinstance(i, int) for i in chosen):
        raise ValueError('channels is "top", "first", a list of channel indices or a dict of them per layer')
    bad = [i for i in chosen if not 0 <= i < c]
    if bad:
        raise ValueError(f"channel {bad[0]} is out of range for {name!r}, which has {c} channels")
    return list(chosen)


def plot_activations(
    result: Any,  # a convlens.results.Activations
    index: int = 0,
    *,
    channels: Channels = "top",
    k: int = 8,
    cmap: str = "viridis",
    layout: Layout = "tiles",
) -> Figure:
    """Grid of channel maps for image ``index``: a row per layer (labelled with name and
    C x h x w), a column per channel (``"top"``: most active first, ``"first"``: 0..k-1, or
    chosen indices). Each tile has its own colour scale; its title gives the channel and its
    mean activation. ``layout="tiles"``: one Axes per tile; ``"rows"``: the same picture with one
    Axes per layer (its tiles coloured here and laid side by side), several times faster to draw.

    Args:
        result: a :class:`convlens.Activations` (its maps on any device).
        index: the image to draw.
        channels: ``"top"``, ``"first"``, a list of channel indices for every layer, or a dict
            layer -> list.
        k: channels per layer for ``"top"`` / ``"first"``.
        cmap: a matplotlib colormap name.
        layout: ``"tiles"`` or ``"rows"``.
    Returns:
        A :class:`ResultFigure`.
    Raises:
        ValueError: ``index`` out of range, another ``layout``, a bad ``channels`` or a channel
            out of range.
    """
    if not 0 <= index < result.images.shape[0]:
        raise ValueError(f"index {index} is out of range for {result.images.shape[0]} images")
    if layout not in ("tiles", "rows"):
        raise ValueError('layout is "tiles" or "rows"')
    picks = {n: _channel_choice(result, n, index, channels, k) for n in result.maps}
    cols = max(1, max(len(p) for p in picks.values()))
    rows = len(picks)
    fig = ResultFigure(figsize=(1.6 * cols + 1.2, 1.75 * rows + 0.6))
    how = {"top": f"{cols} most active channels", "first": f"first {cols} channels"}.get(
        channels if isinstance(channels, str) else "", "chosen channels"
    )
    if layout == "rows":
        _activation_rows(fig, result, index, picks, cols, cmap)
        fig.suptitle(f"Intermediate activations: {how} per layer")
        fig.tight_layout()
        return fig
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for r, (name, chans) in enumerate(picks.items()):
        m = result.maps[name][index].detach().float().cpu().numpy()
        for col in range(cols):
            ax = axes[r, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(chans):
                ax.axis("off")
                continue
            ch = chans[col]
            ax.imshow(m[ch], cmap=cmap)
            ax.set_title(f"ch {ch} ({m[ch].mean():.2g})", fontsize=9)
            if col == 0:
                c, h, w = m.shape
                ax.set_ylabel(f"{name}\n{c}x{h}x{w}", fontsize=10)
    fig.suptitle(f"Intermediate activations: {how} per layer")
    fig.tight_layout()
    return fig


def _activation_rows(
    fig: Figure, result: Any, index: int, picks: dict[str, list[int]], cols: int, cmap: str
) -> None:
    """One Axes per layer: the tiles, each min-max scaled on its own (as ``imshow`` would), coloured
    with ``cmap`` and laid side by side with a white gap; titles as text above each tile."""
    colormap = matplotlib.colormaps[cmap]
    for r, (name, chans) in enumerate(picks.items()):
        ax = fig.add_subplot(len(picks), 1, r + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        m = result.maps[name][index].detach().float().cpu().numpy()
        c, h, w = m.shape
        gap = max(1, round(0.12 * w))
        strip = np.ones((h, cols * w + (cols - 1) * gap, 3))
        for col, ch in enumerate(chans):
            x0 = col * (w + gap)
            strip[:, x0 : x0 + w] = colormap(normalize_map(m[ch]))[..., :3]
            ax.text(x0 + w / 2, 1.02, f"ch {ch} ({m[ch].mean():.2g})", ha="center", va="bottom", fontsize=9,
                    transform=ax.get_xaxis_transform())  # x in pixels of the strip, y above the axes
        ax.imshow(strip, interpolation="nearest" if w < 32 else "antialiased")
        ax.set_ylabel(f"{name}\n{c}x{h}x{w}", fontsize=10)


def plot_feature_images(result: Any, *, ncols: int | None = None) -> Figure:
    """A grid of feature-visualisation images, titled ``layer cN`` (or the class name) with the
    final objective; dead units are marked. Images are shown as they are (already in [0, 1]).

    Args:
        result: a :class:`convlens.FeatureImages`.
        ncols: images per row (default: up to 4).
    Returns:
        A :class:`ResultFigure`.
    """
    n = len(result.channels)
    ncols = max(1, min(ncols or min(n, 4), n))
    nrows = -(-n // ncols)
    fig = ResultFigure(figsize=(2.4 * ncols, 2.9 * nrows + 0.3))
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


# -- metrics ------------------------------------------------------------------------------
def plot_curves(curves: list, index: int = 0, *, title: str | None = None, ax: object | None = None) -> Figure:
    """Deletion / insertion curves of image ``index``: one line per curve (labelled with its
    method and AUC), the first one's area shaded. ``curves`` are
    :class:`convlens.metrics.results.PerturbationCurve`; with ``ax`` the lines go there.

    Args:
        curves: the curves (one kind or both), the first one shaded.
        index: the image to draw.
        title: the axes' title (default: the kinds and which way is better).
        ax: a matplotlib ``Axes`` to draw into (default: a new figure).
    Returns:
        The figure (``ax``'s figure when given).
    Raises:
        ValueError: no curves.
    """
    if not curves:
        raise ValueError("no curves to plot")
    own = ax is None
    fig = ResultFigure(figsize=(5.2, 3.8)) if own else ax.figure
    ax = fig.subplots() if own else ax
    for j, c in enumerate(curves):
        f = c.fractions.detach().float().cpu().numpy()
        s = c.scores[index].detach().float().cpu().numpy()
        dashed = c.method in ("random map", "centred Gaussian", "random")
        (line,) = ax.plot(f, s, "--" if dashed else "-", lw=1.6, label=f"{c.method}  AUC {float(c.auc[index]):.3f}")
        if j == 0:
            ax.fill_between(f, s, alpha=0.15, color=line.get_color())
    kinds = sorted({c.kind for c in curves})
    what = "removed" if kinds == ["deletion"] else "revealed" if kinds == ["insertion"] else "affected"
    ax.set_xlabel(f"fraction of pixels {what} (most salient first)")
    score = curves[0].settings.get("score", "probability")
    label = curves[0].labels[index] if index < len(curves[0].labels) else ""
    ax.set_ylabel(f"{score} of {label}" if label else score)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    better = {"deletion": "lower is better", "insertion": "higher is better"}
    ax.set_title(title or " / ".join(f"{k} ({better.get(k, '')})" for k in kinds), fontsize=10)
    if own:
        fig.tight_layout()
    return fig


def plot_sanity(result: object, index: int = 0) -> Figure:
    """Adebayo et al.'s cascading-randomisation figure for image ``index`` of a
    :class:`convlens.metrics.results.SanityCheck`: the input, the original map, then the map
    after each step (each normalised to [0, 1] on its own), with Spearman rho and SSIM.

    Returns:
        A :class:`ResultFigure`.
    """
    maps = result.maps[index].detach().float().cpu().numpy()
    rgb = result.images[index].detach().float().permute(1, 2, 0).cpu().numpy()
    cols = maps.shape[0] + 1
    fig = ResultFigure(figsize=(1.9 * cols, 2.5))
    axes = fig.subplots(1, cols)
    axes[0].imshow(rgb)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(normalize_map(maps[0]), cmap="jet", vmin=0, vmax=1)
    axes[1].set_title(f"original\n{result.method}", fontsize=8)
    for j, stage in enumerate(result.stages):
        ax = axes[j + 2]
        ax.imshow(normalize_map(maps[j + 1]), cmap="jet", vmin=0, vmax=1)
        rho, ssim = float(result.spearman[index, j]), float(result.ssim[index, j])
        ax.set_title(f"+ {stage}\nrho {rho:.2f}, SSIM {ssim:.2f}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    verdict = "passes" if result.passed[index] else "FAILS"
    fig.suptitle(
        f"{result.method} under cascading randomisation (output layer first): {verdict} "
        f"(rho after {result.stages[0]} {'<' if result.passed[index] else '>='} {result.threshold:g})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_class_sensitivity(result: object, index: int = 0) -> Figure:
    """The target's map beside the other class's map for image ``index`` of a
    :class:`convlens.metrics.results.ClassSensitivity` (each normalised on its own), with their
    rank correlation: a class-discriminative method draws two different maps.

    Returns:
        A :class:`ResultFigure`.
    """
    maps = result.maps[index].detach().float().cpu().numpy()
    fig = ResultFigure(figsize=(6.4, 3.4))
    axes = fig.subplots(1, 2)
    names = [result.labels[index] if result.labels else str(result.target[index]),
             result.other_labels[index] if result.other_labels else str(result.other[index])]
    for ax, m, name in zip(axes, maps, names):
        ax.imshow(normalize_map(m), cmap="jet", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    verdict = "class-discriminative" if result.discriminative[index] else "NOT class-discriminative"
    fig.suptitle(f"{result.method}: rho {float(result.spearman[index]):.2f} -> {verdict}", fontsize=9)
    fig.tight_layout()
    return fig


#: the PNG text key that carries a figure's smallest font in pixels at its saved size: a page shows the
#: figure at least as wide as makes that text :data:`MIN_TEXT_PX` (page.py, ``_img``)
FONT_KEY = "convlens-min-font-px"
MIN_TEXT_PX = 10.0


def min_font_px(fig: Figure, dpi: float) -> float:
    """The smallest visible text of ``fig`` in pixels when saved at ``dpi``: points x dpi / 72."""
    from matplotlib.text import Text

    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return (min(sizes) if sizes else 10.0) * dpi / 72


def figure_bytes(fig: Figure, dpi: float, **kwargs: Any) -> bytes:
    """``fig`` as PNG bytes (``bbox_inches="tight"``) with its smallest font size in pixels in the
    PNG's text (:data:`FONT_KEY`), so a page can keep that text readable."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={FONT_KEY: f"{min_font_px(fig, dpi):.2f}"},
                **kwargs)
    return buf.getvalue()


def map_thumbnail(image: Any, heat: Any) -> np.ndarray:
    """A small overlay for tables: ``heat`` (h, w) normalised per image, coloured ``jet`` over the
    RGB ``image`` (3, h, w) in [0, 1]; (h, w, 3) uint8."""
    rgb = np.asarray(image.detach().float().cpu() if hasattr(image, "detach") else image).transpose(1, 2, 0)
    m = np.asarray(heat.detach().float().cpu() if hasattr(heat, "detach") else heat)
    return (np.clip(overlay(np.clip(rgb, 0, 1), normalize_map(m)), 0, 1) * 255 + 0.5).astype(np.uint8)


def plot_comparison(comparison: object) -> Figure:
    """A row of map thumbnails per method (the first images of a
    :class:`convlens.metrics.compare.Comparison`, each method's verdict beside it), then its
    deletion (left) and insertion (right) curves averaged over the images; reference rows dashed
    grey, the AUC (mean over images) in each legend entry.

    Returns:
        A :class:`ResultFigure`.
    """
    thumbs = getattr(comparison, "thumbnails", {}) or {}
    methods = [r.method for r in comparison.rows if not r.reference and r.method in thumbs]
    k = 0 if "image" not in thumbs else int(thumbs["image"].shape[0])
    levels = {m: v["level"] for m, v in comparison.verdicts().items()} if methods else {}
    top = 1.15 * (len(methods) + 1) if k else 0.0
    fig = ResultFigure(figsize=(11, 4.2 + top))
    grid = fig.add_gridspec(2, 1, height_ratios=[max(top, 0.01), 4.2]) if k else None
    if k:
        slots = max(k, 5)  # one image's thumbnails sit beside their labels, not across the whole width
        sub = grid[0].subgridspec(len(methods) + 1, slots + 1, width_ratios=[1.6] + [1] * slots, hspace=0.08,
                                  wspace=0.04)
        for j, name in enumerate(["image", *methods]):
            label = fig.add_subplot(sub[j, 0])
            label.axis("off")
            text = name if name == "image" else f"{name}\n{levels.get(name, '')}"
            label.text(1, 0.5, text, ha="right", va="center", fontsize=10,
                       color="#b42318" if levels.get(name) == "do not trust" else "black")
            for i in range(k):
                ax = fig.add_subplot(sub[j, i + 1])
                ax.axis("off")
                img = thumbs["image"][i]
                shown = img.permute(1, 2, 0).clamp(0, 1).numpy() if name == "image" else map_thumbnail(
                    img, thumbs[name][i])
                ax.imshow(shown)
                if j == 0 and i < len(comparison.images):
                    ax.set_title(str(comparison.images[i])[:18], fontsize=9)
        curves = grid[1].subgridspec(1, 2)
        axes = [fig.add_subplot(curves[0, 0]), fig.add_subplot(curves[0, 1])]
    else:
        axes = fig.subplots(1, 2)
    rows = [r for r in comparison.rows if not r.error]
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for r in rows:
            c = getattr(r, kind)
            f = c.fractions.detach().float().cpu().numpy()
            s = c.scores.detach().float().mean(0).cpu().numpy()
            style = {"ls": "--", "color": "0.45" if r.method.startswith("random") else "0.7"} if r.reference else {}
            ax.plot(f, s, lw=1.5, label=f"{r.method}  {float(c.auc.mean()):.3f}", **style)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        what = "removed" if kind == "deletion" else "revealed"
        ax.set_xlabel(f"fraction of pixels {what}, most salient first", fontsize=10)
        ax.set_ylabel("probability of the target class", fontsize=10)
        better = "lower" if kind == "deletion" else "higher"
        ax.set_title(f"{kind} (AUC, {better} is better)", fontsize=11)
        ax.legend(fontsize=9)
    n = len(comparison.images)
    fig.suptitle(f"{comparison.model}: {n} image{'s' if n != 1 else ''}" + (" (mean curves)" if n > 1 else ""),
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot_trust(result: object) -> Figure:
    """The report's trust figure: deletion (left) and insertion (right) curves of each map of a
    :class:`convlens.metrics.results.TrustSummary` beside the references' (dashed: random maps at
    each map's grid, the centred Gaussian).

    Returns:
        A :class:`ResultFigure`.
    """
    fig = ResultFigure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for j, ax in enumerate(axes):
        curves = [pair[j] for pair in result.curves.values()]
        for name, c in zip(result.curves, curves):
            f = c.fractions.detach().float().cpu().numpy()
            s = c.scores[0].detach().float().cpu().numpy()
            ref = name.startswith("random") or name == "centred Gaussian"
            style = {"ls": "--", "color": "0.45" if name.startswith("random") else "0.7"} if ref else {}
            ax.plot(f, s, lw=1.6, label=f"{name}  AUC {float(c.auc[0]):.3f}", **style)
        kind = curves[0].kind
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        what = "removed" if kind == "deletion" else "revealed"
        ax.set_xlabel(f"fraction of pixels {what}, most salient first")
        ax.set_ylabel("probability of " + (result.labels[0] if result.labels else "the target"))
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} AUC is better)", fontsize=10)
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.14, top=0.92, wspace=0.2)  # as plot_saliency's
    return fig
