"""Result dataclasses. They hold tensors and what produced them; drawing is in plotting.py."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from torch import Tensor

from . import files as outputs
from .display import caption, rich_display, short

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .plotting import Channels, Layout, Normalize

__all__ = ["Saliency", "Activations", "FeatureImages", "Objective", "atomic_path", "save_npy", "save_figure",
           "top_channels"]

#: What a feature visualisation maximises (see :func:`convlens.feature_visualization`).
Objective = Literal["channel", "neuron", "layer", "class"]


def atomic_path(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds,
    so an interrupted write never leaves a half-written file (see :mod:`convlens.outputs`).

    Args:
        path: the file to write.
    Returns:
        A context manager yielding the temporary ``Path``.
    """
    return outputs.atomic_path(path)


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` to ``path`` (``.npy``) atomically.

    Args:
        path: the file to write.
        array: any numpy array.
    Returns:
        The path written.
    """
    return outputs.write_file(path, outputs.npy_writer(array))


def save_figure(path: str | os.PathLike[str], fig: Figure, *, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically.

    Args:
        path: the file to write.
        fig: the figure.
        dpi: its resolution.
    Returns:
        The path written.
    """
    return outputs.write_file(path, outputs.figure_writer(fig, dpi))


def top_channels(maps: Tensor, k: int) -> Any:
    """The ``k`` channels of (N, C, h, w) maps with the largest mean over positions (computed in
    float32), per image, largest first: ``(values, indices)``, each (N, min(k, C)). The one
    ranking of :meth:`Activations.top_channels`, ``explain`` and the explorer."""
    return maps.float().mean(dim=(2, 3)).topk(min(k, maps.shape[1]), dim=1)


@rich_display
@dataclass(frozen=True, eq=False)
class Saliency:
    """A saliency map per image, from Grad-CAM-style methods or occlusion.

    ``maps`` (N, H, W) at input resolution with raw values (no normalisation); ``raw`` at the
    method's own resolution (the layer's (N, h, w) for CAMs, the window grid for occlusion);
    ``target`` the class index per row (-1 for a callable target); ``labels`` the class names;
    ``images`` the explained inputs as RGB (N, 3, H, W) in [0, 1], for display. The tensors are
    float32 on the model's device. ``method`` and ``layer`` (None for occlusion) say what made
    the maps; ``settings`` records every choice that produced the result.
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
        """The maps as a float32 NumPy array (N, H, W), copied to the CPU."""
        return self.maps.detach().float().cpu().numpy()

    def rgb(self, index: int = 0) -> np.ndarray:
        """Image ``index`` as displayable RGB: a float32 NumPy array (H, W, 3) in [0, 1]."""
        return self.images[index].detach().float().permute(1, 2, 0).cpu().numpy()

    def plot(
        self, index: int = 0, *, normalize: Normalize = "per_image", alpha: float = 0.5, cmap: str | None = None
    ) -> Figure:
        """Input | heatmap | overlay for image ``index``; arguments, result and errors as
        :func:`convlens.plotting.plot_saliency`."""
        from .plotting import plot_saliency

        return plot_saliency(self, index, normalize=normalize, alpha=alpha, cmap=cmap)

    def _display_caption(self) -> str:
        n = self.maps.shape[0]
        return caption(self) + (f" · showing row 0 of {n}: .plot(i) for the others" if n > 1 else "")

    def save(
        self, path: str | os.PathLike[str], *, index: int | None = None, force: bool = False, **plot_args: Any
    ) -> list[Path]:
        """Write ``<path>.png`` (the figure) and ``<path>.npy`` (raw maps) per image; the whole name
        is kept (``cam.v2`` -> ``cam.v2.png``), only a ``.png``/``.npy`` suffix is dropped.

        With several images the index is appended (``gradcam_0.png``...). A file convlens did not
        write is refused unless ``force``.

        Args:
            path: the files' path without suffix.
            index: write only this row (default: every row).
            force: replace files convlens did not write.
            plot_args: passed to :meth:`plot`.
        Returns:
            The paths written.
        Raises:
            FileExistsError: a file in the way that convlens did not write, without ``force``.
            IsADirectoryError: a folder in the way.
        """
        return outputs.save_files(outputs.saliency_files(self, path, index=index, **plot_args), force=force)


@rich_display
@dataclass(frozen=True, eq=False)
class Activations:
    """Layer outputs for a batch: ``maps`` name -> (N, C, h, w) float32 tensor on the model's
    device, in execution order; ``images`` the inputs as RGB (N, 3, H, W) float32 in [0, 1] for
    display; ``settings`` how they were asked for."""

    maps: dict[str, Tensor]
    images: Tensor = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """Layer names in execution order."""
        return list(self.maps)

    def __getitem__(self, name: str) -> Tensor:
        return self.maps[name]

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every map as a float32 NumPy array (N, C, h, w), copied to the CPU, by layer name."""
        return {n: t.detach().float().cpu().numpy() for n, t in self.maps.items()}

    def top_channels(self, name: str, k: int = 8) -> Tensor:
        """The channels with the largest mean activation per image, most active first.

        Args:
            name: a layer of :attr:`maps`.
            k: how many (capped at the channel count).
        Returns:
            (N, min(k, C)) int64 tensor on the maps' device.
        Raises:
            KeyError: an unknown layer.
            ValueError: ``k < 1``.
        """
        if name not in self.maps:
            raise KeyError(f"no layer {name!r} among {self.layers}")
        if k < 1:
            raise ValueError("k must be at least 1")
        return top_channels(self.maps[name], k).indices

    def plot(
        self,
        index: int = 0,
        *,
        channels: Channels = "top",
        k: int = 8,
        cmap: str = "viridis",
        layout: Layout = "tiles",
    ) -> Figure:
        """A grid for image ``index``: one row per layer (name and shape), one column per channel:
        ``channels="top"`` the ``k`` most active, ``"first"`` the first ``k`` (the spec's figure),
        or explicit indices (a list for every layer, or a dict per layer). ``layout="rows"`` draws
        the same picture with one Axes per layer, several times faster. Arguments, result and
        errors as :func:`convlens.plotting.plot_activations`."""
        from .plotting import plot_activations

        return plot_activations(self, index, channels=channels, k=k, cmap=cmap, layout=layout)

    def _repr_lines(self) -> list[str]:
        n = self.images.shape[0]
        what = " (the model's stages)" if self.settings.get("stages") else ""
        head = f"Activations: {len(self.maps)} layers{what} for {n} image{'s' if n != 1 else ''}"
        shapes = ", ".join(f"{name} {tuple(t.shape[1:])}" for name, t in self.maps.items())
        first = next(iter(self.maps.values()), None)
        device = f"{str(first.dtype).removeprefix('torch.')} on {first.device}" if first is not None else ""
        return [head, f"maps (C, h, w): {shapes}", f"{device}; .top_channels(name, k), .plot(index), .save(dir)"]

    def _display_caption(self) -> str:
        n = self.images.shape[0]
        return f"{len(self.maps)} layers: {', '.join(self.maps)}" + (
            f" · showing image 0 of {n}: .plot(i) for the others" if n > 1 else ""
        )

    def save(
        self, directory: str | os.PathLike[str], *, prefix: str = "activations", force: bool = False,
        **plot_args: Any,
    ) -> list[Path]:
        """Write ``<prefix>_<layer>.npy`` (N, C, h, w) per layer and ``<prefix>.png`` (one grid
        per image: ``<prefix>_<i>.png`` when there are several). A file convlens did not write is
        refused unless ``force``; ``plot_args`` go to :meth:`plot`. Returns the paths written;
        raises as :meth:`Saliency.save`."""
        return outputs.save_files(outputs.activations_files(self, directory, prefix=prefix, **plot_args), force=force)


@rich_display
@dataclass(frozen=True, eq=False)
class FeatureImages:
    """Images that excite units of a layer, from :func:`convlens.feature_visualization`.

    ``images`` (N, 3, S, S) RGB in [0, 1], exactly what ``save`` writes; ``objective`` (N,) the
    unit's score for the returned image (no transforms); ``channels`` the unit per image (class
    index for ``kind == "class"``, None for the whole-layer objective); ``dead`` True where the unit
    never got a gradient (the image is then the initial noise); ``history`` (steps, N) the score at
    every step (with that step's transforms); ``inputs`` the model-ready tensors that gave
    ``objective`` (for ``param="pixel"`` the raw input, shown min-max scaled in ``images``).
    The tensors are float32 on the model's device.
    """

    images: Tensor
    objective: Tensor
    layer: str
    channels: list[int | None]
    kind: Objective = "channel"
    dead: list[bool] = field(default_factory=list)
    history: Tensor | None = field(default=None, repr=False)
    inputs: Tensor | None = field(default=None, repr=False)
    labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_numpy(self) -> np.ndarray:
        """The images as float32 (N, 3, S, S) in [0, 1]."""
        return self.images.detach().float().cpu().numpy()

    def rgb(self, index: int = 0) -> np.ndarray:
        """Image ``index`` as (S, S, 3) float32 in [0, 1]."""
        return self.to_numpy()[index].transpose(1, 2, 0)

    def uint8(self, index: int = 0) -> np.ndarray:
        """Image ``index`` as (S, S, 3) uint8, rounded: the pixels of the saved PNG."""
        return np.round(np.clip(self.rgb(index), 0, 1) * 255).astype(np.uint8)

    def plot(self, *, ncols: int | None = None) -> Figure:
        """A grid of the images, each titled with its layer/channel and final objective."""
        from .plotting import plot_feature_images

        return plot_feature_images(self, ncols=ncols)

    def _repr_lines(self) -> list[str]:
        units = short([c for c in self.channels], 40) if any(c is not None for c in self.channels) else "the layer"
        dead = [c for c, d in zip(self.channels, self.dead) if d]
        head = f"FeatureImages: {self.kind} objective at {self.layer}, units {units}"
        scores = ", ".join(f"{float(v):.3g}" for v in self.objective[:4]) + (", …" if len(self.objective) > 4 else "")
        body = (f"images {tuple(self.images.shape)} {str(self.images.dtype).removeprefix('torch.')} on "
                f"{self.images.device}; objective {scores}" + (f"; dead units {short(dead)}" if dead else ""))
        settings = ", ".join(f"{k}={short(v, 24)}" for k, v in self.settings.items())
        return [head, body, f"settings: {settings}"]

    def _display_caption(self) -> str:
        s = self.settings
        knobs = [f"{s[k]} {k}" for k in ("steps",) if k in s] + [
            f"{k} {short(s[k], 16)}" for k in ("size", "param", "transforms", "seed", "diversity") if k in s
        ]
        return f"{self.kind} objective at {self.layer} · " + ", ".join(knobs)

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        """Write ``<path>_<i>_c<channel>.png`` per image (the exact pixels, 1:1, via PIL),
        ``<path>.npy`` (all images, float32) and ``<path>_grid.png`` (the labelled figure); the
        whole name is kept (``blocks.4`` -> ``blocks.4.npy``). A file convlens did not write is
        refused unless ``force``.

        Returns:
            The paths written.
        Raises:
            FileExistsError: a file in the way that convlens did not write, without ``force``.
            IsADirectoryError: a folder in the way.
        """
        return outputs.save_files(outputs.feature_files(self, path), force=force)
