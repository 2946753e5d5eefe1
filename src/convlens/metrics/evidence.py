"""What the numbers of :mod:`.compare` and the report's trust section are worth: fair references
(a random map at the map's own resolution, resized to the input the way the map is), paired
bootstrap intervals over images, the noise margin on one image, Grad-CAM and occlusion at a
common grid, and the verdict in words ("trust", "weak", "do not trust").

Why the reference is drawn at the map's resolution: a per-pixel random map, blurred pixel by
pixel, destroys texture everywhere and removes the evidence faster than any coarse map can (on the
bundled photo its deletion AUC was 0.212 against Grad-CAM's 0.303). A random 7 x 7 map upsampled
like Grad-CAM's removes blobs, as Grad-CAM does: the comparison is between orderings of the same
kind, so only the ordering is judged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..results import Saliency

__all__ = ["Level", "LEVELS", "REFERENCE_DRAWS", "RESAMPLES", "MIN_IMAGES", "grid_of", "grid_name", "random_like",
           "upsample", "paired_bootstrap", "noise_margin", "common_grid", "agreement", "interval", "verdict",
           "LOW_AGREEMENT", "CHANCE_AGREEMENT"]

Level = Literal["trust", "weak", "do not trust"]
LEVELS: tuple[Level, ...] = ("trust", "weak", "do not trust")
#: random maps drawn per grid; their spread (standard deviation of insertion - deletion) is the
#: noise of the metric on one image
REFERENCE_DRAWS = 8
#: paired bootstrap resamples over the images (seeded)
RESAMPLES = 2000
#: the margin on one image: this many standard deviations of the random draws' insertion - deletion
MARGIN_SD = 2.0
#: intervals over images from this many on (a bootstrap of 2 to 4 images is too narrow to trust);
#: with fewer, the noise margin decides
MIN_IMAGES = 5
#: Grad-CAM and occlusion at their common grid with a Spearman correlation below this are marked
#: "disagree": the median correlation of the two maps of *different* photos (pairs that share
#: nothing but photo framing and a centre bias), measured on 12 natural photos with the default model
#: (120 mismatched pairs, README "How far to trust the maps"): below it, the maps of one photo agree
#: less than unrelated maps usually do
LOW_AGREEMENT = -0.1
#: above this the two maps agree more than 95% of the mismatched pairs do: real agreement
CHANCE_AGREEMENT = 0.49


def grid_of(sal: Saliency | None, size: tuple[int, int]) -> tuple[str, tuple[int, int], dict[str, Any]]:
    """How a method's map reaches the input: ``("bilinear", (h, w), {})`` for a CAM at its layer's
    grid, ``("windows", (rows, cols), {"starts": ..., "patch": ...})`` for occlusion, ``("pixels",
    size, {})`` for a map already at the input size (or a bare tensor)."""
    if sal is None or sal.raw.dim() != 3:
        return "pixels", tuple(size), {}
    grid = tuple(int(v) for v in sal.raw.shape[-2:])
    if sal.method == "occlusion" and "starts" in sal.settings:
        return "windows", grid, {"starts": [list(s) for s in sal.settings["starts"]],
                                 "patch": list(sal.settings["patch"])}
    if grid == tuple(size):
        return "pixels", grid, {}
    return "bilinear", grid, {}


def grid_name(kind: str, grid: tuple[int, int]) -> str:
    """The reference row's name: ``"random 7x7 map"``, ``"random 7x7 windows"``, ``"random pixels"``."""
    if kind == "pixels":
        return "random pixels"
    return f"random {grid[0]}x{grid[1]} {'windows' if kind == 'windows' else 'map'}"


def _coverage(size: int, patch: int, starts: Sequence[int]) -> Tensor:
    pix = torch.arange(size, device="cpu")[:, None]
    s = torch.tensor(list(starts), device="cpu")[None, :]
    return ((pix >= s) & (pix < s + patch)).double()


def upsample(raw: Tensor, kind: str, size: tuple[int, int], options: dict[str, Any]) -> Tensor:
    """``raw`` (D, h, w) on a method's grid to the input ``size`` as the method does it: bilinear
    (``align_corners=False``) for a CAM, the mean over the windows covering each pixel for
    occlusion, nothing for ``"pixels"``."""
    if kind == "pixels":
        return raw
    if kind == "windows":
        ay = _coverage(size[0], options["patch"][0], options["starts"][0])
        ax = _coverage(size[1], options["patch"][1], options["starts"][1])
        sums = ay @ raw.double() @ ax.T
        return (sums / (ay.sum(1)[:, None] * ax.sum(1)[None, :])).float()
    return F.interpolate(raw[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def random_like(kind: str, grid: tuple[int, int], size: tuple[int, int], options: dict[str, Any], *,
                draws: int = REFERENCE_DRAWS, seed: int = 0) -> Tensor:
    """``draws`` random maps (uniform in [0, 1), seeded, drawn on the CPU) on ``grid``, resized to
    ``size`` as the method's map is (:func:`upsample`): (draws, H, W) float32 on the CPU, the same
    for every image.

    Example::

        random_like("bilinear", (7, 7), (224, 224), {}, draws=8)   # 8 random Grad-CAM-like maps
    """
    g = torch.Generator().manual_seed(seed)
    return upsample(torch.rand(draws, *grid, generator=g, device="cpu"), kind, size, options)


def paired_bootstrap(a: Sequence[float], b: Sequence[float] | None = None, *, resamples: int = RESAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` (or of ``a``) over the images and its 95% percentile interval from a paired
    bootstrap: ``resamples`` draws of the images with replacement (seeded), the same draw for
    ``a`` and ``b``. One image gives ``(value, nan, nan)``.

    Example::

        paired_bootstrap([0.3, 0.4, 0.35], [0.2, 0.25, 0.3])   # (0.1, low, high)
    """
    d = np.asarray(a, dtype=np.float64) - (0.0 if b is None else np.asarray(b, dtype=np.float64))
    if d.size < 2:
        return (float(d.mean()) if d.size else math.nan), math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def noise_margin(draw_scores: Tensor) -> float:
    """The margin on one image: ``MARGIN_SD`` standard deviations (n - 1) of the random draws'
    insertion - deletion on it (``draw_scores`` (draws,)): two maps of equal worth differ by this
    much by chance."""
    return MARGIN_SD * float(draw_scores.double().std()) if draw_scores.numel() > 1 else 0.0


def common_grid(a: Saliency, b: Saliency) -> tuple[int, int]:
    """The coarser of two maps' grids (fewer cells), e.g. Grad-CAM's 7 x 7 against occlusion's
    11 x 11 windows."""
    ga, gb = tuple(a.raw.shape[-2:]), tuple(b.raw.shape[-2:])
    return ga if ga[0] * ga[1] <= gb[0] * gb[1] else gb


def agreement(a: Saliency, b: Saliency, index: int = 0) -> tuple[float | None, tuple[int, int]]:
    """Spearman correlation of two maps of image ``index`` at their common grid: both input-size
    maps area-averaged (``adaptive_avg_pool2d``) to :func:`common_grid` (the grid too, as
    ``(rho, (h, w))``). None when either is constant there."""
    grid = common_grid(a, b)
    pa = F.adaptive_avg_pool2d(a.maps[index : index + 1, None].float().cpu(), grid)[0, 0]
    pb = F.adaptive_avg_pool2d(b.maps[index : index + 1, None].float().cpu(), grid)[0, 0]
    return map_spearman(pa.numpy(), pb.numpy()), grid


def map_spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two maps of the same shape, pixel by pixel (the Pearson
    correlation of their average ranks; :func:`convlens.metrics._common.rank_correlation`), as a
    number shown to people: None when a map is constant (it orders nothing) or not finite.

    Example::

        map_spearman(cam.to_numpy()[0], occ.to_numpy()[0])   # 1.0: same ordering of pixels
    """
    from ._common import rank_correlation

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return rank_correlation(a, b)


def interval(d: float, lo: float, hi: float, margin: float | None) -> dict[str, Any]:
    """A difference with its 95% interval (several images) or its noise margin (one image), and
    whether it is real: the interval excludes 0, or on one image it exceeds the margin."""
    if math.isfinite(lo):
        return {"difference": d, "low": lo, "high": hi, "real": lo > 0 or hi < 0}
    m = margin or 0.0
    return {"difference": d, "margin": m, "real": abs(d) > m}


def format_interval(v: dict[str, Any], digits: int = 3) -> str:
    """``+0.120 [+0.050, +0.190]`` or ``+0.120 (margin 0.060)``."""
    if "low" in v:
        return f"{v['difference']:+.{digits}f} [{v['low']:+.{digits}f}, {v['high']:+.{digits}f}]"
    return f"{v['difference']:+.{digits}f} (margin {v['margin']:.{digits}f})"


def verdict(*, images: int, versus: dict[str, dict[str, Any]], sanity_passed: float | None = None,
            sanity_rho: float | None = None, class_rho: float | None = None, margin: float = 0.0,
            error: str | None = None, class_threshold: float = 0.5, sanity_threshold: float = 0.5) -> dict[str, Any]:
    """One method's verdict, ``{"level": ..., "reasons": [...]}`` (short sentences).

    "do not trust": ``error``, or it fails the sanity check on most images (``sanity_passed``, the
    share passing, below 0.5), or it is not class-discriminative (mean ``class_rho`` at least
    ``class_threshold``). "weak": for a reference of ``versus`` (name -> :func:`interval`), its
    insertion - deletion is not really above the reference's. "trust" otherwise. On one image a
    last reason says that one image cannot rank methods closer than ``margin``.
    """
    if error:
        return {"level": "do not trust", "reasons": [f"It failed: {error}"]}
    bad, notes = [], []
    if sanity_passed is not None and sanity_passed < 1:
        where = "" if images == 1 else f" on {round((1 - sanity_passed) * images)} of {images} images"
        (bad if sanity_passed < 0.5 else notes).append(
            f"It fails the sanity check{where}: its map hardly changes when the classifier is re-initialised "
            f"(rank correlation {sanity_rho:.2f}, threshold {sanity_threshold:g}), so it shows where the layer is "
            "active, not why the model chose the class.")
    if class_rho is not None and math.isfinite(class_rho) and class_rho >= class_threshold:
        bad.append(f"It is not class-discriminative: its maps for the target and for the least likely class have "
                   f"rank correlation {class_rho:.2f} (threshold {class_threshold:g}).")
    if bad:
        return {"level": "do not trust", "reasons": bad}
    weak, good = [], []
    for ref, v in versus.items():
        if ref == "best":
            continue
        if v["real"] and v["difference"] > 0:
            good.append(f"{ref} {format_interval(v)}")
        elif ref == "centred Gaussian":
            weak.append(f"It does not beat the centred Gaussian by more than the noise (insertion - deletion "
                        f"{format_interval(v)}): on {'this image' if images == 1 else 'these images'} the metrics "
                        "cannot separate it from a map that only says the object is in the middle.")
        else:
            weak.append(f"It does not beat the {ref} by more than the noise (insertion - deletion "
                        f"{format_interval(v)}): its ordering of the pixels is no better than chance.")
    if weak:
        out = {"level": "weak", "reasons": weak + notes}
    else:
        checks = [] if sanity_passed is None else ["passes the sanity check"]
        checks += [] if class_rho is None else ["is class-discriminative"]
        lead = f"It {' and '.join(checks)}, and beats" if checks else "It beats"
        out = {"level": "trust", "reasons": [f"{lead} every reference in insertion - deletion (" + "; ".join(good)
                                             + ")."] + notes}
    if images < MIN_IMAGES:
        few = "One image" if images == 1 else f"{images} images"
        out["reasons"].append(f"{few} cannot rank methods closer than the noise margin ({margin:.3f}): compare "
                              f"{MIN_IMAGES} or more photos for intervals.")
    return out
