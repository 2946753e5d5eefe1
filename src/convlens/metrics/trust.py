"""The numbers behind the report's "How far to trust these maps": for one image, the deletion and
insertion curves of the maps already made (Grad-CAM, occlusion) beside random maps at each map's
own grid and a centred Gaussian, each map's class sensitivity, the model's sanity verdict, and a
verdict per map in plain words."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..display import METHOD_TITLES
from ..methods.registry import sanity_draws
from ..models import Classifier
from ..results import Saliency
from .compare import reference_map
from .evidence import grid_name, grid_of, interval, noise_margin, random_like, verdict
from .faithfulness import deletion_insertion
from .results import SanityCheck, TrustSummary
from .sanity import CLASS_THRESHOLD, cascade_stages, class_sensitivity, sanity_check

__all__ = ["trust_summary", "model_sanity", "NAMES", "TRUST_DRAWS"]

NAMES = METHOD_TITLES  # the method names as people read them (kept under this name for callers)


def _options(sal: Saliency) -> dict[str, Any] | None:
    """The settings that remake an occlusion map (None when its baseline was a tensor)."""
    if sal.method != "occlusion":
        return {}
    s = sal.settings
    if s.get("baseline") == "tensor" or s.get("score") == "custom":
        return None
    return {"patch": s["patch"], "stride": s["stride"], "baseline": s["baseline"], "score": s["score"],
            "blur_sigma": s.get("blur_sigma")}


def model_sanity(clf: Classifier, x: Tensor, sal: Saliency, *, seed: int = 0) -> SanityCheck:
    """The sanity check of ``sal``'s method on ``x`` with the classifier step only (the verdict):
    :func:`sanity_check` with the same layer and target; meant to run once per model and run."""
    head = cascade_stages(clf.model, x, output=clf.output)[0]
    return sanity_check(clf, x, sal.method, target=list(sal.target), layer=sal.layer, stages=[head], seed=seed,
                        draws=sanity_draws(sal.method), options={sal.method: _options(sal) or {}},
                        original=sal)


#: random draws per grid in the report's trust section (compare uses REFERENCE_DRAWS): each costs
#: 2 (steps - 1) forwards per image and grid
TRUST_DRAWS = 4


def trust_summary(
    clf: Classifier,
    x: Tensor,
    maps: Mapping[str, Saliency],
    *,
    sanity: Mapping[str, dict[str, Any]] | None = None,
    steps: int = 16,
    baseline: Any = "blur",
    seed: int = 0,
    class_maps: Collection[str] | None = None,
    draws: int = TRUST_DRAWS,
) -> TrustSummary:
    """Judge the maps of one image: per map, the deletion and insertion curves beside the
    references' (per grid of the maps, ``draws`` random maps at that grid resized as the map is,
    the same for every image, and a centred Gaussian), the class sensitivity (rank correlation
    with the map of the least likely class) and, from ``sanity`` (technique -> the model's
    verdict, see :func:`model_sanity`), whether the method passed; then a verdict per technique
    (:func:`convlens.metrics.evidence.verdict`) and its reasons as findings where it is not
    "trust". ``maps``: technique name -> its :class:`Saliency`; ``class_maps``: the techniques
    whose class sensitivity is computed (default: all; it remakes the map for the other class, for
    occlusion a second occlusion of the image); the others get ``class_rho`` None.

    Example::

        t = trust_summary(clf, x, {"gradcam": cam, "occlusion": occ})
        t.verdicts["gradcam"]["level"], t.plot()

    It is long because the curves of every map and reference come from one call (they share the clean
    and the fully blurred images) and the verdicts are assembled from them here.
    """
    if not maps:
        raise ValueError("no maps to judge: the trust section needs the gradcam or occlusion technique")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an int of at least 2, got {draws!r}")
    n, _, h, w = x.shape
    args = {"steps": steps, "baseline": baseline}
    class_rho: dict[str, float | None] = {}
    others: dict[str, str] = {}
    target = list(next(iter(maps.values())).target)
    grids = {}
    for sal in maps.values():
        kind, grid, opts = grid_of(sal, (h, w))
        grids.setdefault(grid_name(kind, grid), (kind, grid, opts))
    given: dict[str, Any] = dict(maps)
    for ref, (kind, grid, opts) in grids.items():
        rnd = random_like(kind, grid, (h, w), opts, draws=draws, seed=seed).to(x.device)
        for k in range(draws):
            given[f"{ref}#{k}"] = rnd[k].expand(n, -1, -1)
    given["centred Gaussian"] = reference_map("centred Gaussian", n, h, w, device=x.device)
    # one call, so the clean and the fully blurred images are shared by every curve; the
    # references are judged for the maps' class
    raw = deletion_insertion(clf, x, given, target=target, **args)
    curves = {t: raw[t] for t in maps}
    spread: dict[str, Tensor] = {}
    for ref in grids:
        ds = [raw[f"{ref}#{k}"] for k in range(draws)]
        curves[ref] = tuple(replace(ds[0][j], method=ref, scores=torch.stack([p[j].scores for p in ds]).mean(0),
                                    auc=torch.stack([p[j].auc for p in ds]).mean(0)) for j in (0, 1))
        spread[ref] = torch.stack([p[1].auc - p[0].auc for p in ds])[:, 0]
    curves["centred Gaussian"] = tuple(replace(c, method="centred Gaussian") for c in raw["centred Gaussian"])
    for tech, sal in maps.items():
        opts = _options(sal)
        if opts is None or (class_maps is not None and tech not in class_maps):
            class_rho[tech] = None
            continue
        cs = class_sensitivity(clf, x, sal.method, target=list(sal.target), layer=sal.layer, options={sal.method: opts},
                               original=sal)
        class_rho[tech] = float(cs.spearman[0])
        others[tech] = cs.other_labels[0]

    def score(name: str) -> float:
        return float(curves[name][1].auc[0] - curves[name][0].auc[0])

    verdicts: dict[str, dict[str, Any]] = {}
    findings: dict[str, list[str]] = {}
    label = next(iter(maps.values())).labels[0] if next(iter(maps.values())).labels else "the target"
    for tech, sal in maps.items():
        ref = grid_name(*grid_of(sal, (h, w))[:2])
        margin = noise_margin(spread[ref])
        versus = {name: interval(score(tech) - score(name), math.nan, math.nan, margin)
                  for name in (ref, "centred Gaussian")}
        v = (sanity or {}).get(tech)
        verdicts[tech] = verdict(images=1, versus=versus, margin=margin, class_rho=class_rho.get(tech),
                                 sanity_passed=None if v is None else float(v["passed"]),
                                 sanity_rho=None if v is None else v["rho"], class_threshold=CLASS_THRESHOLD)
        if verdicts[tech]["level"] != "trust":
            name = NAMES.get(sal.method, sal.method)
            findings[tech] = [f"{name} on this image: {verdicts[tech]['level']}. " + " ".join(
                r for r in verdicts[tech]["reasons"] if not r.startswith("One image"))]
    return TrustSummary(
        curves=curves,
        class_rho=class_rho,
        other=others,
        sanity=dict(sanity or {}),
        findings=findings,
        target=target,
        labels=[label],
        settings={"steps": steps, "baseline": baseline if isinstance(baseline, (int, float, str)) else "tensor",
                  "class_threshold": CLASS_THRESHOLD, "seed": seed, "draws": draws,
                  "class_maps": None if class_maps is None else sorted(class_maps)},
        verdicts=verdicts,
        spread={k: float(v.double().std()) for k, v in spread.items()},
    )
