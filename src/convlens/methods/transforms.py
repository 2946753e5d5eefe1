"""The robustness transforms of feature visualisation (lucid's): padding, jitter, random scale and
rotation, and :func:`standard_transforms`, their usual chain. Each draws its randomness from the
generator it is given, or from one generator per image. Importable from
:mod:`convlens.methods.featureviz` too, as before the split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: A transform maps an image batch (N, 3, H, W) and a random generator to a new batch. The
#: built-in ones also take a list of N generators, one per image, and then draw each image's
#: randomness from its own generator (so an image does not depend on the rest of the batch).
Transform = Callable[[Tensor, "torch.Generator | Sequence[torch.Generator]"], Tensor]


# -- robustness transforms ------------------------------------------------------------------
def _draws(rng: torch.Generator | Sequence[torch.Generator], n: int, sample: Callable[[int, torch.Generator], Tensor]
           ) -> Tensor:
    """``n`` random draws along dim 0: all from one generator, or one per image from a list of n."""
    if isinstance(rng, torch.Generator):
        return sample(n, rng)
    gens = list(rng)
    if len(gens) != n:
        raise ValueError(f"{len(gens)} generators for a batch of {n} images")
    return torch.cat([sample(1, g) for g in gens])


def _choice(rng: torch.Generator | Sequence[torch.Generator], n: int, k: int) -> Tensor:
    """``n`` indices uniform in ``0..k-1``, drawn on the host (as the generators are)."""
    return _draws(rng, n, lambda m, g: torch.randint(0, k, (m,), generator=g, device="cpu"))


def _per_image(fn: Transform) -> Transform:
    fn.per_image = True  # type: ignore[attr-defined]  # takes a list of generators, one per image
    return fn


def pad(width: int, mode: str = "reflect", value: float = 0.5) -> Transform:
    """Pad every side by ``width`` pixels (``reflect``, ``replicate`` or ``constant`` ``value``)."""
    if width < 0:
        raise ValueError("pad width must be >= 0")

    def _pad(x: Tensor, rng: torch.Generator) -> Tensor:
        if mode == "constant":
            return F.pad(x, [width] * 4, mode="constant", value=value)
        return F.pad(x, [width] * 4, mode=mode)

    return _per_image(_pad)


def jitter(d: int) -> Transform:
    """Random crop, per image, that drops ``d`` rows and ``d`` columns: output (H - d, W - d),
    offsets ``dy, dx`` uniform in 0..d, drawn as one (N, 2) integer tensor (dy, dx) from ``rng``."""
    if d < 0:
        raise ValueError("jitter must be >= 0")

    def _jitter(x: Tensor, rng: torch.Generator) -> Tensor:
        if d == 0:
            return x
        n, _, h, w = x.shape
        off = _draws(rng, n, lambda m, g: torch.randint(0, d + 1, (m, 2), generator=g, device="cpu")).tolist()
        return torch.stack([x[i, :, dy : dy + h - d, dx : dx + w - d] for i, (dy, dx) in enumerate(off)])

    return _per_image(_jitter)


def _affine(x: Tensor, scale: Tensor, angle_deg: Tensor) -> Tensor:
    """Zoom each image by ``scale`` and rotate it by ``angle_deg`` about its centre (bilinear,
    reflected borders, same size). ``scale > 1`` enlarges the content."""
    a = angle_deg.to(x.dtype) * (math.pi / 180)
    s = scale.to(x.dtype)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input coordinates: the inverse rotation and zoom
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, non_blocking=True), list(x.shape), align_corners=False)  # no wait per step
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_scale(scales: Sequence[float]) -> Transform:
    """Zoom each image by a factor drawn uniformly from ``scales`` (one ``randint`` per image)."""
    choices = torch.tensor([float(s) for s in scales], device="cpu")  # drawn on the host, as the generators
    if choices.numel() == 0 or bool((choices <= 0).any()):
        raise ValueError("scales must be a non-empty list of positive numbers")

    def _scale(x: Tensor, rng: torch.Generator) -> Tensor:
        s = choices[_choice(rng, x.shape[0], len(choices))]
        return _affine(x, s, torch.zeros_like(s))

    return _per_image(_scale)


def random_rotate(degrees: Sequence[float]) -> Transform:
    """Rotate each image about its centre by an angle in degrees drawn uniformly from ``degrees``
    (one ``randint`` per image); positive is counter-clockwise on screen: 90 gives
    ``torch.rot90(x, 1, (2, 3))``."""
    choices = torch.tensor([float(d) for d in degrees], device="cpu")
    if choices.numel() == 0:
        raise ValueError("degrees must be a non-empty list")

    def _rotate(x: Tensor, rng: torch.Generator) -> Tensor:
        a = choices[_choice(rng, x.shape[0], len(choices))]
        return _affine(x, torch.ones_like(a), a)

    return _per_image(_rotate)


def standard_transforms(size: int = 128) -> list[Transform]:
    """Lucid's robustness set, scaled to ``size``: pad, jitter, zoom 0.9-1.1, rotate +-10 degrees
    (0 more often), a finer jitter. At 128 px: pad 12, jitter 8, jitter 4."""
    k = size / 128
    return [
        pad(max(1, round(12 * k))),
        jitter(max(1, round(8 * k))),
        random_scale([1 + (i - 5) / 50 for i in range(11)]),
        random_rotate(list(range(-10, 11)) + [0] * 5),
        jitter(max(1, round(4 * k))),
    ]
