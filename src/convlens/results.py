"""Result dataclasses. They hold tensors and what produced them; drawing is in plotting.py."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Saliency", "atomic_path", "save_npy", "save_figure"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds,
    so an interrupted write never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); outputs get the usual permissions under the umask
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` to ``path`` (``.npy``) atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return Path(path)


def save_figure(path: str | os.PathLike[str], fig: Figure, *, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


@dataclass(frozen=True, eq=False)
class Saliency:
    """A saliency map per image, from Grad-CAM-style methods or occlusion.

    ``maps`` (N, H, W) at input resolution with raw values (no normalisation); ``raw`` at the
    method's own resolution (the layer's for CAMs, the window grid for occlusion); ``target``
    the class index per image; ``images`` the explained inputs as RGB (N, 3, H, W) in [0, 1],
    for display.
    ``settings`` records every choice that produced the result.
    """

    maps: Tensor
    raw: Tensor
    target: list[int]
    method: str
    layer: str | None
    images: Tensor = field(repr=False)
    labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_numpy(self) -> np.ndarray:
        """The maps as a float32 array (N, H, W)."""
        return self.maps.detach().float().cpu().numpy()

    def rgb(self, index: int = 0) -> np.ndarray:
        """Image ``index`` as displayable RGB (H, W, 3) in [0, 1]."""
        return self.images[index].detach().float().permute(1, 2, 0).cpu().numpy()

    def plot(
        self, index: int = 0, *, normalize: str = "per_image", alpha: float = 0.5, cmap: str | None = None
    ) -> Figure:
        """Input | heatmap | overlay for image ``index``; see :func:`convlens.plotting.plot_saliency`."""
        from .plotting import plot_saliency

        return plot_saliency(self, index, normalize=normalize, alpha=alpha, cmap=cmap)

    def save(self, path: str | os.PathLike[str], *, index: int | None = None, **plot_args: Any) -> list[Path]:
        """Write ``<path>.png`` (the figure) and ``<path>.npy`` (raw maps) per image.

        With several images the index is appended (``gradcam_0.png``...). Returns the paths.
        """
        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".png", ".npy") else base
        indices = range(self.maps.shape[0]) if index is None else [index]
        written = []
        for i in indices:
            stem = base if len(indices) == 1 else base.with_name(f"{base.name}_{i}")
            written.append(save_figure(stem.with_suffix(".png"), self.plot(i, **plot_args)))
            written.append(save_npy(stem.with_suffix(".npy"), self.to_numpy()[i]))
        return written
