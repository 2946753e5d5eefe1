"""Min-max scaling to [0, 1], the one rule every display and metric uses (NumPy or torch)."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["minmax"]

A = TypeVar("A", np.ndarray, torch.Tensor)


def minmax(a: A, dims: int | tuple[int, ...] | None = None) -> A:
    """Scale ``a`` to [0, 1] by its minimum and maximum over ``dims`` (all of it when ``None``).

    Args:
        a: a NumPy array or a torch tensor (any shape, dtype and device; a tensor stays where it is).
        dims: the axes the minimum and maximum are taken over, e.g. ``(1, 2, 3)`` for one scale per
            image of an (N, C, H, W) batch.
    Returns:
        An array or tensor of ``a``'s type and shape; where the maximum equals the minimum (a
        constant slice) the result is zeros there, never NaN.
    """
    if isinstance(a, torch.Tensor):
        d = tuple(range(a.ndim)) if dims is None else dims
        lo, hi = a.amin(dim=d, keepdim=True), a.amax(dim=d, keepdim=True)
        span = hi - lo
        return torch.where(span > 0, (a - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(a))
    lo, hi = np.min(a, axis=dims, keepdims=True), np.max(a, axis=dims, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (a - lo) / np.where(span > 0, span, 1), 0).astype(a.dtype, copy=False)
