"""Helpers shared by the metrics: making a method's map (the only place metrics call methods),
rank correlation and SSIM between maps."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._scaling import minmax
from ..checks import choose
from ..methods.cam import CamMethod
from ..models import Classifier
from ..results import Saliency

__all__ = ["MapMethod", "MethodSpec", "make_map", "method_name", "spearman", "ssim"]

#: a method the metrics make maps with by name: a CAM method or occlusion
MapMethod = CamMethod | Literal["occlusion"]
#: a method name or ``f(clf, x, target) -> Saliency | (N, H, W) tensor``
MethodSpec = MapMethod | Callable[..., Any]


def method_name(method: MethodSpec) -> str:
    """How a method is named in results and tables: the name, or a callable's ``__name__``
    (``"custom"`` without one)."""
    return method if isinstance(method, str) else getattr(method, "__name__", "custom")


def make_map(
    clf: Classifier,
    x: Tensor,
    method: MethodSpec,
    target: Any,
    *,
    layer: str | None = None,
    options: dict[str, Any] | None = None,
    quiet: bool = False,
) -> tuple[Tensor, Saliency | None]:
    """The maps of ``method`` for ``target`` through the public functions
    (:func:`convlens.grad_cam`, :func:`convlens.occlusion`) or the caller's callable.

    Args:
        clf: the classifier (left as it was).
        x: (N, C, H, W) model-ready batch on the model's device.
        method: a CAM method name, ``"occlusion"`` or ``f(clf, x, target) -> Saliency | tensor``.
        target: what to explain, as :func:`convlens.grad_cam` takes it (one class per image here).
        layer: the CAM layer (default: the automatic one).
        options: passed to the method (occlusion's ``patch``/``stride``, Score-CAM's
            ``batch_size``/``memory_mb``).
        quiet: drop the "constant map" warnings (expected on randomised models).
    Returns:
        ``(maps, saliency)``: (N, H, W) float32 maps on ``x``'s device, and the method's
        :class:`Saliency` (None when a callable returned a tensor).
    Raises:
        ValueError: an unknown method name, or a callable returning something other than a
            Saliency or one (H, W) map per image; and whatever the method raises.
    """
    from ..methods.cam import grad_cam
    from ..methods.occlusion import occlusion
    from ..methods.registry import cam_methods, map_methods

    options = dict(options or {})
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", RuntimeWarning)
        if callable(method) and not isinstance(method, str):
            out = method(clf, x, target)
        elif method == "occlusion":
            out = occlusion(clf, x, target=target, **options)
        elif method in cam_methods():
            cam_options = {k: v for k, v in options.items() if k in ("batch_size", "memory_mb")}
            out = grad_cam(clf, x, target=target, layer=layer, method=method, **cam_options)
        else:
            choose([method], map_methods(), "method")  # raises: no such method
    if isinstance(out, Saliency):
        return out.maps.float(), out
    if isinstance(out, Tensor):
        maps = out[None] if out.dim() == 2 else out
        if maps.dim() != 3 or maps.shape[0] != x.shape[0]:
            raise ValueError(f"a method must return one (H, W) map per image, got shape {tuple(out.shape)}")
        return maps.detach().to(x.device, torch.float32), None
    raise ValueError(f"a method must return a Saliency or a tensor, not {type(out).__name__}")


def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per image of two maps (ties get average ranks, as
    ``scipy.stats.spearmanr``). A constant map shares no ordering with a varying one: 0; two
    constant maps: NaN (nothing to compare).

    Args:
        a: (N, H, W) maps, any device and real dtype.
        b: (N, H, W) maps of the same shape, any device.
    Returns:
        (N,) float32 on ``a``'s device.
    """
    out = [rank_correlation(u, v) for u, v in zip(_np(a), _np(b))]
    return torch.tensor(out, dtype=torch.float32, device=a.device)


def rank_correlation(u: np.ndarray, v: np.ndarray) -> float:
    """The one Spearman computation of convlens: the Pearson correlation of the flattened arrays'
    average ranks (ties share the mean of their ranks), float64, the number ``scipy.stats.spearmanr``
    gives (to float64 rounding; tested), with the rule for constant maps: a constant map shares no
    ordering with a varying one, 0 (so a map that collapses under re-initialisation counts as
    changed); two constant maps, NaN. Where a correlation is reported to people rather than judged
    (:func:`convlens.metrics.evidence.map_spearman`), a constant map gives None. Written with numpy,
    not scipy: importing ``scipy.stats`` cost 0.8 s of every ``convlens gradcam``'s evidence."""
    u, v = np.asarray(u, dtype=np.float64).ravel(), np.asarray(v, dtype=np.float64).ravel()
    flat_u, flat_v = np.ptp(u) == 0, np.ptp(v) == 0
    if flat_u or flat_v:
        return float("nan") if flat_u and flat_v else 0.0
    ru, rv = average_ranks(u), average_ranks(v)
    ru -= ru.mean()
    rv -= rv.mean()
    rho = float(np.dot(ru, rv) / np.sqrt(np.dot(ru, ru) * np.dot(rv, rv)))
    return max(-1.0, min(1.0, rho))


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the 1-D array ``a``, tied values sharing their mean rank (float64), as
    ``scipy.stats.rankdata(a, method="average")``."""
    order = np.argsort(a, kind="stable")
    ordered = a[order]
    new = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group = np.cumsum(new) - 1
    bounds = np.flatnonzero(np.concatenate([new, [True]]))  # start of each run of ties, and n
    mean_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0  # ranks start..end-1, one-based: (start+1 + end) / 2
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per image of two maps, each min-max scaled to [0, 1] first (a constant map becomes
    zeros), with scikit-image's defaults (7x7 window, data range 1), as Adebayo et al.

    Args:
        a: (N, H, W) maps, H and W at least 7, any device and real dtype.
        b: (N, H, W) maps of the same shape, any device.
    Returns:
        (N,) float32 on ``a``'s device.
    Raises:
        ValueError: from scikit-image, for maps smaller than its 7x7 window.
    """
    from skimage.metrics import structural_similarity

    out = [float(structural_similarity(minmax(u), minmax(v), data_range=1.0)) for u, v in zip(_np(a), _np(b))]
    return torch.tensor(out, dtype=torch.float32, device=a.device)
