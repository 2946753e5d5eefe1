"""The numbers behind the report's "How far to trust these maps": for one image, the deletion and
insertion curves of the maps already made (Grad-CAM, occlusion) beside a random map's, each
map's class sensitivity, the model's sanity verdict, and what they mean in plain words."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from torch import Tensor

from ..display import METHOD_TITLES
from ..models import Classifier
from ..results import Saliency
from .compare import reference_map
from .faithfulness import deletion_insertion
from .results import SanityCheck, TrustSummary
from .sanity import CLASS_THRESHOLD, cascade_stages, class_sensitivity, sanity_check

__all__ = ["trust_summary", "model_sanity", "NAMES"]

NAMES = METHOD_TITLES  # the method names as people read them (kept under this name for callers)


def _options(sal: Saliency) -> dict[str, Any] | None:
    """The settings that remake an occlusion map (None when its baseline was a tensor)."""
    if sal.method != "occlusion":
        return {}
    s = sal.settings
    if s.get("baseline") == "tensor" or s.get("score") == "custom":
        return None
    return {"patch": s["patch"], "stride": s["stride"], "baseline": s["baseline"], "score": s["score"]}


def model_sanity(clf: Classifier, x: Tensor, sal: Saliency, *, seed: int = 0) -> SanityCheck:
    """The sanity check of ``sal``'s method on ``x`` with the classifier step only (the verdict):
    :func:`sanity_check` with the same layer and target; meant to run once per model and run."""
    head = cascade_stages(clf.model, x, output=clf.output)[0]
    return sanity_check(clf, x, sal.method, target=list(sal.target), layer=sal.layer, stages=[head], seed=seed,
                        draws=1 if sal.method in ("occlusion", "scorecam") else 10, options=_options(sal) or {},
                        original=sal)


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
) -> TrustSummary:
    """Judge the maps of one image: per map, the deletion and insertion curves (and a random
    map's, the same for every image), the class sensitivity (rank correlation with the map of the
    least likely class) and, from ``sanity`` (technique -> the model's verdict, see
    :func:`model_sanity`), whether the method passed; then a plain-words finding per technique
    where a map should not be trusted. ``maps``: technique name -> its :class:`Saliency`;
    ``class_maps``: the techniques whose class sensitivity is computed (default: all; it remakes
    the map for the other class, for occlusion a second occlusion of the image); the others get
    ``class_rho`` None.

    Example::

        t = trust_summary(clf, x, {"gradcam": cam, "occlusion": occ})
        t.findings, t.plot()
    """
    if not maps:
        raise ValueError("no maps to judge: the trust section needs the gradcam or occlusion technique")
    n, _, h, w = x.shape
    args = {"steps": steps, "baseline": baseline}
    class_rho: dict[str, float | None] = {}
    others: dict[str, str] = {}
    target = list(next(iter(maps.values())).target)
    rnd = reference_map("random map", n, h, w, seed=seed, device=x.device)
    # the random map judged for the maps' class; one call, so the clean and the fully blurred
    # images are shared by every curve
    rnd_sal = Saliency(maps=rnd, raw=rnd, target=target, method="map", layer=None, images=x)
    curves = deletion_insertion(clf, x, {**maps, "random map": rnd_sal}, **args)
    for tech, sal in maps.items():
        opts = _options(sal)
        if opts is None or (class_maps is not None and tech not in class_maps):
            class_rho[tech] = None
            continue
        cs = class_sensitivity(clf, x, sal.method, target=list(sal.target), layer=sal.layer, options=opts,
                               original=sal)
        class_rho[tech] = float(cs.spearman[0])
        others[tech] = cs.other_labels[0]
    rnd_diff = float(curves["random map"][1].auc[0] - curves["random map"][0].auc[0])
    findings: dict[str, list[str]] = {}
    label = next(iter(maps.values())).labels[0] if next(iter(maps.values())).labels else "the target"
    for tech, sal in maps.items():
        name = NAMES.get(sal.method, sal.method)
        lines = []
        verdict = (sanity or {}).get(tech)
        if verdict is not None and not verdict["passed"]:
            lines.append(
                f"For this model, {name}'s map hardly changes when the classifier is replaced by a random one "
                f"(rank correlation {verdict['rho']:.2f}): it shows where the layer is active, not why the model "
                f"chose “{label}”. Do not read it as an explanation."
            )
        rho = class_rho.get(tech)
        if rho is not None and math.isfinite(rho) and rho >= CLASS_THRESHOLD:
            lines.append(
                f"{name}'s map for “{label}” is nearly the same as for the least likely class “{others[tech]}” "
                f"(rank correlation {rho:.2f}): on this image it does not tell the classes apart."
            )
        diff = float(curves[tech][1].auc[0] - curves[tech][0].auc[0])
        if diff <= rnd_diff:
            lines.append(
                f"Removing the pixels {name}'s map ranks highest hurts the prediction no more than removing random "
                f"pixels (insertion − deletion AUC {diff:.3f}, random map {rnd_diff:.3f})."
            )
        if lines:
            findings[tech] = lines
    return TrustSummary(
        curves=curves,
        class_rho=class_rho,
        other=others,
        sanity=dict(sanity or {}),
        findings=findings,
        target=target,
        labels=[label],
        settings={"steps": steps, "baseline": baseline if isinstance(baseline, (int, float, str)) else "tensor",
                  "class_threshold": CLASS_THRESHOLD, "seed": seed,
                  "class_maps": None if class_maps is None else sorted(class_maps)},
    )

