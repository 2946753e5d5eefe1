"""Helpers shared by the metrics: making a method's map (the only place metrics call methods),
rank correlation and SSIM between maps."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._scaling import minmax
from ..checks import choose
from ..models import Classifier
from ..results import Saliency

__all__ = ["MethodSpec", "make_map", "method_name", "spearman", "ssim"]

#: a method name (a CAM method or ``"occlusion"``) or ``f(clf, x, target) -> Saliency | (N, H, W) tensor``
MethodSpec = str | Callable[..., Any]


def method_name(method: MethodSpec) -> str:
    """How a method is named in results and tables."""
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
    """The (N, H, W) maps of ``method`` for ``target`` through the public functions
    (:func:`convlens.grad_cam`, :func:`convlens.occlusion`) or the caller's callable.
    ``options`` go to the method (occlusion's patch/stride, Score-CAM's batch size);
    ``quiet`` drops the "constant map" warnings (expected on randomised models)."""
    from ..methods.cam import CAM_METHODS, grad_cam
    from ..methods.occlusion import occlusion

    options = dict(options or {})
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", RuntimeWarning)
        if callable(method) and not isinstance(method, str):
            out = method(clf, x, target)
        elif method == "occlusion":
            out = occlusion(clf, x, target=target, **options)
        elif method in CAM_METHODS:
            cam_options = {k: v for k, v in options.items() if k in ("batch_size", "memory_mb")}
            out = grad_cam(clf, x, target=target, layer=layer, method=method, **cam_options)
        else:
            choose([method], (*CAM_METHODS, "occlusion"), "method")  # raises: no such method
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
    """Spearman rank correlation per image of two (N, H, W) maps (ties get average ranks). A
    constant map shares no ordering with a varying one: 0; two constant maps: NaN (nothing to
    compare). Returns (N,) float32 on ``a``'s device."""
    from scipy.stats import spearmanr

    out = []
    for u, v in zip(_np(a), _np(b)):
        u, v = u.ravel(), v.ravel()
        flat_u, flat_v = np.ptp(u) == 0, np.ptp(v) == 0
        if flat_u or flat_v:
            out.append(float("nan") if flat_u and flat_v else 0.0)
            continue
        out.append(float(spearmanr(u, v).statistic))
    return torch.tensor(out, dtype=torch.float32, device=a.device)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per image of two (N, H, W) maps, each min-max scaled to [0, 1] first (a constant map
    becomes zeros), with scikit-image's defaults (7x7 window, data range 1), as Adebayo et al."""
    from skimage.metrics import structural_similarity

    out = [float(structural_similarity(minmax(u), minmax(v), data_range=1.0)) for u, v in zip(_np(a), _np(b))]
    return torch.tensor(out, dtype=torch.float32, device=a.device)
