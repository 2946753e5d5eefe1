"""The technique runners :func:`convlens.explain.explain` calls (the only place that calls the
techniques), the one forward pass per image that finds its predictions and Grad-CAM layer output,
and the feature-visualisation channel vote of a run over several images (``FOLDER``'s budget).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from .images import ImageSource
from .models import Classifier, Prediction, top_predictions
from .outputs import check_interrupt, printable
from .results import top_channels

log = logging.getLogger("convlens.explain")


# -- the technique runners: the only place that calls the techniques ----------------------
def _run_activations(clf: Classifier, x: Tensor, ctx: dict[str, Any], s: dict[str, Any]) -> Any:
    from .methods.activations import activations

    result = ctx["batched"].get("activations") or activations(clf, x, s["layers"])
    k = int(s["channels"])
    ctx["layers"]["activations"] = list(result.maps)
    ctx["channels"]["activations"] = {
        name: [int(c) for c in np.asarray(_first(result.top_channels(name, k)))] for name in result.maps
    }
    return result


def _run_gradcam(clf: Classifier, x: Tensor, ctx: dict[str, Any], s: dict[str, Any]) -> Any:
    from .methods.cam import grad_cam

    result = ctx["batched"].get("gradcam") or grad_cam(
        clf, x, target=ctx["target"], layer=ctx["cam_layer"], method=s["method"])
    ctx["layers"]["gradcam"] = result.layer
    return result


def _run_occlusion(clf: Classifier, x: Tensor, ctx: dict[str, Any], s: dict[str, Any]) -> Any:
    from .methods.occlusion import fit_window, occlusion

    if ctx["batched"].get("occlusion"):
        return ctx["batched"]["occlusion"]
    patch, stride = fit_window(s["patch"], s["stride"], x.shape[-2], x.shape[-1])
    return occlusion(clf, x, target=ctx["target"], patch=patch, stride=stride, baseline=s["baseline"], score=s["score"])


def _top_channels(act: Tensor, k: int) -> list[int]:
    """The ``k`` channels of a captured (1, C, H, W) layer output with the highest mean."""
    return top_channels(act[:1], k).indices[0].tolist()


def _run_filters(clf: Classifier, x: Tensor, ctx: dict[str, Any], s: dict[str, Any]) -> Any:
    from .methods.activations import activations
    from .methods.featureviz import cached_channels, feature_visualization

    layer = ctx["cam_layer"]
    # "what did the network see here": the channels of the Grad-CAM layer most active on this image
    # (its output was captured in the prediction's forward pass; else one more pass)
    act = ctx.get("cam_act")
    k = int(s["channels"])
    if isinstance(act, Tensor) and act.dim() == 4:
        channels = _top_channels(act, k)
    else:
        channels = [int(c) for c in np.asarray(_first(activations(clf, x, [layer]).top_channels(layer, k)))]
    ctx["layers"]["filters"] = ctx["fv_layer"]
    shared = ctx.get("shared")  # with a budget: the run's channels to optimise, {(layer, channel)}
    if shared is not None:
        cached = cached_channels(clf, ctx["fv_layer"], channels, cache=ctx.get("cache", False), steps=s["steps"],
                                 size=s["size"], param=s["param"], transforms=s["transforms"], seed=s["seed"])
        top, channels = channels, [c for c, hit in zip(channels, cached) if hit or (ctx["fv_layer"], c) in shared]
        left = [c for c in top if c not in channels]
        if left:
            ctx["channels"]["filters_top"] = top
            ctx["notes"].setdefault("filters", []).append(
                f"Several images in this run: feature visualisation draws only the {len(shared)} channels most "
                f"shared among the images' top {k} (about {s['budget']:g} per image) and channels already in the "
                f"cache. This image's top {k} channels are {top}; {len(left)} of them ({left}) are not drawn here. "
                "Explain the image alone, or the folder with --full (full=True), to see them all.")
        if not channels:
            return None
    ctx["channels"]["filters"] = channels
    result = feature_visualization(
        clf, ctx["fv_layer"], channels, steps=s["steps"], size=s["size"], param=s["param"],
        transforms=s["transforms"], seed=s["seed"], cache=ctx.get("cache", False),
    )
    hits = result.settings.get("cache", {}).get("hits", 0)
    if hits:  # channels rendered earlier (another image, another run) and read back bit for bit
        ctx["channels"]["filters_cached"] = hits
    dead = [c for c, d in zip(channels, getattr(result, "dead", [])) if d]
    if dead:
        ctx["channels"]["filters_dead"] = dead
    return result


def _run_trust(clf: Classifier, x: Tensor, ctx: dict[str, Any], s: dict[str, Any]) -> Any:
    """Deletion / insertion of this image's Grad-CAM and occlusion maps beside a random map's, their
    class sensitivity, and the Grad-CAM method's sanity verdict, computed once per model and run
    (on the first image) and shared; plain-words findings go to the notes of the judged technique."""
    from .metrics.trust import NAMES, model_sanity, trust_summary

    maps = {t: ctx["results"][t] for t in ("gradcam", "occlusion") if t in ctx["results"]}
    if not maps:
        raise ValueError("nothing to judge: the gradcam and occlusion techniques failed or did not run")
    sanity = {}
    if "gradcam" in maps:
        cam = maps["gradcam"]
        key = ("sanity", cam.method, cam.layer, tuple(x.shape[1:]))
        if key not in ctx["run"]:
            check = model_sanity(clf, x, cam)
            ctx["run"][key] = {"method": cam.method, "passed": check.passed[0], "rho": float(check.spearman[0, 0]),
                               "stage": check.stages[0], "threshold": check.threshold, "image": ctx["name"],
                               "draws": len(check.settings["draws"][0])}
        sanity["gradcam"] = ctx["run"][key]
    only = s.get("class_maps")
    result = trust_summary(clf, x, maps, sanity=sanity, steps=int(s["steps"]), baseline=s["baseline"],
                           class_maps=only)
    for tech, lines in result.findings.items():
        ctx["notes"].setdefault(tech, []).extend(lines)
    skipped = [NAMES.get(t, t) for t in maps if only is not None and t not in only]
    if skipped:
        ctx["notes"].setdefault("trust", []).append(
            f"Several images in this run: the class sensitivity of {', '.join(skipped)} is not computed (it needs "
            f"a second map of each image) and the curves use {int(s['steps'])} steps; explain the image alone, or "
            "the folder with --full (full=True), for the full check.")
    return result


#: activations whose flat zero region leaves a unit without gradient when optimised from noise
_SATURATING = ("ReLU", "ReLU6", "Hardtanh", "Hardswish", "Hardsigmoid", "Threshold")


def pre_activation_layer(table: Sequence[Any], layer: str) -> str:
    """The module whose output feeds ``layer``'s final activation, when there is one.

    Feature visualisation from noise gets no gradient through a ReLU that is off everywhere, so,
    as lucid does with its ``*_pre_relu`` tensors, the units are optimised before the activation:
    if the last module to run inside ``layer`` is a (once-used) saturating activation and the one
    before it has the same output shape, that one is returned; otherwise ``layer`` itself.
    Channel ``c`` is the same unit either way.
    """
    inside = sorted((r for r in table if r.name.startswith(layer + ".") and r.order >= 0), key=lambda r: r.order)
    if len(inside) >= 2:
        last, before = inside[-1], inside[-2]
        mine = next((r for r in table if r.name == layer), None)
        if (
            last.type in _SATURATING
            and getattr(last, "calls", 1) == 1  # a shared activation's last call may follow an add
            and before.type not in _SATURATING
            and before.shape == last.shape
            and (mine is None or mine.shape == last.shape)
        ):
            return before.name
    return layer


RUNNERS: dict[str, Callable[[Classifier, Tensor, dict[str, Any], dict[str, Any]], Any]] = {
    "activations": _run_activations,
    "gradcam": _run_gradcam,
    "occlusion": _run_occlusion,
    "trust": _run_trust,
    "filters": _run_filters,
}


def _first(channels: Any) -> Any:
    """``top_channels`` for one image: a (k,) sequence, or row 0 of an (N, k) one."""
    a = channels.detach().cpu().numpy() if isinstance(channels, Tensor) else np.asarray(channels)
    return a[0] if a.ndim == 2 else a


def _logits_and_layer(clf: Classifier, x: Tensor, layer: str) -> tuple[Tensor, Tensor | None]:
    """One forward pass: the logits and the output of ``layer`` (for the feature visualisation's
    choice of channels), under the model guard and without autograd."""
    import torch

    from .hooks import LayerCapture, model_guard
    from .layers import resolve_layer
    from .layout import LayerError, layout_for
    from .models import require_logits

    name, module = resolve_layer(clf.model, layer)
    x = clf.batch(x)
    with model_guard(clf.model), torch.no_grad(), LayerCapture({name: module}) as cap:
        out = require_logits(clf.adapt(cap.run(clf.model, x)))  # tuple/dict/.logits outputs too
        act = cap.outputs.get(name)
    if not isinstance(act, Tensor):
        return out, None
    try:  # the map as Grad-CAM reads it (a token layer on its grid)
        act = layout_for(clf, name, module, tuple(act.shape), tuple(x.shape[-2:]), batch=len(x)).apply(act)
    except LayerError:
        return out, None
    return out, act.detach()


def _top(clf: Classifier, logits: Tensor, top: int) -> list[Prediction]:
    """The top-``top`` predictions of the first image, as :meth:`Classifier.predict` gives them."""
    return top_predictions(clf.probabilities(logits[:1]), top, clf.label)[0]


def _layers_for(clf: Classifier, x: Tensor, conf: dict[str, dict[str, Any]],
                cam_layers: dict[tuple[int, ...], tuple[str, str]]) -> tuple[str, str]:
    """The Grad-CAM layer and the feature visualisation's layer for inputs shaped like ``x``
    (found once per input shape and remembered in ``cam_layers``)."""
    shape = tuple(x.shape[1:])
    if shape not in cam_layers:
        from .layers import default_cam_layer, layer_table, resolve_layer

        table = layer_table(clf.model, x)
        cam = conf["gradcam"]["layer"]
        cam = default_cam_layer(clf.model, x, table) if cam is None else resolve_layer(clf.model, cam)[0]
        cam_layers[shape] = (cam, pre_activation_layer(table, cam))
    return cam_layers[shape]


def _load(clf: Classifier, src: ImageSource) -> tuple[Tensor, Any]:
    """The model-ready (1, 3, H, W) input of ``src`` and the PIL image it came from (None for a tensor)."""
    if isinstance(src, Tensor):
        return clf.batch(src), None
    from .images import load_image

    pil = load_image(src)
    return clf.preprocess(pil), pil


def _shared_channels(clf: Classifier, items: Sequence[tuple[str, ImageSource]], conf: dict[str, dict[str, Any]],
                     cam_layers: dict[tuple[int, ...], tuple[str, str]]) -> set[tuple[str, int]]:
    """The channels a run with a feature-visualisation budget optimises: one forward per image
    finds its top channels in the Grad-CAM layer (as :func:`_run_filters` does), and the
    ``ceil(budget * images)`` channels in most images' top lists win (ties: the better summed rank,
    then the lower index). Images that cannot be read are left out (their error comes later)."""

    s = conf["filters"]
    k = int(s["channels"])
    votes: dict[tuple[str, int], list[int]] = {}
    n = 0
    t0 = time.perf_counter()
    for _, src in items:
        try:
            x, _ = _load(clf, src)
            cam, fv = _layers_for(clf, x, conf, cam_layers)
            _, act = _logits_and_layer(clf, x, cam)
        except Exception as e:  # noqa: BLE001 -- the image's own pass records it
            log.debug("feature-visualisation budget: %s left out (%s)", printable(src), e)
            continue
        if isinstance(act, Tensor) and act.dim() == 4:
            n += 1
            for rank, c in enumerate(_top_channels(act, k)):
                votes.setdefault((fv, c), []).append(rank)
        check_interrupt()
    budget = math.ceil(float(s["budget"]) * n)
    ranked = sorted(votes, key=lambda u: (-len(votes[u]), sum(votes[u]), u[1]))
    log.info("feature visualisation: %d of %d different top channels of %d images optimised (budget %g per "
             "image), %.1f s to choose", min(budget, len(ranked)), len(ranked), n, float(s["budget"]),
             time.perf_counter() - t0)
    return set(ranked[:budget])


def _optimise_shared(clf: Classifier, shared: set[tuple[str, int]], s: dict[str, Any], cache: Any) -> float:
    """Optimise a run's shared feature-visualisation channels (see :func:`_shared_channels`) into
    the cache, several per batch (on a 2-core CPU 8 channels in one batch cost 0.54 s each, one
    alone 1.12 s: EfficientNet-Lite0 at the ``--fast`` settings), before the images read them back;
    returns the seconds spent. A batch that fails is left to the images' own calls (which record
    the error)."""
    from .methods.featureviz import feature_visualization

    chunk = 32 if clf.device.type == "cuda" else 8
    t0 = time.perf_counter()
    for layer in sorted({fv for fv, _ in shared}):
        channels = sorted(c for fv, c in shared if fv == layer)
        for start in range(0, len(channels), chunk):
            try:
                feature_visualization(clf, layer, channels[start : start + chunk], steps=s["steps"], size=s["size"],
                                      param=s["param"], transforms=s["transforms"], seed=s["seed"], cache=cache)
            except Exception as e:  # noqa: BLE001 -- each image's own call records it
                log.info("feature visualisation of the shared channels of %s: %s", layer, printable(e))
            check_interrupt()
    return time.perf_counter() - t0
