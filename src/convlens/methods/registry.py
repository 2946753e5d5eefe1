"""The one registry of map methods: name -> how the map is computed, its title, whether it needs
the gradient. :func:`convlens.grad_cam`, :func:`convlens.compare`, the CLI, the report and the
explorer all read it, so a rule added with :func:`register_cam` is available everywhere.

A CAM rule is a function of the layer's activations ``A`` (N, C, h, w) and the target's gradient
``G = d score / d A`` (same shape), both float32, returning weights ``w``: (N, C) per channel (as
pytorch-grad-cam's ``BaseCAM.get_cam_weights``) or (N, C, h, w) per position (as LayerCAM). The
map is then ``relu(sum_c w_c * A_c)``, upsampled to the input. Score-CAM and EigenCAM have their
own code paths (:mod:`convlens.methods.cam`); occlusion is listed for its title and costs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["register_cam", "unregister_cam", "MapMethodSpec", "method_spec", "cam_methods", "map_methods",
           "gradient_methods", "method_title", "sanity_draws", "METHOD_TITLES", "WeightsFn"]

#: ``weights_fn(activations, gradients) -> weights``, see the module docstring
WeightsFn = Callable[["Tensor", "Tensor"], "Tensor"]
Kind = Literal["gradient", "scorecam", "eigencam", "occlusion"]


@dataclass(frozen=True)
class MapMethodSpec:
    """One map method: ``name`` (what callers and the CLI write), ``title`` (what people read),
    ``kind`` (``"gradient"``: a weights rule on ``A`` and ``G``; ``"scorecam"``, ``"eigencam"``,
    ``"occlusion"``: their own code), the ``weights`` rule of a gradient method, ``draws`` (the
    model re-initialisations its sanity verdict averages: one for methods costing many forwards)
    and ``builtin`` (False for :func:`register_cam`'s)."""

    name: str
    title: str
    kind: Kind
    weights: WeightsFn | None = None
    draws: int = 10
    builtin: bool = True

    @property
    def needs_gradient(self) -> bool:
        return self.kind == "gradient"

    @property
    def instant(self) -> bool:
        """Computed from a cached activation and gradient without a model call (the explorer)."""
        return self.kind in ("gradient", "eigencam")

    @property
    def is_cam(self) -> bool:
        return self.kind != "occlusion"


# -- the built-in weighting rules: (A, G) -> w, formulas in convlens.methods.cam ---------------
def _gradcam(a: Tensor, g: Tensor) -> Tensor:
    return g.mean(dim=(2, 3), keepdim=True)


def _gradcampp(a: Tensor, g: Tensor) -> Tensor:
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + 1e-6)
    alpha = alpha.masked_fill(g == 0, 0.0)
    return (g.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)


def _xgradcam(a: Tensor, g: Tensor) -> Tensor:
    return (g * a / (a.sum(dim=(2, 3), keepdim=True) + 1e-7)).sum(dim=(2, 3), keepdim=True)


def _layercam(a: Tensor, g: Tensor) -> Tensor:
    return g.clamp(min=0)


_REGISTRY: dict[str, MapMethodSpec] = {
    s.name: s
    for s in (
        MapMethodSpec("gradcam", "Grad-CAM", "gradient", _gradcam),
        MapMethodSpec("gradcam++", "Grad-CAM++", "gradient", _gradcampp),
        MapMethodSpec("xgradcam", "XGrad-CAM", "gradient", _xgradcam),
        MapMethodSpec("layercam", "LayerCAM", "gradient", _layercam),
        MapMethodSpec("scorecam", "Score-CAM", "scorecam", draws=1),
        MapMethodSpec("eigencam", "Eigen-CAM", "eigencam"),
        MapMethodSpec("occlusion", "Occlusion", "occlusion", draws=1),
    )
}


def register_cam(name: str, weights_fn: WeightsFn, *, title: str | None = None, replace: bool = False) -> MapMethodSpec:
    """Make a CAM rule available as ``method=name`` in :func:`convlens.grad_cam`,
    :func:`convlens.compare` (``methods=[..., name]``), ``explain``'s Grad-CAM setting, the report,
    the explorer and the CLI (``--method``/``--methods``; load the module that registers it with
    ``--plugin MODULE`` or ``CONVLENS_PLUGINS``).

    Args:
        name: the method's name: letters, digits, ``+``, ``-``, ``_`` or ``.``; not a built-in
            method's name.
        weights_fn: ``weights_fn(activations, gradients) -> weights``: activations and gradients
            (N, C, h, w) float32 on the model's device, weights (N, C) per channel or (N, C, h, w)
            per position; the map is ``relu(sum_c weights_c * activations_c)``.
        title: how people read it (the report, the explorer); default ``name``.
        replace: allow registering ``name`` again (a notebook re-running its cell).
    Returns:
        The registered :class:`MapMethodSpec`.
    Raises:
        ValueError: a bad or taken name, or a ``weights_fn`` that is not callable.

    Example::

        convlens.register_cam("gradsq", lambda a, g: (g ** 2).mean(dim=(2, 3)), title="Grad² CAM")
        cam = convlens.grad_cam(model, image, method="gradsq")
    """
    if not isinstance(name, str) or not name or name == "all" or not all(c.isalnum() or c in "+-_." for c in name):
        raise ValueError(f"a method name is letters, digits, '+', '-', '_' or '.', not 'all'; got {name!r}")
    if not callable(weights_fn):
        raise ValueError(f"weights_fn must be a function (activations, gradients) -> weights, not {weights_fn!r}")
    old = _REGISTRY.get(name)
    if old is not None and (old.builtin or not replace):
        raise ValueError(f"method {name!r} is already registered; choose another name"
                         + ("" if old.builtin else " or pass replace=True"))
    spec = MapMethodSpec(name, title or name, "gradient", weights_fn, builtin=False)
    _REGISTRY[name] = spec
    return spec


def unregister_cam(name: str) -> None:
    """Remove a method :func:`register_cam` added (built-in ones stay); KeyError if there is none."""
    if name not in _REGISTRY or _REGISTRY[name].builtin:
        raise KeyError(f"no registered method {name!r}")
    del _REGISTRY[name]


def method_spec(name: str) -> MapMethodSpec:
    """The registered method ``name``; KeyError when there is none."""
    return _REGISTRY[name]


def cam_methods() -> tuple[str, ...]:
    """The names :func:`convlens.grad_cam` accepts: the built-in ones, then the registered ones."""
    return tuple(n for n, s in _REGISTRY.items() if s.is_cam)


def gradient_methods() -> tuple[str, ...]:
    """The CAM methods computed by a weights rule on the activations and the gradient."""
    return tuple(n for n, s in _REGISTRY.items() if s.needs_gradient)


def map_methods() -> tuple[str, ...]:
    """Every map method :func:`convlens.compare` accepts: the CAM methods and occlusion."""
    return tuple(n for n, s in _REGISTRY.items() if s.is_cam) + tuple(
        n for n, s in _REGISTRY.items() if not s.is_cam)


def sanity_draws(name: str) -> int:
    """Draws of the model's re-initialisation a sanity verdict averages for ``name``: one for the
    methods that cost a full map per draw (many forwards), ten for the gradient ones (a backward
    each) and for anything unregistered."""
    spec = _REGISTRY.get(name)
    return spec.draws if spec is not None else 10


def method_title(name: str) -> str:
    """How people read a method's name (``"gradcam++"`` -> ``"Grad-CAM++"``); ``name`` itself when
    it is not a registered method (a reference row, a callable's name)."""
    spec = _REGISTRY.get(name)
    return spec.title if spec is not None else name


class _Titles(Mapping[str, str]):
    """name -> title of every registered method, read live from the registry."""

    def __getitem__(self, name: str) -> str:
        return _REGISTRY[name].title

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


#: How each method's name is written for people (the report, the trust section, the explorer).
METHOD_TITLES: Mapping[str, str] = _Titles()
