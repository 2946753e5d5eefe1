"""Result dataclasses of the metrics: they hold tensors and what produced them; drawing is in
plotting.py, file names and writes go through results.py's atomic helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from torch import Tensor

from .._compat import index_keyword
from ..display import rich_display
from ..results import Result, _titled
from ..settings import (
    ClassSensitivitySettings,
    DeletionInsertionSettings,
    SanitySettings,
    Settings,
    TrustSettings,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CurveKind", "PerturbationCurve", "DeletionInsertion", "SanityCheck", "ClassSensitivity", "TrustSummary"]

CurveKind = Literal["deletion", "insertion"]


@rich_display
@dataclass(frozen=True, eq=False)
class PerturbationCurve(Result):
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
    settings: DeletionInsertionSettings = field(default_factory=DeletionInsertionSettings)
    _settings: ClassVar[type[Settings] | None] = DeletionInsertionSettings

    def _repr_lines(self) -> list[str]:
        aucs = ", ".join(f"{v:.3f}" for v in self.auc.tolist()[:4]) + (", ..." if len(self.auc) > 4 else "")
        return [f"PerturbationCurve({self.kind}, method={self.method!r}, N={len(self.auc)}, auc=[{aucs}])"]

    def to_numpy(self) -> np.ndarray:
        """The scores as float32 (N, steps+1)."""
        return self.scores.detach().float().cpu().numpy()

    @index_keyword
    def plot(self, *, index: int = 0, others: list[PerturbationCurve] | None = None, title: str | None = None,
             ax: Any = None) -> Figure:
        """The curve of image ``index`` (area shaded, AUC in the legend), with ``others`` (e.g. a
        random map's curve of the same kind) drawn beside it; ``title`` and ``ax`` as
        :func:`convlens.plotting.plot_curves`."""
        from ..plotting import plot_curves

        return plot_curves([self, *(others or [])], index, title=title, ax=ax)

    def _name(self) -> str:
        return f"{self.method}_{self.kind}"

    def _facts(self) -> dict[str, Any]:
        return {"curve": self.kind, "method": self.method, "target": list(self.target), "labels": list(self.labels),
                "auc": self.auc.tolist(), "fractions": self.fractions.tolist()}

    def _save_old(self, path: str | os.PathLike[str], *, index: int = 0, force: bool = False) -> list[Path]:
        """The deprecated form: ``<path>.png`` (the figure of image ``index``) and ``<path>.npy``
        (all scores); only a ``.png``/``.npy`` suffix is dropped."""
        return super()._save_old(path, index=index, force=force)


@rich_display
@dataclass(frozen=True, eq=False)
class DeletionInsertion(Result, Mapping[str, tuple[PerturbationCurve, PerturbationCurve]]):
    """What :func:`convlens.deletion_insertion` returns: map name -> ``(deletion, insertion)``
    curves, read as the dict it used to be (``curves["gradcam"][0].auc``, ``for name, (d, i) in
    curves.items()``); ``settings`` the call's (``forwards`` counts the forwards of the whole call).
    """

    curves: dict[str, tuple[PerturbationCurve, PerturbationCurve]] = field(repr=False)
    settings: DeletionInsertionSettings = field(default_factory=DeletionInsertionSettings)
    _settings: ClassVar[type[Settings] | None] = DeletionInsertionSettings

    def __getitem__(self, name: str) -> tuple[PerturbationCurve, PerturbationCurve]:
        return self.curves[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.curves)

    def __len__(self) -> int:
        return len(self.curves)

    def _repr_lines(self) -> list[str]:
        aucs = ", ".join(f"{k} {float(d.auc[0]):.3f}/{float(i.auc[0]):.3f}" for k, (d, i) in self.curves.items())
        return [f"DeletionInsertion({len(self.curves)} maps, deletion/insertion AUC of image 0: {aucs})"]

    def to_numpy(self) -> np.ndarray:
        """(maps, 2, N, steps+1) float32: per map (in order) the deletion and insertion scores.

        Raises:
            ValueError: maps of different images (a ``top=k`` map has more rows): save writes ``.npz`` then.
        """
        shapes = self._shapes()
        if len(shapes) != 1:
            raise ValueError(f"the maps' curves have different shapes {sorted(shapes)}; see _array()")
        return np.stack([np.stack([d.to_numpy(), i.to_numpy()]) for d, i in self.curves.values()])

    def _array(self) -> np.ndarray | dict[str, np.ndarray]:
        if len(self._shapes()) == 1:
            return self.to_numpy()
        return {f"{k}_{c.kind}": c.to_numpy() for k, pair in self.curves.items() for c in pair}  # rows differ: .npz

    def _shapes(self) -> set[tuple[int, ...]]:
        return {tuple(d.scores.shape) for d, _ in self.curves.values()}

    def _name(self) -> str:
        return "deletion_insertion"

    def _facts(self) -> dict[str, Any]:
        return {"maps": {k: {"deletion": d.to_dict(), "insertion": i.to_dict()} for k, (d, i) in self.curves.items()}}

    @index_keyword
    def plot(self, *, index: int = 0, title: str | None = None) -> Figure:
        """Deletion (left) and insertion (right) curves of image ``index``, one line per map."""
        from ..plotting import ResultFigure, plot_curves

        fig = ResultFigure(figsize=(10.4, 3.8))
        for ax, j in zip(fig.subplots(1, 2), (0, 1)):
            plot_curves([pair[j] for pair in self.curves.values()], index, ax=ax)
        fig.tight_layout()
        return _titled(fig, title)


@rich_display
@dataclass(frozen=True, eq=False)
class SanityCheck(Result):
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
    settings: SanitySettings = field(default_factory=SanitySettings)
    _settings: ClassVar[type[Settings] | None] = SanitySettings

    def _repr_lines(self) -> list[str]:
        first = ", ".join(f"{v:.2f}" for v in self.spearman[:, 0].tolist()[:4]) if self.stages else ""
        return [(f"SanityCheck({self.method!r}, stages={len(self.stages)}, passed={self.passed}, "
                f"spearman after {self.stages[0] if self.stages else '-'}=[{first}])")]

    def to_numpy(self) -> np.ndarray:
        """The maps as float32 (N, stages+1, H, W)."""
        return self.maps.detach().float().cpu().numpy()

    @index_keyword
    def plot(self, *, index: int = 0, title: str | None = None) -> Figure:
        """Adebayo et al.'s figure for image ``index``: the original map, then the map after each
        cumulative randomisation step, with the rank correlation and SSIM under each."""
        from ..plotting import plot_sanity

        return _titled(plot_sanity(self, index), title)

    def _name(self) -> str:
        return f"{self.method}_sanity"

    def _facts(self) -> dict[str, Any]:
        return {"method": self.method, "stages": list(self.stages), "spearman": self.spearman.tolist(),
                "ssim": self.ssim.tolist(), "passed": list(self.passed), "threshold": self.threshold,
                "target": list(self.target), "labels": list(self.labels)}

    def _save_old(self, path: str | os.PathLike[str], *, index: int = 0, force: bool = False) -> list[Path]:
        """The deprecated form: ``<path>.png`` (the figure of image ``index``) and ``<path>.npy`` (all maps)."""
        return super()._save_old(path, index=index, force=force)


@rich_display
@dataclass(frozen=True, eq=False)
class ClassSensitivity(Result):
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
    settings: ClassSensitivitySettings = field(default_factory=ClassSensitivitySettings)
    _settings: ClassVar[type[Settings] | None] = ClassSensitivitySettings

    def _repr_lines(self) -> list[str]:
        rho = ", ".join(f"{v:.2f}" for v in self.spearman.tolist()[:4])
        return [f"ClassSensitivity({self.method!r}, spearman=[{rho}], discriminative={self.discriminative})"]

    def to_numpy(self) -> np.ndarray:
        """The maps as float32 (N, 2, H, W)."""
        return self.maps.detach().float().cpu().numpy()

    @index_keyword
    def plot(self, *, index: int = 0, title: str | None = None) -> Figure:
        """The target's map beside the other class's map, with their rank correlation."""
        from ..plotting import plot_class_sensitivity

        return _titled(plot_class_sensitivity(self, index), title)

    def _name(self) -> str:
        return f"{self.method}_class_sensitivity"

    def _facts(self) -> dict[str, Any]:
        return {"method": self.method, "spearman": self.spearman.tolist(), "discriminative": list(self.discriminative),
                "threshold": self.threshold, "target": list(self.target), "other": list(self.other),
                "labels": list(self.labels), "other_labels": list(self.other_labels)}


@rich_display
@dataclass(frozen=True, eq=False)
class TrustSummary(Result):
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
    settings: TrustSettings = field(default_factory=TrustSettings)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    spread: dict[str, float] = field(default_factory=dict, repr=False)

    def auc(self) -> dict[str, dict[str, float]]:
        """technique -> {"deletion": AUC, "insertion": AUC} (first image)."""
        return {k: {"deletion": float(d.auc[0]), "insertion": float(i.auc[0])} for k, (d, i) in self.curves.items()}

    def to_numpy(self) -> np.ndarray:
        """(1, rows, 2, steps+1) float32: per row (in ``curves`` order) the deletion and insertion scores."""
        rows = [np.stack([d.to_numpy()[0], i.to_numpy()[0]]) for d, i in self.curves.values()]
        return np.stack(rows)[None].astype(np.float32)

    _settings: ClassVar[type[Settings] | None] = TrustSettings

    def _name(self) -> str:
        return "trust"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers: AUCs, class sensitivity, sanity verdicts, verdicts, findings, settings."""
        first = next(iter(self.curves.values()))[0]
        return {
            "kind": type(self).__name__,
            "target": list(self.target),
            "labels": list(self.labels),
            "auc": self.auc(),
            "fractions": first.fractions.tolist(),
            "curves": {k: {"deletion": d.scores[0].tolist(), "insertion": i.scores[0].tolist()}
                       for k, (d, i) in self.curves.items()},
            "class_sensitivity": {k: {"rho": v, "other": self.other.get(k)} for k, v in self.class_rho.items()},
            "sanity": self.sanity,
            "verdicts": self.verdicts,
            "findings": self.findings,
            "spread": self.spread,
            "settings": self.settings.to_dict(),
        }

    def plot(self, *, title: str | None = None) -> Figure:
        """Deletion (left) and insertion (right) curves of every map beside the random map's."""
        from ..plotting import plot_trust

        return _titled(plot_trust(self), title)
