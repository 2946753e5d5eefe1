"""What replaces hidden pixels: the one baseline rule shared by occlusion and the deletion /
insertion metrics (a number, the image's channel means, a Gaussian blur, or a tensor)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BASELINES", "Baseline", "BaselineName", "gaussian_blur", "make_baseline", "describe_baseline"]

BaselineName = Literal["mean", "blur"]
BASELINES: tuple[BaselineName, ...] = ("mean", "blur")
#: what replaces hidden pixels: a number in the model's normalised input space, a name, or a tensor
Baseline = float | BaselineName | Tensor


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a batch with replicated borders (kernel radius ``ceil(3 sigma)``,
    cut to the image size).

    Args:
        x: (N, C, H, W) floating tensor, any device.
        sigma: the standard deviation in pixels (> 0).
    Returns:
        (N, C, H, W) tensor on ``x``'s device, in its dtype.
    """
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = x
    for dim, kernel in ((2, k.view(1, 1, -1, 1)), (3, k.view(1, 1, 1, -1))):
        size = out.shape[dim]
        r = min(radius, size - 1)
        kern = kernel.narrow(dim, radius - r, 2 * r + 1)
        kern = kern / kern.sum()
        pad = (0, 0, r, r) if dim == 2 else (r, r, 0, 0)
        out = F.conv2d(F.pad(out, pad, mode="replicate"), kern.expand(c, 1, *kern.shape[2:]), groups=c)
    return out


#: a numeric baseline larger than this is no colour in a normalised input (|x| is a few units)
MAX_BASELINE = 100.0


def make_baseline(baseline: Baseline, x: Tensor, *, sigma: float) -> Tensor:
    """The replacement values for ``x``, broadcastable to it.

    Args:
        baseline: a number in the model's normalised input space (0 is the mean colour, at most
            ``MAX_BASELINE`` in size), ``"mean"`` (each image's channel means), ``"blur"``
            (:func:`gaussian_blur` with ``sigma`` pixels) or a finite tensor broadcastable to ``x``.
        x: (N, C, H, W) model input, any device and floating dtype.
        sigma: the blur's standard deviation in pixels (used by ``"blur"`` only).
    Returns:
        A tensor on ``x``'s device in its dtype: (1, 1, 1, 1) for a number, (N, C, 1, 1) for
        ``"mean"``, (N, C, H, W) for ``"blur"`` and a tensor.
    Raises:
        ValueError: a bool, a non-finite or too large number, another name, a tensor that does
            not broadcast to ``x`` or holds NaN/inf, or any other type.

    Example::

        base = make_baseline("blur", x, sigma=10.0)   # (N, C, H, W)
    """
    if isinstance(baseline, bool):
        raise ValueError("baseline must be a number, 'mean', 'blur' or a tensor, not a bool")
    if isinstance(baseline, (int, float)):
        if not math.isfinite(baseline) or abs(baseline) > MAX_BASELINE:
            raise ValueError(
                f"baseline {baseline:g} is not a colour: a finite number in the model's normalised space, at "
                f"most {MAX_BASELINE:g} in size (0 is the mean colour)"
            )
        return torch.full((1, 1, 1, 1), float(baseline), device=x.device, dtype=x.dtype)
    if isinstance(baseline, str):
        if baseline == "mean":
            return x.mean(dim=(2, 3), keepdim=True)
        if baseline == "blur":
            if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
                raise ValueError(f"blur_sigma must be a positive number of pixels, not {sigma!r}")
            return gaussian_blur(x, sigma)
        raise ValueError(f"baseline must be a number, one of {BASELINES} or a tensor, not {baseline!r}")
    if isinstance(baseline, Tensor):
        b = baseline.to(x.device, x.dtype)
        try:
            torch.broadcast_shapes(b.shape, x.shape)
            b = b.expand_as(x) if b.dim() <= 4 else None
        except RuntimeError:
            b = None
        if b is None:
            raise ValueError(
                f"a baseline tensor must broadcast to the input {tuple(x.shape)}, got {tuple(baseline.shape)}"
            )
        if not torch.isfinite(b).all():
            raise ValueError("the baseline tensor has non-finite values")
        return b
    raise ValueError(f"baseline must be a number, 'mean', 'blur' or a tensor, not {type(baseline).__name__}")


def describe_baseline(baseline: Baseline) -> Any:
    """How a baseline is recorded in a result's settings: the number or name, else ``"tensor"``."""
    return baseline if isinstance(baseline, (int, float, str)) else "tensor"
