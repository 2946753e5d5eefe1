"""Result dataclasses of the metrics: they hold tensors and what produced them; drawing is in
plotting.py, file names and writes go through results.py's atomic helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from torch import Tensor

from .. import files as outputs
from ..display import rich_display

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CurveKind", "PerturbationCurve", "SanityCheck", "ClassSensitivity", "TrustSummary"]

CurveKind = Literal["deletion", "insertion"]


@rich_display
@dataclass(frozen=True, eq=False)
class PerturbationCurve:
    """A deletion or insertion curve per image (:func:`convlens.deletion` / :func:`convlens.insertion`).

    ``kind``: ``"deletion"`` or ``"insertion"``; ``fractions`` (steps+1,) = ``k / steps``;
    ``scores`` (N, steps+1) the target's score at each step; ``auc`` (N,) the trapezoid area
    under ``scores`` over ``fractions``; ``target`` the class index per image (-1 for a callable
    target); ``method`` the map's method (or ``"map"`` for a bare tensor); ``settings`` every
    choice (steps, baseline, score, pixels per step, batch size, forwards). The tensors are
    float32 on the model's device. Deletion: lower is better; insertion: higher is better.
    """

    kind: CurveKind
    fractions: Tensor = field(repr=False)
    scores: Tensor = field(repr=False)
    auc: Tensor = field(repr=False)
    target: list[int]
    method: str = "map"
    labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def _repr_lines(self) -> list[str]:
        aucs = ", ".join(f"{v:.3f}" for v in self.auc.tolist()[:4]) + (", ..." if len(self.auc) > 4 else "")
        return [f"PerturbationCurve({self.kind}, method={self.method!r}, N={len(self.auc)}, auc=[{aucs}])"]

    def to_numpy(self) -> np.ndarray:
        """The scores as float32 (N, steps+1)."""
        return self.scores.detach().float().cpu().numpy()

    def plot(self, index: int = 0, *, others: list[PerturbationCurve] | None = None) -> Figure:
        """The curve of image ``index`` (area shaded, AUC in the legend), with ``others`` (e.g. a
        random map's curve of the same kind) drawn beside it."""
        from ..plotting import plot_curves

        return plot_curves([self, *(others or [])], index)

    def save(self, path: str | os.PathLike[str], *, index: int = 0, force: bool = False) -> list[Path]:
        """Write ``<path>.png`` (the figure of image ``index``) and ``<path>.npy`` (all scores); the
        whole name is kept (only a ``.png``/``.npy`` suffix is dropped) and a file convlens did not
        write is refused unless ``force``.

        Returns:
            The paths written.
        Raises:
            FileExistsError: a file in the way that convlens did not write, without ``force``.
            IsADirectoryError: a folder in the way.
        """
        return outputs.save_files(outputs.figure_and_array_files(self, path, index), force=force)


@rich_display
@dataclass(frozen=True, eq=False)
class SanityCheck:
    """Cascading model-parameter randomisation (:func:`convlens.sanity_check`).

    ``stages`` the randomisation steps from the output down (each step re-initialises that stage
    and everything above it); ``spearman`` and ``ssim`` (N, stages) compare each randomised map
    with the original; ``passed`` (N,) True where the rank correlation after the first step (the
    classifier alone) is below ``threshold`` (a map that became constant has correlation 0; NaN,
    both maps constant, does not pass).
    ``maps`` (N, stages+1, H, W): the original map, then one per step; ``images`` (N, 3, H, W)
    the inputs as RGB in [0, 1]. The tensors are float32 on the model's device.
    """

    method: str
    stages: list[str]
    spearman: Tensor = field(repr=False)
    ssim: Tensor = field(repr=False)
    passed: list[bool]
    threshold: float
    target: list[int]
    maps: Tensor = field(repr=False)
    images: Tensor = field(repr=False)
    labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def _repr_lines(self) -> list[str]:
        first = ", ".join(f"{v:.2f}" for v in self.spearman[:, 0].tolist()[:4]) if self.stages else ""
        return [(f"SanityCheck({self.method!r}, stages={len(self.stages)}, passed={self.passed}, "
                f"spearman after {self.stages[0] if self.stages else '-'}=[{first}])")]

    def to_numpy(self) -> np.ndarray:
        """The maps as float32 (N, stages+1, H, W)."""
        return self.maps.detach().float().cpu().numpy()

    def plot(self, index: int = 0) -> Figure:
        """Adebayo et al.'s figure for image ``index``: the original map, then the map after each
        cumulative randomisation step, with the rank correlation and SSIM under each."""
        from ..plotting import plot_sanity

        return plot_sanity(self, index)

    def save(self, path: str | os.PathLike[str], *, index: int = 0, force: bool = False) -> list[Path]:
        """Write ``<path>.png`` (the figure of image ``index``) and ``<path>.npy`` (all maps), as
        :meth:`PerturbationCurve.save` names them and refuses what is in the way."""
        return outputs.save_files(outputs.figure_and_array_files(self, path, index), force=force)


@rich_display
@dataclass(frozen=True, eq=False)
class ClassSensitivity:
    """How much a method's map changes with the class (:func:`convlens.class_sensitivity`).

    ``spearman`` (N,) rank correlation between the target's map and the ``other`` class's map;
    ``discriminative`` True where it is below ``threshold``. ``maps`` (N, 2, H, W): target, other.
    The tensors are float32 on the model's device.
    """

    method: str
    spearman: Tensor = field(repr=False)
    discriminative: list[bool]
    threshold: float
    target: list[int]
    other: list[int]
    maps: Tensor = field(repr=False)
    labels: list[str] = field(default_factory=list)
    other_labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def _repr_lines(self) -> list[str]:
        rho = ", ".join(f"{v:.2f}" for v in self.spearman.tolist()[:4])
        return [f"ClassSensitivity({self.method!r}, spearman=[{rho}], discriminative={self.discriminative})"]

    def to_numpy(self) -> np.ndarray:
        """The maps as float32 (N, 2, H, W)."""
        return self.maps.detach().float().cpu().numpy()

    def plot(self, index: int = 0) -> Figure:
        """The target's map beside the other class's map, with their rank correlation."""
        from ..plotting import plot_class_sensitivity

        return plot_class_sensitivity(self, index)


@rich_display
@dataclass(frozen=True, eq=False)
class TrustSummary:
    """For one image, how far its maps can be trusted (:func:`convlens.metrics.trust.trust_summary`).

    ``curves``: technique (and ``"random map"``) -> (deletion, insertion) curves; ``class_rho``:
    technique -> rank correlation with the least likely class's map (``other``: that class);
    ``sanity``: technique -> the model's verdict (``passed``, ``rho``, ``image``, ``stage``, ...);
    ``findings``: technique -> plain-words statements where a map should not be trusted;
    ``verdicts``: technique -> ``{"level": "trust" | "weak" | "do not trust", "reasons": [...]}``;
    ``spread``: random reference -> standard deviation of its draws' insertion - deletion AUC.
    """

    curves: dict[str, tuple[PerturbationCurve, PerturbationCurve]] = field(repr=False)
    class_rho: dict[str, float | None]
    other: dict[str, str]
    sanity: dict[str, dict[str, Any]]
    findings: dict[str, list[str]]
    target: list[int]
    labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    spread: dict[str, float] = field(default_factory=dict, repr=False)

    def auc(self) -> dict[str, dict[str, float]]:
        """technique -> {"deletion": AUC, "insertion": AUC} (first image)."""
        return {k: {"deletion": float(d.auc[0]), "insertion": float(i.auc[0])} for k, (d, i) in self.curves.items()}

    def to_numpy(self) -> np.ndarray:
        """(1, rows, 2, steps+1) float32: per row (in ``curves`` order) the deletion and insertion scores."""
        rows = [np.stack([d.to_numpy()[0], i.to_numpy()[0]]) for d, i in self.curves.values()]
        return np.stack(rows)[None].astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers: AUCs, class sensitivity, sanity verdicts, verdicts, findings, settings."""
        first = next(iter(self.curves.values()))[0]
        return {
            "auc": self.auc(),
            "fractions": first.fractions.tolist(),
            "curves": {k: {"deletion": d.scores[0].tolist(), "insertion": i.scores[0].tolist()}
                       for k, (d, i) in self.curves.items()},
            "class_sensitivity": {k: {"rho": v, "other": self.other.get(k)} for k, v in self.class_rho.items()},
            "sanity": self.sanity,
            "verdicts": self.verdicts,
            "findings": self.findings,
            "spread": self.spread,
            "settings": self.settings,
        }

    def plot(self) -> Figure:
        """Deletion (left) and insertion (right) curves of every map beside the random map's."""
        from ..plotting import plot_trust

        return plot_trust(self)
