"""What produced a result: one frozen dataclass per technique and metric, recorded as ``result.settings``.

Each records the choices of the call (``patch``, ``steps``, ...) and the facts the call found out
(``windows_evaluated``, ``work``, ``layer_reason``, ``zero_gradient``, ``layouts``, ...). A field the
call did not record is *unset*: it is not a key (``"zero_gradient" in cam.settings`` is False when
every gradient was fine), so the settings still read like the dicts they replace:
``settings["patch"]``, ``settings.get("tau")``, ``"layouts" in settings``, ``dict(settings)``.
They cannot be changed (assignment raises ``FrozenInstanceError``); :meth:`Settings.to_dict` gives
the recorded fields as a plain dict (what ``save()`` writes to JSON).

Example::

    occ = convlens.occlusion(clf, x, patch=32)
    occ.settings.patch, occ.settings["windows_evaluated"]   # (32, 32), 49
    OcclusionSettings.of({"patch": 8, "sride": 4})          # ValueError: unknown occlusion setting(s) ['sride'] ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = [
    "UNSET", "Settings", "ActivationsSettings", "CamSettings", "OcclusionSettings", "FeatureVisualizationSettings",
    "DeletionInsertionSettings", "SanitySettings", "ClassSensitivitySettings", "TrustSettings", "CompareSettings",
    "settings_type", "EXPLAIN_OPTIONS", "PredictionsOptions", "ActivationsOptions", "GradcamOptions",
    "OcclusionOptions", "FiltersOptions", "TrustOptions",
]


class _Unset:
    """The value of a field the call did not record."""

    _instance: ClassVar[_Unset | None] = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "UNSET"  # pickles (Ray, the cache) as the one instance


#: the value of a field the call did not record (not a key of the Mapping view)
UNSET: Any = _Unset()

S = TypeVar("S", bound="Settings")


@dataclass(frozen=True)
class Settings(Mapping[str, Any]):
    """Base of the settings dataclasses: frozen, a read-only Mapping over the recorded fields."""

    what: ClassVar[str] = "result"  # names the technique in errors

    @classmethod
    def of(cls: type[S], values: Mapping[str, Any] | None = None, **more: Any) -> S:
        """The settings from a dict (and keywords); an unknown key is a ``ValueError`` naming the valid fields.

        Example::

            CamSettings.of({"top": 2})
        """
        if isinstance(values, cls) and not more:
            return values
        given = {**dict(values or {}), **more}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.what} setting(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**given)

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes`` (``UNSET`` removes a key)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields as a plain dict (values as recorded: tuples stay tuples)."""
        return dict(self.items())

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key, UNSET) if key in self._names() else UNSET
        if value is UNSET:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._names() if getattr(self, n) is not UNSET)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __eq__(self, other: object) -> bool:  # equal to a dict of the same items, as the dicts were
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]  # values may be lists

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.items())})"

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _unset() -> Any:
    return dataclasses.field(default=UNSET)


@dataclass(frozen=True, repr=False, eq=False)
class ActivationsSettings(Settings):
    """:func:`convlens.activations`: the layers (execution order), whether they were the model's
    stages, and the layout of any layer that is not (N, C, h, w)."""

    what: ClassVar[str] = "activations"
    layers: list[str] = _unset()
    stages: bool = _unset()
    layouts: dict[str, dict[str, Any]] = _unset()


@dataclass(frozen=True, repr=False, eq=False)
class CamSettings(Settings):
    """:func:`convlens.grad_cam` (every CAM method): the image of each row, the layer's output
    shape, its layout (tokens: prefix tokens and grid), why the layer was chosen, ``top``,
    whether the map ignores the class, the zero-gradient warning, Score-CAM's batch size."""

    what: ClassVar[str] = "grad_cam"
    image_index: list[int] = _unset()
    layer_shape: tuple[int, ...] = _unset()
    layout: str = _unset()
    prefix_tokens: int = _unset()
    grid: list[int] = _unset()
    layer_reason: str = _unset()
    top: int = _unset()
    class_independent: bool = _unset()
    zero_gradient: str = _unset()
    batch_size: int = _unset()


@dataclass(frozen=True, repr=False, eq=False)
class OcclusionSettings(Settings):
    """:func:`convlens.occlusion`: the window, stride, baseline and score asked for, then what the
    call did: the window grid and its starts, the evaluator (``path``) and its ``boundaries``, the
    mode and ``tau``, ``windows_evaluated``, ``work`` (share of one full forward per window) and
    any ``fallback`` reason."""

    what: ClassVar[str] = "occlusion"
    patch: tuple[int, int] = _unset()
    stride: tuple[int, int] = _unset()
    baseline: Any = _unset()
    blur_sigma: float | None = _unset()
    score: str = _unset()
    batch_size: int = _unset()
    windows: tuple[int, int] = _unset()
    starts: tuple[list[int], list[int]] = _unset()
    path: str = _unset()
    boundaries: list[str] = _unset()
    mode: str = _unset()
    tau: float | None = _unset()
    refine: Any = _unset()
    windows_evaluated: int = _unset()
    work: float = _unset()
    fallback: str | None = _unset()


@dataclass(frozen=True, repr=False, eq=False)
class FeatureVisualizationSettings(Settings):
    """:func:`convlens.feature_visualization`: the optimisation's knobs and the cache's hits."""

    what: ClassVar[str] = "feature_visualization"
    steps: int = _unset()
    size: int = _unset()
    lr: float = _unset()
    seed: int = _unset()
    param: str = _unset()
    transforms: Any = _unset()
    diversity: float = _unset()
    model: str = _unset()
    cache: dict[str, Any] = _unset()


@dataclass(frozen=True, repr=False, eq=False)
class DeletionInsertionSettings(Settings):
    """:func:`convlens.deletion` / :func:`convlens.insertion` / :func:`convlens.deletion_insertion`:
    steps, baseline, score, pixels per step, batch size and the forwards the call ran."""

    what: ClassVar[str] = "deletion/insertion"
    steps: int = _unset()
    baseline: Any = _unset()
    blur_sigma: float | None = _unset()
    pixels_per_step: int = _unset()
    batch_size: int = _unset()
    forwards: int = _unset()
    score: str = _unset()


@dataclass(frozen=True, repr=False, eq=False)
class SanitySettings(Settings):
    """:func:`convlens.sanity_check`: seed, the per-draw rank correlations, the layer, the
    re-initialised modules per step and the method's options."""

    what: ClassVar[str] = "sanity_check"
    seed: int = _unset()
    draws: list[list[float]] = _unset()
    layer: str | None = _unset()
    reinitialised: Any = _unset()
    options: dict[str, Any] = _unset()


@dataclass(frozen=True, repr=False, eq=False)
class ClassSensitivitySettings(Settings):
    """:func:`convlens.class_sensitivity`: the layer and the method's options."""

    what: ClassVar[str] = "class_sensitivity"
    layer: str | None = _unset()
    options: dict[str, Any] = _unset()


@dataclass(frozen=True, repr=False, eq=False)
class TrustSettings(Settings):
    """:func:`convlens.metrics.trust.trust_summary`: the curves' steps and baseline, the class
    threshold, the seed and draws of the random references, the maps whose class check was remade."""

    what: ClassVar[str] = "trust"
    steps: int = _unset()
    baseline: Any = _unset()
    class_threshold: float = _unset()
    seed: int = _unset()
    draws: int = _unset()
    class_maps: list[str] | None = _unset()


@dataclass(frozen=True, repr=False, eq=False)
class CompareSettings(Settings):
    """:func:`convlens.compare`: the curves' settings, the layer and occlusion options, the seed,
    how the references, the sanity and class checks and the ranking were made."""

    what: ClassVar[str] = "compare"
    steps: int = _unset()
    baseline: Any = _unset()
    score: str = _unset()
    probabilities: str = _unset()
    layer: Any = _unset()
    occlusion: dict[str, Any] | None = _unset()
    seed: int = _unset()
    references: dict[str, str] = _unset()
    sanity: dict[str, Any] | None = _unset()
    class_sensitivity: dict[str, Any] = _unset()
    ranking: str = _unset()
    levels: list[str] = _unset()


# -- explain's options, per technique ------------------------------------------------------------
@dataclass(frozen=True, repr=False, eq=False)
class PredictionsOptions(Settings):
    """:func:`convlens.explain`'s ``options={"predictions": {...}}``: how many classes to list."""

    what: ClassVar[str] = "predictions"
    top: int = 5


@dataclass(frozen=True, repr=False, eq=False)
class ActivationsOptions(Settings):
    """``options={"activations": {...}}``: the layers (``"stages"`` or names) and channels per layer shown."""

    what: ClassVar[str] = "activations"
    layers: Any = "stages"
    channels: int = 8


@dataclass(frozen=True, repr=False, eq=False)
class GradcamOptions(Settings):
    """``options={"gradcam": {...}}``: the CAM method and its layer (None: chosen automatically)."""

    what: ClassVar[str] = "gradcam"
    method: str = "gradcam"
    layer: str | None = None


@dataclass(frozen=True, repr=False, eq=False)
class OcclusionOptions(Settings):
    """``options={"occlusion": {...}}``: as :func:`convlens.occlusion` takes them."""

    what: ClassVar[str] = "occlusion"
    patch: Any = 40
    stride: Any = 20
    baseline: Any = 0.0
    score: str = "probability"


@dataclass(frozen=True, repr=False, eq=False)
class FiltersOptions(Settings):
    """``options={"filters": {...}}``: channels per image, the optimisation's knobs, and ``budget``
    (None, or the channels a run may optimise per image on average)."""

    what: ClassVar[str] = "filters"
    channels: int = 4
    steps: int = 128
    size: int = 128
    param: str = "fourier"
    transforms: Any = "standard"
    seed: int = 0
    budget: float | None = None


@dataclass(frozen=True, repr=False, eq=False)
class TrustOptions(Settings):
    """``options={"trust": {...}}``: deletion / insertion steps and baseline, and ``class_maps``
    (None: every map; or the maps whose class sensitivity is remade)."""

    what: ClassVar[str] = "trust"
    steps: int = 16
    baseline: Any = "blur"
    class_maps: list[str] | None = None


#: explain's option groups, in report order; their defaults are :data:`convlens.explain.DEFAULTS`
EXPLAIN_OPTIONS: dict[str, type[Settings]] = {
    "predictions": PredictionsOptions, "activations": ActivationsOptions, "gradcam": GradcamOptions,
    "occlusion": OcclusionOptions, "filters": FiltersOptions, "trust": TrustOptions,
}


def settings_type(method: str) -> type[Settings] | None:
    """The settings class of a map ``method``'s :class:`~convlens.Saliency` (None: a map made elsewhere)."""
    if method == "occlusion":
        return OcclusionSettings
    from .methods.registry import cam_methods

    return CamSettings if method in cam_methods() else None
