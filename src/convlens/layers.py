"""Layers by dotted name, module or pattern; the layer table; the automatic Grad-CAM layer.

A module can run more than once in one forward pass (torchvision's Bottleneck calls its one
``relu`` three times). A layer name means the module's **last** call (for the Bottleneck's
``relu``: the block's output); ``name#k`` means its k-th call, counted from **1** (``relu#1`` is
the ReLU after ``bn1``). ``convlens layers`` / :func:`layer_table` show how often each module runs.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._compat import IMAGES, renamed
from .hooks import forward_hooks, model_guard
from .layout import LayerError, channels_last_model, class_token_model, map_layout

if TYPE_CHECKING:
    from .models import Classifier

__all__ = [
    "LayerError",
    "LayerInfo",
    "resolve_layer",
    "resolve_layers",
    "layer_table",
    "default_cam_layer",
    "cam_layer_reason",
    "find_stages",
    "map_grid",
    "remembered",
    "forget",
    "split_call",
    "call_counts",
    "missing_layer",
]

log = logging.getLogger(__name__)

LayerSpec = str | nn.Module


@dataclass(frozen=True)
class LayerInfo:
    """One row of the layer table: where a module sits and what it outputs."""

    name: str
    type: str
    shape: tuple[int, ...] | None  # output shape for the traced input; None if it never ran
    params: int
    order: int  # position in execution order (completion of its last call), -1 if it never ran
    calls: int = 0  # how many times the module ran in the traced pass
    layout: str | None = None  # how the output lies on the image (nchw, nhwc, tokens k+hxw); "?" undecided


def split_call(spec: str) -> tuple[str, int | None]:
    """``"name#k"`` -> ``("name", k)`` (k counted from 1); a plain name -> ``("name", None)``, its last call.

    Raises:
        LayerError: a ``#`` not followed by a positive integer, or nothing before it.

    Example::

        split_call("layer4.2.relu#1")   # ("layer4.2.relu", 1)
    """
    name, sep, k = spec.rpartition("#")
    if not sep:
        return spec, None
    if not k.isdigit() or int(k) < 1 or not name:
        raise LayerError(f"{spec!r}: a call is written name#k with k = 1, 2, ... (the k-th call of the module)")
    return name, int(k)


def _named(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name}


def module_and_batch(model: Any, images: Any) -> tuple[nn.Module, Tensor]:
    """The ``nn.Module`` of ``model`` (a module or a Classifier) and ``images`` as its batch, through
    the one resolver :meth:`convlens.Classifier.batch` (a tensor, a path, a PIL image or a list of them)."""
    from .models import as_classifier

    if isinstance(model, nn.Module) and isinstance(images, Tensor):
        return model, images  # the internal calls: a module and its model-ready batch, as given
    clf = as_classifier(model)
    return clf.model, clf.batch(images)


def _module(model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from .models import as_classifier

    return as_classifier(model).model


def resolve_layer(model: nn.Module | Classifier, layer: LayerSpec) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for a dotted ``named_modules`` name, a ``name#k`` call (the name
    is returned with its ``#k``) or a module of ``model``.

    Args:
        model: an ``nn.Module`` or a :class:`convlens.Classifier` (its module).
        layer: a name, ``name#k`` or one of the model's modules.
    Returns:
        The layer's name and its module.
    Raises:
        LayerError: an unknown name (with close matches), a bad ``#k``, a module not in the model,
            or another type.

    Example::

        name, module = resolve_layer(model, "layer4.2")
        name, module = resolve_layer(model, "layer4.2.relu#1")   # ("layer4.2.relu#1", model.layer4[2].relu)
    """
    model = _module(model)
    if isinstance(layer, str) and "#" in layer:
        base, k = split_call(layer)
        return f"{resolve_layer(model, base)[0]}#{k}", resolve_layer(model, base)[1]
    if isinstance(layer, str) and layer:
        try:  # fast path: a walk down the dotted path instead of listing every module
            return layer, model.get_submodule(layer)
        except AttributeError:
            pass
    named = _named(model)
    if isinstance(layer, nn.Module):
        for name, m in named.items():
            if m is layer:
                return name, m
        raise LayerError("that module is not part of the model; pass one of model.named_modules()")
    if not isinstance(layer, str):
        raise LayerError(f"a layer is a name or a module, not {type(layer).__name__}")
    if layer in named:
        return layer, named[layer]
    close = difflib.get_close_matches(layer, list(named), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise LayerError(f"no layer named {layer!r} in the model{hint} (`convlens layers` lists them)")


def resolve_layers(model: nn.Module | Classifier, layers: LayerSpec | Iterable[LayerSpec]) -> dict[str, nn.Module]:
    """Resolve names, modules and glob patterns (``layer*``, ``blocks.?``) into ``{name: module}``.

    A pattern matches dotted names with :func:`fnmatch.fnmatchcase` and must match at least one
    (``"layer4.*.relu#1"``: the first call of each match). Order follows the request, then model
    order within a pattern; duplicates are dropped.

    Args:
        model: an ``nn.Module`` or a :class:`convlens.Classifier` (its module).
        layers: one name, pattern or module, or an iterable of them.
    Returns:
        ``{name: module}`` in that order.
    Raises:
        LayerError: an unknown name, a pattern that matches nothing, a module not in the model, or
            no layers at all.

    Example::

        resolve_layers(resnet, ["layer?", "fc"])   # {"layer1": ..., ..., "layer4": ..., "fc": ...}
    """
    model = _module(model)
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    named = _named(model)
    out: dict[str, nn.Module] = {}
    for spec in layers:
        if isinstance(spec, str) and spec not in named and any(c in spec for c in "*?["):
            pattern, k = split_call(spec)
            hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise LayerError(f"the pattern {spec!r} matches no layer (`convlens layers` lists them)")
            for n in hits:
                out.setdefault(n if k is None else f"{n}#{k}", named[n])
        else:
            name, module = resolve_layer(model, spec)
            out.setdefault(name, module)
    if not out:
        raise LayerError("no layers requested")
    return out


@renamed(x=IMAGES)
def layer_table(model: nn.Module | Classifier, images: Tensor | Any) -> list[LayerInfo]:
    """Run ``model`` once on ``images`` and list every named module with its output shape.

    Rows come in ``named_modules`` order. A module that runs several times is described by its
    last call (shape, ``order``), as a layer name means the last call; ``calls`` says how often it
    ran. ``order`` gives execution order (completion of the last call). The model is left as it
    was (eval mode during the pass, hooks removed). The call counts are remembered for
    :func:`call_counts`.

    Args:
        model: an ``nn.Module`` or a :class:`convlens.Classifier` (its module runs).
        images: (N, C, H, W) model-ready input on the model's device, in its dtype (one image is
            enough), or image(s) that :meth:`Classifier.batch` accepts (path, PIL image, list of them).
    Returns:
        One :class:`LayerInfo` per named module (``shape`` None for a module that never ran or
        returns no tensor). An error of the model's forward on ``images`` propagates.

    Example::

        rows = layer_table(torchvision.models.resnet50(), torch.zeros(1, 3, 224, 224))
        [r.calls for r in rows if r.name == "layer4.2.relu"]   # [3]
    """
    model, x = module_and_batch(model, images)
    named = _named(model)
    shapes: dict[str, tuple[int, ...] | None] = {}
    done: dict[str, int] = {}
    counts: dict[str, int] = {}
    tick = [0]

    def make(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            tick[0] += 1
            done[name] = tick[0]
            counts[name] = counts.get(name, 0) + 1
            shapes[name] = tuple(output.shape) if isinstance(output, Tensor) else None

        return hook

    with model_guard(model), forward_hooks() as add, torch.no_grad():
        for name, m in named.items():
            add(m, make(name))
        model(x)
    order = {name: i for i, name in enumerate(sorted(done, key=done.__getitem__))}
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    channels_last = channels_last_model(model)
    _REMEMBERED.setdefault(model, {})[("calls", tuple(x.shape[1:]))] = dict(counts)
    return [
        LayerInfo(
            name=name,
            type=type(m).__name__,
            shape=shapes.get(name),
            params=sum(p.numel() for p in m.parameters()),
            order=order.get(name, -1),
            calls=counts.get(name, 0),
            layout=_layout_name(model, name, m, shapes.get(name), hw, int(x.shape[0]), channels_last),
        )
        for name, m in named.items()
    ]


def _layout_name(model: nn.Module, name: str, module: nn.Module, shape: tuple[int, ...] | None,
                 hw: tuple[int, int], batch: int, channels_last: bool | None = None) -> str | None:
    """The table's layout column: None for no map (a vector, no tensor), "?" when undecided."""
    if shape is None or len(shape) not in (3, 4):
        return None
    try:
        return map_layout(model, name, module, shape, hw, batch=batch, channels_last=channels_last).describe()
    except LayerError:
        return "?"


def map_grid(r: LayerInfo) -> tuple[int, int] | None:
    """A :class:`LayerInfo` row's map grid (h, w) from its layout, None when it is no map of the image."""
    if r.shape is None or r.layout is None or r.layout == "?":
        return None
    if r.layout == "nchw":
        return r.shape[2], r.shape[3]
    if r.layout == "nhwc":
        return r.shape[1], r.shape[2]
    h, _, w = r.layout.rpartition("+")[2].partition("x")
    return int(h), int(w)


def call_counts(model: nn.Module, x: Tensor) -> dict[str, int]:
    """How many times each named module runs on inputs shaped like ``x`` (one traced pass, then
    remembered per model and input shape; :func:`layer_table` fills the same memo).

    Args:
        model: the model.
        x: (N, C, H, W) model-ready input on the model's device (its first image is traced).
    Returns:
        ``{name: calls}`` for every named module that ran.

    Example::

        call_counts(resnet50, x)["layer4.2.relu"]   # 3
    """
    key = ("calls", tuple(x.shape[1:]))
    memo = _REMEMBERED.get(model)
    if memo is None or key not in memo:
        layer_table(model, x[:1])
    return _REMEMBERED[model][key]


def missing_layer(name: str, counts: dict[str, int]) -> LayerError:
    """The error for a captured layer that never produced its output: it did not run, or ran
    fewer times than ``name#k`` asks for."""
    base, k = split_call(name)
    n = counts.get(name, 0)
    if k is not None and n:
        return LayerError(f"{base} runs {n} time(s) in the forward pass; there is no call #{k}")
    return LayerError(f"layer {name!r} did not run in the forward pass")


@renamed(x=IMAGES)
def default_cam_layer(
    model: nn.Module | Classifier, images: Tensor | Any, table: Sequence[LayerInfo] | None = None
) -> str:
    """The automatic Grad-CAM layer.

    A CNN: the last module (in execution order) whose output is a map with more than one
    position, i.e. the last feature map before global pooling (a stage and its last block share
    that map; the stage finishes last, so ``layer4`` is chosen rather than ``layer4.2``). A
    class-token model (timm ViT/DeiT with ``global_pool="token"``): the last block's input norm
    ``blocks[-1].norm1``, since the final block's patch tokens never reach the class token (their
    gradient is zero). A pooled-token or channels-last model (EVA-02 with average pooling, Swin):
    its last declared stage (``blocks[-1]``, ``layers[-1]``). The choice and its reason
    (:func:`cam_layer_reason`) are logged.

    Args:
        model: an ``nn.Module`` or a :class:`convlens.Classifier` (its module).
        images: (N, C, H, W) model-ready input on the model's device (one image is enough), or
            image(s) that :meth:`Classifier.batch` accepts.
        table: the model's :func:`layer_table` for ``images``, when the caller has it.
    Returns:
        The layer's name.
    Raises:
        LayerError: no layer outputs a map of the image.

    Example::

        default_cam_layer(torchvision.models.resnet18(), torch.zeros(1, 3, 224, 224))   # "layer4"
        default_cam_layer(timm.create_model("vit_tiny_patch16_224"), x)                 # "blocks.11.norm1"
    """
    model, x = module_and_batch(model, images)
    table = layer_table(model, x) if table is None else table
    info = {r.name: r for r in table}
    name = None
    if class_token_model(model):  # the last block's input norm (timm's norm1, Hugging Face's layernorm_before)
        norms = [r for r in table if r.name.endswith(_BLOCK_INPUT_NORMS) and r.order >= 0 and map_grid(r) is not None]
        name = max(norms, key=lambda r: r.order).name if norms else None
    declared = _declared_stages(model)
    if name is None and declared and declared[-1] in info and info[declared[-1]].layout not in (None, "?", "nchw"):
        name = declared[-1]
    if name is None:
        spatial = [
            r for r in table
            if (g := map_grid(r)) is not None and g[0] * g[1] > 1
            and not r.type.startswith("Adaptive")  # VGG's 7x7 adaptive pool only re-shapes the map
        ]
        if not spatial:
            raise LayerError(
                "the model has no layer with a spatial map of the image (N, C, h, w or tokens); pass layer= explicitly"
            )
        # containers finish after their children, so the latest finisher is the outermost name
        name = max(spatial, key=lambda r: r.order).name
    why = cam_layer_reason(model, name)
    log.info("automatic target layer: %s%s", name, f" ({why})" if why else "")
    return name


_BLOCK_INPUT_NORMS = (".norm1", ".layernorm_before")


def cam_layer_reason(model: nn.Module, name: str) -> str | None:
    """Why :func:`default_cam_layer` chose ``name`` for a token model (None for a CNN's last map)."""
    if class_token_model(model) and name.endswith(_BLOCK_INPUT_NORMS):
        return (
            "a class-token model: the final block's patch tokens do not reach the class token, so their "
            "gradients are zero; the last block's input norm holds the tokens the class token attends to"
        )
    if name in _declared_stages(model) and not class_token_model(model):
        kind = "channels-last" if str(getattr(model, "output_fmt", "")).upper() == "NHWC" else "pooled-token"
        if hasattr(model, "num_prefix_tokens") or kind == "channels-last":
            return f"a {kind} model: the last stage's output, which the pooled head reads at every position"
    return None


def find_stages(model: nn.Module, x: Tensor, table: Sequence[LayerInfo] | None = None) -> list[str]:
    """The model's stage outputs: the modules a timm model declares in its ``feature_info``
    (EfficientNet -> ``blocks.0, .1, .2, .4, .6``, ResNet -> ``act1, layer1 .. layer4``), else
    the last map at each spatial resolution, found from the model's structure and the shapes of
    one pass on ``x`` as follows.

    The trunk is the model's children in execution order, where a child whose children output
    maps at three or more spatial sizes (a backbone container: VGG's ``features``, timm's
    ``blocks``) is replaced by its children, recursively; anything else (ResNet's ``layer2``,
    DenseNet's transitions, ConvNeXt's downsampling layers) is one unit. A stage is the last
    unit before the spatial size changes, counted when its run of units holds parameters (a
    lone pooling layer is no stage) and its map has more than one position; adaptive pools are
    left out. ResNet-50 -> ``relu, layer1 .. layer4`` (the spec's five), VGG -> the ReLU before
    each pooling, MobileNetV2 -> ``features.1, .3, .6, .13`` and the head ``features.18``.

    Args:
        model: the model.
        x: (N, C, H, W) model-ready input on the model's device (one image is enough).
        table: the model's :func:`layer_table` for ``x``, when the caller has it.
    Returns:
        Module names, shallowest first.
    Raises:
        LayerError: no stage outputs (4-D maps) are found.

    Example::

        find_stages(torchvision.models.resnet50(), torch.zeros(1, 3, 224, 224))
    """
    table = layer_table(model, x) if table is None else table
    info = {r.name: r for r in table}

    def ran(name: str) -> bool:
        return name in info and info[name].order >= 0

    declared = _declared_stages(model)
    if declared and all(ran(n) and map_grid(info[n]) is not None for n in declared):
        log.info("stage outputs (the model's feature_info): %s", ", ".join(declared))
        return declared

    def called(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        # the nearest descendants that ran: containers never called themselves (a ModuleList
        # of stages) are looked through
        out: list[tuple[str, nn.Module]] = []
        for n, child in module.named_children():
            out += [(prefix + n, child)] if ran(prefix + n) else called(f"{prefix}{n}.", child)
        return out

    def trunk(prefix: str, module: nn.Module) -> list[str]:
        kids = sorted(called(prefix, module), key=lambda nc: info[nc[0]].order)
        out: list[str] = []
        for name, child in kids:
            grand = [g for g, _ in called(f"{name}.", child)]
            # a backbone container, or one whose own output is no map (a Hugging Face model
            # returning a ModelOutput): its parts are the units
            if len({_hw(info[g].shape) for g in grand} - {None}) >= 3 or (grand and _hw(info[name].shape) is None):
                out += trunk(f"{name}.", child)
            else:
                out.append(name)
        return out

    units = [
        n for n in trunk("", model)
        if not info[n].type.startswith("Adaptive")
    ]
    stages: list[str] = []
    run: list[str] = []
    for i, name in enumerate(units):
        run.append(name)
        hw = _hw(info[name].shape)
        if i + 1 < len(units) and _hw(info[units[i + 1]].shape) == hw:
            continue
        if hw is not None and hw[0] * hw[1] > 1 and any(info[r].params for r in run):
            stages.append(name)
        run = []
    if not stages:
        raise LayerError("found no stage outputs (4-D maps) in the model; name the layers explicitly")
    log.info("stage outputs: %s", ", ".join(stages))
    return stages


def _declared_stages(model: nn.Module) -> list[str]:
    """Module names from timm's ``feature_info`` (a list of dicts or a ``FeatureInfo``), deduplicated."""
    info = getattr(model, "feature_info", None)
    try:
        names = info.module_name() if hasattr(info, "module_name") else [f["module"] for f in info or ()]
    except (TypeError, KeyError):
        return []
    return list(dict.fromkeys(n for n in names if isinstance(n, str) and n))


def _hw(shape: tuple[int, ...] | None) -> tuple[int, int] | None:
    return (shape[2], shape[3]) if shape is not None and len(shape) == 4 else None


_REMEMBERED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def remembered(model: nn.Module, key: Hashable, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per ``(model, key)``: automatic layer choices cost a traced pass, which
    must not be paid again on every call. The memo dies with the model; :func:`forget` drops
    it (callers do when a remembered layer name no longer resolves)."""
    memo = _REMEMBERED.setdefault(model, {})
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def forget(model: nn.Module) -> None:
    """Drop what :func:`remembered` holds for ``model``."""
    _REMEMBERED.pop(model, None)
