"""Which map to believe, for this model and these images: every method's map judged side by side.

Per method and image: the deletion and insertion AUCs of its map (:mod:`.faithfulness`), its class
sensitivity (rank correlation with its map for the least likely class, :func:`class_sensitivity`),
its sanity-check verdict (rank correlation with its map after the classifier is re-initialised,
:func:`sanity_check` with the classifier step only) and the seconds the map took. Reference rows
give the numbers a scale: per grid of the methods' maps, random maps drawn at that grid and
resized as the maps are (:mod:`.evidence`; several draws, their spread is the noise on one
image), and a centred Gaussian (a centre prior). :meth:`Comparison.verdicts` says in words which
methods to trust, with paired bootstrap intervals over several images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import MODEL_AND_IMAGES, renamed
from ..baselines import Baseline
from ..checks import choose
from ..methods.occlusion import fit_window
from ..methods.registry import map_methods, sanity_draws
from ..models import Classifier, as_classifier
from ..targets import Target
from ._common import MapMethod, make_map
from .comparison import (  # the names compare.py held before the split
    COLUMNS,  # noqa: F401
    THUMB_IMAGES,
    THUMB_SIZE,
    Comparison,
    MethodScores,
    merge,  # noqa: F401
    trusted,  # noqa: F401
)
from .evidence import (
    LEVELS,
    MARGIN_SD,
    REFERENCE_DRAWS,
    RESAMPLES,
    grid_name,
    grid_of,
    random_like,
)
from .faithfulness import deletion_insertion
from .results import PerturbationCurve
from .sanity import (
    CLASS_THRESHOLD,
    SANITY_THRESHOLD,
    cascade_stages,
    class_sensitivity,
    fixed_target,
    per_image_classes,
    sanity_check,
)

__all__ = ["compare", "Comparison", "MethodScores", "reference_map", "DEFAULT_METHODS", "ALL_METHODS", "REFERENCES",
           "DEFAULT_REFERENCES"]

log = logging.getLogger(__name__)



#: Score-CAM is left out of the default: it costs one forward per channel of the layer (1280 on
#: the default model, about two minutes on a 2-core CPU); name it to include it
DEFAULT_METHODS: tuple[MapMethod, ...] = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "occlusion")


#: the built-in map methods (registered ones too: :func:`convlens.methods.registry.map_methods`)
ALL_METHODS: tuple[MapMethod, ...] = map_methods()


#: "random map": per grid of the methods' maps, random maps at that grid resized as the maps are;
#: "centred Gaussian": a centre prior; "random pixels": a per-pixel random map (an optional extra:
#: blurred pixel by pixel it destroys texture everywhere and beats coarse maps on deletion)
Reference = Literal["random map", "centred Gaussian", "random pixels"]


REFERENCES: tuple[Reference, ...] = ("random map", "centred Gaussian", "random pixels")


DEFAULT_REFERENCES: tuple[Reference, ...] = ("random map", "centred Gaussian")




#: occlusion inside a comparison: the windows of ``explain --fast``
OCCLUSION = {"patch": 56, "stride": 28}


def reference_map(kind: Reference, n: int, height: int, width: int, *, seed: int = 0,
                  device: torch.device | str = "cpu") -> Tensor:
    """A reference map, the same for every image: ``"random map"`` (or ``"random pixels"``) uniform
    noise in [0, 1) per pixel of ``height`` x ``width`` (seeded, drawn on the CPU so every device
    gets the same map) or ``"centred Gaussian"``
    ``exp(-((y - cy)^2 + (x - cx)^2) / (2 sigma^2))`` with ``sigma = min(H, W) / 4`` and the
    centre ``((H - 1) / 2, (W - 1) / 2)``.

    Args:
        kind: ``"random map"`` or ``"centred Gaussian"``.
        n: how many images (rows).
        height: the map's height.
        width: the map's width.
        seed: the random map's seed.
        device: where the map goes.
    Returns:
        (n, height, width) float32 on ``device``.
    Raises:
        ValueError: an unknown ``kind``.

    Example::

        reference_map("centred Gaussian", 1, 224, 224)
    """
    if kind in ("random map", "random pixels"):
        g = torch.Generator().manual_seed(seed)  # the same map for every image, however they are batched
        return torch.rand(height, width, generator=g, device="cpu").expand(n, -1, -1).contiguous().to(device)
    if kind == "centred Gaussian":
        y = torch.arange(height, dtype=torch.float32, device="cpu") - (height - 1) / 2
        x = torch.arange(width, dtype=torch.float32, device="cpu") - (width - 1) / 2
        sigma = min(height, width) / 4
        g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
        return g.expand(n, -1, -1).contiguous().to(device)
    raise ValueError(f"unknown reference {kind!r}; choose one of {REFERENCES}")


def _thumb(t: Tensor) -> Tensor:
    """(N, [C,] H, W) -> the first ``THUMB_IMAGES`` at ``THUMB_SIZE`` on the longer side, on the CPU."""
    t = t[:THUMB_IMAGES].detach().float().cpu()
    squeeze = t.dim() == 3
    t = t[:, None] if squeeze else t
    h, w = t.shape[-2:]
    scale = THUMB_SIZE / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = F.interpolate(t, size=size, mode="area") if scale < 1 else t
    return out[:, 0] if squeeze else out


def _reference_rows(clf: Classifier, x: Tensor, grids: dict[str, tuple[str, tuple[int, int], dict[str, Any]]],
                    references: Sequence[Reference], curve_args: dict[str, Any], draws: int,
                    seed: int) -> list[MethodScores]:
    """The reference rows: per grid the random draws (their mean curves and each draw's
    insertion - deletion), then the centred Gaussian."""
    n, _, h, w = x.shape
    rows = []
    specs = dict(grids) if "random map" in references else {}
    if "random pixels" in references:
        specs.setdefault("random pixels", ("pixels", (h, w), {}))
    for name, (kind, grid, opts) in specs.items():
        maps = random_like(kind, grid, (h, w), opts, draws=draws, seed=seed).to(x.device)
        given = {f"draw {k}": maps[k].expand(n, -1, -1) for k in range(draws)}
        curves = deletion_insertion(clf, x, given, **curve_args)
        dels, inss = [c[0] for c in curves.values()], [c[1] for c in curves.values()]

        def mean_curve(cs: list[PerturbationCurve], name: str = name) -> PerturbationCurve:
            scores = torch.stack([c.scores for c in cs]).mean(0)
            return replace(cs[0], method=name, scores=scores, auc=torch.stack([c.auc for c in cs]).mean(0))

        diffs = torch.stack([i.auc - d.auc for d, i in zip(dels, inss)])  # (draws, N)
        rows.append(MethodScores(name, True, mean_curve(dels), mean_curve(inss), draws=diffs))
    if "centred Gaussian" in references:
        m = reference_map("centred Gaussian", n, h, w, device=x.device)
        d, ins = (replace(c, method="centred Gaussian")
                  for c in deletion_insertion(clf, x, {"g": m}, **curve_args)["g"])
        rows.append(MethodScores("centred Gaussian", True, d, ins))
    return rows


@renamed(**MODEL_AND_IMAGES, occlusion=("options", lambda settings: {"occlusion": settings}))
def compare(
    model: nn.Module | Classifier,
    images: Any,
    methods: str | Sequence[MapMethod] = DEFAULT_METHODS,
    *,
    target: Target = None,
    layer: str | None = None,
    steps: int = 16,
    baseline: Baseline = "blur",
    blur_sigma: float | None = None,
    references: Sequence[Reference] = DEFAULT_REFERENCES,
    sanity: bool = True,
    seed: int = 0,
    options: dict[str, dict[str, Any]] | None = None,
    names: Sequence[str] | None = None,
    draws: int = REFERENCE_DRAWS,
) -> Comparison:
    """Judge every method's map on ``images`` (a batch or image sources): per method and image the
    deletion and insertion AUCs (``steps``, ``baseline`` as in :func:`convlens.deletion`), the class
    sensitivity (rank correlation with the map of the least likely class), the sanity verdict (rank
    correlation with the map after the classifier alone is re-initialised, mean of 10 draws; 1 for
    occlusion and Score-CAM, whose maps cost many forwards) and the map's seconds, plus the
    reference rows: ``"random map"`` gives, per grid of the methods' maps (7 x 7 at Grad-CAM's
    layer, occlusion's window grid), ``draws`` random maps at that grid resized to the input as the
    maps are (a row named e.g. ``"random 7x7 map"``, the mean of the draws, their spread the noise
    on one image); ``"centred Gaussian"`` a centre prior; ``"random pixels"`` (optional) per-pixel
    random maps. ``options``: per-method options, e.g. ``{"occlusion": {"patch": 32}}`` (occlusion's
    default patch 56 / stride 28, as ``explain --fast``, scaled to an image smaller than that by
    :func:`convlens.methods.occlusion.fit_window`). A method that raises gets a row with its
    error; the others go on.

    Args:
        model: an ``nn.Module`` or a :class:`convlens.Classifier` (left as it was;
            the sanity check randomises a private copy).
        images: (N, 3, H, W) float tensor (moved to the model's device and dtype), or image(s) that
            :meth:`Classifier.batch` accepts.
        methods: names from ``ALL_METHODS`` or added by :func:`convlens.register_cam` (a list, or
            one comma-separated string; ``"all"``: every one).
        target: one class per image (index or name), default the top-1 class, or a
            :class:`convlens.Region` of a dense output (a segmenter's); not a callable.
        layer: the CAM methods' layer (default: each method's automatic choice; a segmenter's
            backbone, e.g. ``"backbone.layer4"``, rather than its dense head).
        steps: deletion / insertion steps.
        baseline: the deletion / insertion baseline (see :func:`convlens.deletion`).
        blur_sigma: the deletion / insertion ``"blur"`` sigma in pixels (default ``max(H, W) / 22.4``;
            occlusion's own is set in ``options={"occlusion": {"blur_sigma": ...}}``).
        references: reference rows, from ``REFERENCES``.
        sanity: run the sanity check (the classifier re-initialised).
        seed: seeds the sanity check's draws, the random reference maps and the bootstrap.
        options: ``{method name: {option: value}}``, e.g. occlusion's ``patch``, ``stride``,
            ``blur_sigma``.
        names: a name per image for the tables (default ``image 1``, ``image 2``, ...).
        draws: random maps per grid (at least 2, for a spread).
    Returns:
        A :class:`Comparison`: one :class:`MethodScores` per method, then one per reference;
        its tensors (curves, rank correlations) are float32 on the model's device.
    Raises:
        ValueError: an unknown method or reference, a callable or bad target, bad ``steps``,
            ``baseline`` or ``draws``.
        ModelError: the model's output is not (N, classes) logits (nor dense, for a Region).

    Example::

        cmp = convlens.compare(clf, "cat.jpg")
        print(cmp.format_table()); cmp.verdicts()["gradcam"]["level"]

    It is long because the settings it records spell out every reference, threshold and seed that judged
    the maps, and each method's scores are gathered in one guarded step so that one failing method never
    stops the comparison.
    """
    clf: Classifier = as_classifier(model)
    x = clf.batch(images)
    if options and not all(isinstance(v, dict) for v in options.values()):
        raise ValueError("options= is keyed by method, e.g. {'occlusion': {'patch': 32}}")
    per_method = dict(options or {})
    occlusion = per_method.get("occlusion")
    n, _, h, w = x.shape
    methods = choose(methods, map_methods(), "method")
    bad_refs = [r for r in references if r not in REFERENCES]
    if bad_refs:
        raise ValueError(f"unknown reference(s) {bad_refs}; choose from {REFERENCES}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an int of at least 2 (their spread is the noise), got {draws!r}")
    occ = {**OCCLUSION, **(occlusion or {})}
    if not {"patch", "stride"} & set(occlusion or {}):  # the defaults fit any image; a window asked for is kept
        occ["patch"], occ["stride"] = fit_window(occ["patch"], occ["stride"], h, w)
    fixed, resolved, out = fixed_target(clf, x, target)
    indices = list(resolved.indices)
    others = per_image_classes(target, resolved.per_class(out).argmin(1).tolist())  # the least likely class
    head = cascade_stages(clf.model, x, output=clf.output)[0] if sanity else None
    curve_args = {"target": fixed, "steps": steps, "baseline": baseline, "blur_sigma": blur_sigma}
    rows: list[MethodScores] = []
    curves: dict[bytes, tuple[PerturbationCurve, PerturbationCurve]] = {}
    grids: dict[str, tuple[str, tuple[int, int], dict[str, Any]]] = {}
    thumbs: dict[str, Tensor] = {"image": _thumb(clf.denormalise(x[:THUMB_IMAGES]))}
    for method in dict.fromkeys(methods):
        options = occ if method == "occlusion" else dict(per_method.get(method) or {})
        t0 = time.perf_counter()
        try:
            maps, sal = make_map(clf, x, method, fixed, layer=layer, options=options)
            seconds = (time.perf_counter() - t0) / n
            layer = sal.layer if sal is not None else None
            cs = class_sensitivity(clf, x, method, target=fixed, other=others, layer=layer, options={method: options},
                                   original=maps)
            check = None
            if sanity:
                check = sanity_check(clf, x, method, target=fixed, layer=layer, stages=[head], seed=seed,
                                     draws=sanity_draws(method), options={method: options}, original=maps)
            # the same map gives the same curves (Grad-CAM and XGrad-CAM agree exactly at a layer
            # right before global pooling): computed once
            key = maps.detach().cpu().numpy().tobytes()
            if key not in curves:
                given = sal if sal is not None else maps
                curves[key] = deletion_insertion(clf, x, {method: given}, **curve_args)[method]
            d, ins = (replace(c, method=method) for c in curves[key])
            kind, grid, opts = grid_of(sal, (h, w))
            ref = grid_name(kind, grid)
            grids.setdefault(ref, (kind, grid, opts))
            thumbs[method] = _thumb(maps)
            rows.append(MethodScores(
                method, False, d, ins, cs.spearman,
                None if check is None else check.spearman[:, 0], None if check is None else check.passed,
                [seconds] * n, random=ref if "random map" in references else None,
            ))
        except Exception as e:  # noqa: BLE001 -- one failing method never stops the comparison
            log.warning("compare: %s failed: %s", method, e, exc_info=log.isEnabledFor(logging.DEBUG))
            rows.append(MethodScores(method, False, error=f"{type(e).__name__}: {e}"))
        log.info("compare: %s done in %.1f s", method, time.perf_counter() - t0)
    rows += _reference_rows(clf, x, grids, references, curve_args, draws, seed)
    image_names = list(names) if names is not None else [f"image {i + 1}" for i in range(n)]
    return Comparison(
        rows=rows,
        images=image_names,
        target=indices,
        labels=list(resolved.labels),
        model=clf.name,
        settings={
            "steps": steps,
            "baseline": baseline if isinstance(baseline, (int, float, str)) else "tensor",
            "score": "probability",
            "probabilities": "sigmoid (multi-label)" if clf.multi_label else "softmax",
            "layer": layer,
            "occlusion": occ,
            "seed": seed,
            "references": {"random map": f"{draws} draws per grid of the methods' maps, resized as the maps are",
                           "margin": f"{MARGIN_SD:g} standard deviations of the random draws' insertion - deletion "
                                     "(one image)",
                           "bootstrap": f"{RESAMPLES} paired resamples of the images, seed {seed}, 95% percentile "
                                        "interval (several images)"},
            "sanity": {"stage": head, "threshold": SANITY_THRESHOLD, "seed": seed,
                       "draws": {m: sanity_draws(m) for m in methods}} if sanity else None,
            "class_sensitivity": {"other": "least likely class", "threshold": CLASS_THRESHOLD},
            "ranking": "methods passing the sanity and class checks first, then insertion AUC - deletion AUC, "
                       "mean over images",
            "levels": list(LEVELS),
        },
        thumbnails=thumbs,
    )
