"""Result dataclasses. They hold tensors and what produced them; drawing is in plotting.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from torch import Tensor

from . import files as outputs
from ._compat import index_keyword, old_save_form
from .display import caption, rich_display, short
from .settings import ActivationsSettings, FeatureVisualizationSettings, Settings, settings_type

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .plotting import Channels, Layout, Normalize

__all__ = ["Result", "Saliency", "Activations", "FeatureImages", "Objective", "atomic_path", "save_npy", "save_figure",
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


class Result:
    """The one shape of every result (maps, activations, feature images, curves, checks, comparisons).

    - ``plot(*, index=0, title=None, ...)`` returns a matplotlib Figure (``index``: which image of
      a batch, where there is a choice; ``title``: replaces the figure's title);
    - ``save(folder, name=None, *, force=False)`` writes ``<name>.png`` (the figure of ``plot()``),
      ``<name>.npy`` (the main array, :meth:`to_numpy`; ``<name>.npz`` for :class:`Activations`,
      whose layers differ in shape) and ``<name>.json`` (:meth:`to_dict`) into ``folder`` (made if
      missing; default ``name`` the method or kind), each atomically, refusing a file there that
      convlens did not write unless ``force``; returns the three paths;
    - ``to_dict()``: JSON-ready ``kind``, ``settings`` and the small numbers (targets, labels,
      scores, AUCs), not the big arrays;
    - ``settings``: a frozen :class:`convlens.settings.Settings` dataclass of the technique;
    - a short ``repr`` (no tensor dump).

    Example::

        cam = convlens.grad_cam(clf, x)
        cam.save("out")            # out/gradcam.png, out/gradcam.npy, out/gradcam.json
    """

    _settings: ClassVar[type[Settings] | None] = None  # the settings class of the technique

    def __post_init__(self) -> None:
        kind = self._settings_type()
        value = getattr(self, "settings", None)
        if kind is not None and isinstance(value, Mapping) and not isinstance(value, kind):
            object.__setattr__(self, "settings", kind.of(value))  # frozen: set once, here

    def _settings_type(self) -> type[Settings] | None:
        return self._settings

    def _array(self) -> np.ndarray | dict[str, np.ndarray]:
        return self.to_numpy()  # type: ignore[attr-defined,no-any-return]

    def _name(self) -> str:
        return str(getattr(self, "method", None) or type(self).__name__.lower())

    def _facts(self) -> dict[str, Any]:
        """The small numbers of :meth:`to_dict` (besides ``kind`` and ``settings``)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``kind`` (the class), the small numbers of the result and its ``settings``."""
        settings = getattr(self, "settings", {})
        settings = settings.to_dict() if isinstance(settings, Settings) else dict(settings)
        return {"kind": type(self).__name__, **self._facts(), "settings": settings}

    def save(self, folder: str | os.PathLike[str], name: str | None = None, *, force: bool = False,
             **old: Any) -> list[Path]:
        """Write ``<name>.png``, ``<name>.npy`` (or ``.npz``) and ``<name>.json`` into ``folder``.

        The old form (``save("out/cam.png")`` or an old keyword such as ``index=``, which wrote
        ``out/cam.png`` and ``out/cam.npy`` per row) still works for one release, with a
        ``DeprecationWarning``.

        Args:
            folder: the folder (made if missing).
            name: the files' name without suffix (default: the method, or the kind of result).
            force: replace files convlens did not write.
        Returns:
            The paths written.
        Raises:
            FileExistsError: a file in the way that convlens did not write, without ``force``
                (nothing is written then).
            IsADirectoryError: a folder in the way.
        """
        if name is None and old_save_form(self, folder, old, "save(folder, name)"):
            return self._save_old(folder, force=force, **old)
        if old:
            raise TypeError(f"save() got unexpected keyword(s) {sorted(old)}")
        return outputs.save_files(outputs.result_files(self, folder, name or self._name()), force=force)

    def _save_old(self, path: str | os.PathLike[str], *, force: bool = False, **old: Any) -> list[Path]:
        return outputs.save_files(outputs.figure_and_array_files(self, path, **old), force=force)


def _titled(fig: Figure, title: str | None) -> Figure:
    """``fig`` with ``title`` as its title (when given): the ``title=`` of every ``plot()``."""
    if title is not None:
        fig.suptitle(title)
    return fig


@rich_display
@dataclass(frozen=True, eq=False)
class Saliency(Result):
    """A saliency map per image, from Grad-CAM-style methods or occlusion.

    ``maps`` (N, H, W) at input resolution with raw values (no normalisation); ``raw`` at the
    method's own resolution (the layer's (N, h, w) for CAMs, the window grid for occlusion);
    ``target`` the class index per row (-1 for a callable target); ``labels`` the class names;
    ``images`` the explained inputs as RGB (N, 3, H, W) in [0, 1], for display. The tensors are
    float32 on the model's device. ``method`` and ``layer`` (None for occlusion) say what made
    the maps; ``settings`` records every choice that produced the result: a
    :class:`~convlens.settings.CamSettings` or :class:`~convlens.settings.OcclusionSettings` (a
    dict given here becomes one; a map of another method keeps its dict).
    """

    maps: Tensor
    raw: Tensor
    target: list[int]
    method: str
    layer: str | None
    images: Tensor = field(repr=False)
    labels: list[str] = field(default_factory=list)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_numpy(self) -> np.ndarray:
        """The maps as a float32 NumPy array (N, H, W), copied to the CPU."""
        return self.maps.detach().float().cpu().numpy()

    def rgb(self, index: int = 0) -> np.ndarray:
        """Image ``index`` as displayable RGB: a float32 NumPy array (H, W, 3) in [0, 1]."""
        return self.images[index].detach().float().permute(1, 2, 0).cpu().numpy()

    @index_keyword
    def plot(
        self, *, index: int = 0, normalize: Normalize = "per_image", alpha: float = 0.5, cmap: str | None = None,
        title: str | None = None,
    ) -> Figure:
        """Input | heatmap | overlay for image ``index``; arguments, result and errors as
        :func:`convlens.plotting.plot_saliency`."""
        from .plotting import plot_saliency

        return _titled(plot_saliency(self, index, normalize=normalize, alpha=alpha, cmap=cmap), title)

    def _settings_type(self) -> type[Settings] | None:
        return settings_type(self.method)

    def _facts(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "target": list(self.target), "labels": list(self.labels),
                "shape": list(self.maps.shape), "raw_shape": list(self.raw.shape)}

    def _display_caption(self) -> str:
        n = self.maps.shape[0]
        return caption(self) + (f" · showing row 0 of {n}: .plot(index=i) for the others" if n > 1 else "")

    def _save_old(
        self, path: str | os.PathLike[str], *, index: int | None = None, force: bool = False, **plot_args: Any
    ) -> list[Path]:
        """The deprecated form: ``<path>.png`` (the figure) and ``<path>.npy`` (the map) per row,
        ``<path>_<row>.png`` ... with several rows; only a ``.png``/``.npy`` suffix is dropped."""
        return outputs.save_files(outputs.saliency_files(self, path, index=index, **plot_args), force=force)


@rich_display
@dataclass(frozen=True, eq=False)
class Activations(Result):
    """Layer outputs for a batch: ``maps`` name -> (N, C, h, w) float32 tensor on the model's
    device, in execution order; ``images`` the inputs as RGB (N, 3, H, W) float32 in [0, 1] for
    display; ``settings`` how they were asked for."""

    maps: dict[str, Tensor]
    images: Tensor = field(repr=False)
    settings: ActivationsSettings = field(default_factory=ActivationsSettings)
    _settings: ClassVar[type[Settings] | None] = ActivationsSettings

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

    @index_keyword
    def plot(
        self,
        *,
        index: int = 0,
        channels: Channels = "top",
        k: int = 8,
        cmap: str = "viridis",
        layout: Layout = "tiles",
        title: str | None = None,
    ) -> Figure:
        """A grid for image ``index``: one row per layer (name and shape), one column per channel:
        ``channels="top"`` the ``k`` most active, ``"first"`` the first ``k`` (the spec's figure),
        or explicit indices (a list for every layer, or a dict per layer). ``layout="rows"`` draws
        the same picture with one Axes per layer, several times faster. Arguments, result and
        errors as :func:`convlens.plotting.plot_activations`."""
        from .plotting import plot_activations

        return _titled(plot_activations(self, index, channels=channels, k=k, cmap=cmap, layout=layout), title)

    def _array(self) -> dict[str, np.ndarray]:
        return self.to_numpy()  # one array per layer, each its own shape: .npz

    def _name(self) -> str:
        return "activations"

    def _facts(self) -> dict[str, Any]:
        return {"layers": self.layers, "shapes": {n: list(t.shape) for n, t in self.maps.items()}}

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
            f" · showing image 0 of {n}: .plot(index=i) for the others" if n > 1 else ""
        )

    def _save_old(
        self, directory: str | os.PathLike[str], *, prefix: str = "activations", force: bool = False,
        **plot_args: Any,
    ) -> list[Path]:
        """The deprecated form: ``<prefix>_<layer>.npy`` (N, C, h, w) per layer and ``<prefix>.png``
        (one grid per image: ``<prefix>_<i>.png`` when there are several)."""
        return outputs.save_files(outputs.activations_files(self, directory, prefix=prefix, **plot_args), force=force)


@rich_display
@dataclass(frozen=True, eq=False)
class FeatureImages(Result):
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
    settings: FeatureVisualizationSettings = field(default_factory=FeatureVisualizationSettings)
    _settings: ClassVar[type[Settings] | None] = FeatureVisualizationSettings

    def to_numpy(self) -> np.ndarray:
        """The images as float32 (N, 3, S, S) in [0, 1]."""
        return self.images.detach().float().cpu().numpy()

    def rgb(self, index: int = 0) -> np.ndarray:
        """Image ``index`` as (S, S, 3) float32 in [0, 1]."""
        return self.to_numpy()[index].transpose(1, 2, 0)

    def uint8(self, index: int = 0) -> np.ndarray:
        """Image ``index`` as (S, S, 3) uint8, rounded: the pixels of the saved PNG."""
        return np.round(np.clip(self.rgb(index), 0, 1) * 255).astype(np.uint8)

    def plot(self, *, ncols: int | None = None, title: str | None = None) -> Figure:
        """A grid of the images, each titled with its layer/channel and final objective."""
        from .plotting import plot_feature_images

        return _titled(plot_feature_images(self, ncols=ncols), title)

    def _name(self) -> str:
        return "feature_visualization"

    def _facts(self) -> dict[str, Any]:
        return {"layer": self.layer, "objective_kind": self.kind, "channels": list(self.channels),
                "labels": list(self.labels), "dead": list(self.dead), "objective": self.objective.tolist()}

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

    def _save_old(self, path: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        """The deprecated form: ``<path>_<i>_c<channel>.png`` per image (the exact pixels, 1:1, via
        PIL), ``<path>.npy`` (all images, float32) and ``<path>_grid.png`` (the labelled figure)."""
        return outputs.save_files(outputs.feature_files(self, path), force=force)
