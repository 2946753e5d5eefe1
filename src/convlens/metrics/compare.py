"""Which map to believe, for this model and these images: every method's map judged side by side.

Per method and image: the deletion and insertion AUCs of its map (:mod:`.faithfulness`), its class
sensitivity (rank correlation with its map for the least likely class, :func:`class_sensitivity`),
its sanity-check verdict (rank correlation with its map after the classifier is re-initialised,
:func:`sanity_check` with the classifier step only) and the seconds the map took. Two reference
rows, a per-pixel random map and a centred Gaussian, give the numbers a scale: a method whose
insertion AUC is no better than the random map's has found nothing.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..baselines import Baseline
from ..checks import choose
from ..display import rich_display
from ..models import Classifier, as_classifier
from ..targets import Target
from ._common import MapMethod, make_map
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

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["compare", "Comparison", "MethodScores", "reference_map", "DEFAULT_METHODS", "ALL_METHODS", "REFERENCES"]

log = logging.getLogger(__name__)

#: Score-CAM is left out of the default: it costs one forward per channel of the layer (1280 on
#: the default model, about two minutes on a 2-core CPU); name it to include it
DEFAULT_METHODS: tuple[MapMethod, ...] = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "occlusion")
ALL_METHODS: tuple[MapMethod, ...] = ("gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "eigencam",
                                      "occlusion")
Reference = Literal["random map", "centred Gaussian"]
REFERENCES: tuple[Reference, ...] = ("random map", "centred Gaussian")
#: occlusion inside a comparison: the windows of ``explain --fast``
OCCLUSION = {"patch": 56, "stride": 28}
#: draws of the classifier's re-initialisation for the verdict; one for the methods that cost a
#: full map per draw (many forwards), ten for the gradient ones (a backward each)
SANITY_DRAWS = {"occlusion": 1, "scorecam": 1}


def reference_map(kind: Reference, n: int, height: int, width: int, *, seed: int = 0,
                  device: torch.device | str = "cpu") -> Tensor:
    """A reference map, the same for every image: ``"random map"`` uniform noise in [0, 1) per
    pixel (seeded, drawn on the CPU so every device gets the same map) or ``"centred Gaussian"``
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
    if kind == "random map":
        g = torch.Generator().manual_seed(seed)  # the same map for every image, however they are batched
        return torch.rand(height, width, generator=g).expand(n, -1, -1).contiguous().to(device)
    if kind == "centred Gaussian":
        y = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
        x = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
        sigma = min(height, width) / 4
        g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
        return g.expand(n, -1, -1).contiguous().to(device)
    raise ValueError(f"unknown reference {kind!r}; choose one of {REFERENCES}")


@rich_display
@dataclass(frozen=True, eq=False)
class MethodScores:
    """One row of a comparison: a method (or a reference map) on every image.

    ``deletion`` / ``insertion`` the curves; ``class_rho`` (N,) rank correlation between the maps of
    the target and of the least likely class (None for references); ``sanity_rho`` (N,) rank
    correlation with the map after the classifier is re-initialised and ``sanity_passed``;
    ``seconds`` (N,) time to make the map; ``error`` why the method failed, if it did.
    """

    method: str
    reference: bool = False
    deletion: PerturbationCurve | None = field(default=None, repr=False)
    insertion: PerturbationCurve | None = field(default=None, repr=False)
    class_rho: Tensor | None = field(default=None, repr=False)
    sanity_rho: Tensor | None = field(default=None, repr=False)
    sanity_passed: list[bool] | None = None
    seconds: list[float] = field(default_factory=list)
    error: str | None = None


def _stat(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def trusted(summary: dict[str, Any]) -> bool:
    """A summary row not shown untrustworthy: it passes the sanity check on at least half of the
    images (or was not checked) and is not shown to ignore the class."""
    passed = summary.get("sanity_passed")
    return (passed is None or passed >= 0.5) and summary.get("class_discriminative") is not False


@rich_display
@dataclass(frozen=True, eq=False)
class Comparison:
    """What :func:`compare` found: one :class:`MethodScores` per method, then the references.

    :meth:`summary` gives mean and spread per method over the images and the ranking (by
    insertion AUC minus deletion AUC, higher is better); :meth:`format_table` the terminal table;
    :meth:`save` writes ``compare.csv``, ``compare.json``, ``compare.png`` and ``compare.html``.
    """

    rows: list[MethodScores]
    images: list[str]
    target: list[int]
    labels: list[str]
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def _repr_lines(self) -> list[str]:
        return [f"Comparison({len(self.rows)} rows, {len(self.images)} images, ranking={self.ranking()})"]

    def row(self, method: str) -> MethodScores:
        """The row of ``method``."""
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"no row {method!r}; have {[r.method for r in self.rows]}")

    def per_image(self) -> list[dict[str, Any]]:
        """One record per (image, row): AUCs, class sensitivity, sanity, seconds."""
        out = []
        for r in self.rows:
            for i, name in enumerate(self.images):
                rec: dict[str, Any] = {"image": name, "method": r.method, "reference": r.reference,
                                       "target": self.labels[i] if i < len(self.labels) else None}
                if r.error:
                    rec["error"] = r.error
                    out.append(rec)
                    continue
                d, ins = float(r.deletion.auc[i]), float(r.insertion.auc[i])
                rec.update({
                    "deletion_auc": d,
                    "insertion_auc": ins,
                    "difference": ins - d,
                    "class_sensitivity": None if r.class_rho is None else float(r.class_rho[i]),
                    "sanity_rho": None if r.sanity_rho is None else float(r.sanity_rho[i]),
                    "sanity_passed": None if r.sanity_passed is None else bool(r.sanity_passed[i]),
                    "seconds": r.seconds[i] if i < len(r.seconds) else None,
                })
                out.append(rec)
        return out

    def summary(self) -> list[dict[str, Any]]:
        """Per row: mean and standard deviation over the images of every number, the share of
        images passing the sanity check, whether the method is class-discriminative (mean class
        sensitivity below the threshold) and its rank: methods that pass the sanity check on most
        images and are not shown to ignore the class come first, each group ordered by insertion -
        deletion (a map that fails either test can still score well on the curves: Grad-CAM++ on
        the default model does; references are not ranked)."""
        recs = self.per_image()
        out = []
        for r in self.rows:
            mine = [x for x in recs if x["method"] == r.method and "error" not in x]
            s: dict[str, Any] = {"method": r.method, "reference": r.reference, "images": len(mine)}
            if r.error:
                s["error"] = r.error
            for key in ("deletion_auc", "insertion_auc", "difference", "class_sensitivity", "sanity_rho", "seconds"):
                vals = [x[key] for x in mine if x.get(key) is not None]
                s[key], s[key + "_std"] = _stat(vals) if vals else (None, None)
            passed = [x["sanity_passed"] for x in mine if x.get("sanity_passed") is not None]
            s["sanity_passed"] = None if not passed else sum(passed) / len(passed)
            cs = s["class_sensitivity"]
            s["class_discriminative"] = None if cs is None or not math.isfinite(cs) else cs < CLASS_THRESHOLD
            out.append(s)
        ranked = sorted((s for s in out if not s["reference"] and s.get("difference") is not None),
                        key=lambda s: (not trusted(s), -s["difference"]))
        for k, s in enumerate(ranked, 1):
            s["rank"] = k
        return out

    def ranking(self) -> list[str]:
        """The methods, best first: trustworthy ones (see :meth:`summary`) before the others, then by
        insertion AUC - deletion AUC, mean over the images."""
        return [s["method"] for s in sorted(self.summary(), key=lambda s: s.get("rank", 1e9)) if "rank" in s]

    def discriminative(self) -> list[str]:
        """The methods whose mean class sensitivity is below the threshold."""
        return [s["method"] for s in self.summary() if s.get("class_discriminative")]

    def verdicts(self) -> list[str]:
        """Plain-words findings: which methods fail the sanity check, which are not
        class-discriminative, which do no better than the random map."""
        summ = {s["method"]: s for s in self.summary()}
        rnd = summ.get("random map", {}).get("difference")
        lines = []
        for s in summ.values():
            if s["reference"]:
                continue
            m = s["method"]
            if s.get("error"):
                lines.append(f"{m}: failed ({s['error']})")
                continue
            if s.get("sanity_passed") is not None and s["sanity_passed"] < 1:
                lines.append(
                    f"{m}: fails the sanity check (rank correlation {s['sanity_rho']:.2f} with its map after the "
                    f"classifier is re-initialised, threshold {SANITY_THRESHOLD:g}): it shows what the layer "
                    "sees, not why the model chose the class"
                )
            if s.get("class_discriminative") is False:
                lines.append(
                    f"{m}: not class-discriminative (its maps for the target and for the least likely class have "
                    f"rank correlation {s['class_sensitivity']:.2f})"
                )
            if rnd is not None and s.get("difference") is not None and s["difference"] <= rnd:
                lines.append(f"{m}: its map orders pixels no better than a random map (insertion - deletion "
                             f"{s['difference']:.3f} vs {rnd:.3f})")
        return lines

    def format_table(self) -> str:
        """The summary as a fixed-width text table, the verdicts below it."""
        n = len(self.images)
        head = ["method", "deletion AUC (lower better)", "insertion AUC (higher better)", "ins - del",
                "class rho", "sanity rho", "sanity", "map s", "rank"]
        rows = []
        for s in self.summary():
            if s.get("error"):
                rows.append([s["method"], f"failed: {s['error'][:60]}"] + [""] * (len(head) - 2))
                continue

            def f(key: str, digits: int = 3, s: dict[str, Any] = s) -> str:
                v, sd = s.get(key), s.get(key + "_std")
                if v is None or not math.isfinite(v):
                    return "-"
                return f"{v:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 and sd is not None else "")

            sanity = "-" if s["sanity_passed"] is None else (
                ("pass" if s["sanity_passed"] == 1 else "FAIL") if n == 1 else f"{s['sanity_passed']:.0%} pass")
            rows.append([s["method"] + (" (reference)" if s["reference"] else ""), f("deletion_auc"),
                         f("insertion_auc"), f("difference"), f("class_sensitivity", 2), f("sanity_rho", 2), sanity,
                         f("seconds", 2), str(s.get("rank", ""))])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        disc = self.discriminative()
        lines.append("")
        lines.append(f"class-discriminative for {self.model or 'this model'}: {', '.join(disc) if disc else 'none'}")
        lines.append("ranking (passing sanity and class checks first, then insertion - deletion): "
                     + " > ".join(self.ranking()))
        lines += [f"- {v}" for v in self.verdicts()]
        return "\n".join(lines)

    def to_csv(self) -> str:
        """The per-image records as CSV text."""
        keys = ["image", "method", "reference", "target", "deletion_auc", "insertion_auc", "difference",
                "class_sensitivity", "sanity_rho", "sanity_passed", "seconds", "error"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for rec in self.per_image():
            w.writerow(rec)
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data: settings, per-image records, summary, ranking, verdicts,
        and the mean curves."""
        curves = {}
        for r in self.rows:
            if r.error:
                continue
            curves[r.method] = {"deletion": r.deletion.scores.mean(0).tolist(),
                                "insertion": r.insertion.scores.mean(0).tolist()}
        first = next((r for r in self.rows if not r.error), None)
        return {
            "model": self.model,
            "images": self.images,
            "targets": [{"index": t, "label": lab} for t, lab in zip(self.target, self.labels)],
            "settings": self.settings,
            "fractions": None if first is None else first.deletion.fractions.tolist(),
            "summary": self.summary(),
            "ranking": self.ranking(),
            "class_discriminative": self.discriminative(),
            "verdicts": self.verdicts(),
            "per_image": self.per_image(),
            "mean_curves": curves,
        }

    def plot(self) -> Figure:
        """Deletion and insertion curves of every row, averaged over the images."""
        from ..plotting import plot_comparison

        return plot_comparison(self)

    def save(self, directory: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        """Write ``compare.csv``, ``compare.json``, ``compare.png`` and ``compare.html`` into
        ``directory`` (each atomically; a file convlens did not write is refused unless ``force``);
        returns the paths."""
        from .. import outputs
        from ..report import comparison_html, to_json

        d = Path(directory)
        png = outputs.to_bytes(outputs.figure_writer(self.plot(), 110))
        return outputs.save_files([
            (d / "compare.csv", self.to_csv().encode()),
            (d / "compare.json", to_json(self.to_dict()).encode()),
            (d / "compare.png", png),
            (d / "compare.html", comparison_html(self, png).encode()),
        ], force=force)


def merge(parts: Sequence[Comparison]) -> Comparison:
    """One comparison from several (e.g. one per image of a folder): rows joined by method.

    Args:
        parts: comparisons of the same methods (as :func:`compare` returns them), in image order.
    Returns:
        A :class:`Comparison` over all their images (the first part's settings); a method that
        failed in any part keeps that part's error.
    Raises:
        ValueError: no parts.
        KeyError: a part without one of the first part's rows.
    """
    if not parts:
        raise ValueError("nothing to merge")
    if len(parts) == 1:
        return parts[0]
    rows = []
    for r0 in parts[0].rows:
        same = [p.row(r0.method) for p in parts]
        err = next((r.error for r in same if r.error), None)
        if err:
            rows.append(MethodScores(r0.method, r0.reference, error=err))
            continue

        def cat_curves(kind: str, same: list[MethodScores] = same) -> PerturbationCurve:
            cs = [getattr(r, kind) for r in same]
            c0 = cs[0]
            return PerturbationCurve(kind=c0.kind, fractions=c0.fractions, scores=torch.cat([c.scores for c in cs]),
                                     auc=torch.cat([c.auc for c in cs]), target=sum((c.target for c in cs), []),
                                     method=c0.method, labels=sum((c.labels for c in cs), []), settings=c0.settings)

        def cat(name: str, same: list[MethodScores] = same) -> Tensor | None:
            vals = [getattr(r, name) for r in same]
            return None if vals[0] is None else torch.cat(vals)

        rows.append(MethodScores(
            r0.method, r0.reference, cat_curves("deletion"), cat_curves("insertion"), cat("class_rho"),
            cat("sanity_rho"), None if r0.sanity_passed is None else sum((r.sanity_passed for r in same), []),
            sum((r.seconds for r in same), []),
        ))
    return Comparison(rows=rows, images=sum((p.images for p in parts), []), target=sum((p.target for p in parts), []),
                      labels=sum((p.labels for p in parts), []), model=parts[0].model, settings=parts[0].settings)


def compare(
    model_or_classifier: nn.Module | Classifier,
    x: Any,
    methods: str | Sequence[MapMethod] = DEFAULT_METHODS,
    *,
    target: Target = None,
    layer: str | None = None,
    steps: int = 16,
    baseline: Baseline = "blur",
    references: Sequence[Reference] = REFERENCES,
    sanity: bool = True,
    seed: int = 0,
    occlusion: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
) -> Comparison:
    """Judge every method's map on ``x`` (a batch or image sources): per method and image the
    deletion and insertion AUCs (``steps``, ``baseline`` as in :func:`convlens.deletion`), the
    class sensitivity (rank correlation with the map of the least likely class), the sanity
    verdict (rank correlation with the map after the classifier alone is re-initialised, mean of
    10 draws; 1 for occlusion and Score-CAM, whose maps cost many forwards) and the map's seconds,
    plus the reference rows (``"random map"``, ``"centred Gaussian"``). ``occlusion``: its
    settings (default patch 56 / stride 28, as ``explain --fast``). A method that raises gets a
    row with its error; the others go on.

    Args:
        model_or_classifier: an ``nn.Module`` or a :class:`convlens.Classifier` (left as it was;
            the sanity check randomises a private copy).
        x: (N, 3, H, W) float tensor (moved to the model's device and dtype), or image(s) that
            :meth:`Classifier.batch` accepts.
        methods: names from ``ALL_METHODS`` (a list, or one comma-separated string; ``"all"``).
        target: one class per image (index or name), default the top-1 class, or a
            :class:`convlens.Region` of a dense output (a segmenter's); not a callable.
        layer: the CAM methods' layer (default: each method's automatic choice; a segmenter's
            backbone, e.g. ``"backbone.layer4"``, rather than its dense head).
        steps: deletion / insertion steps.
        baseline: the deletion / insertion baseline (see :func:`convlens.deletion`).
        references: reference rows, from ``REFERENCES``.
        sanity: run the sanity check (the classifier re-initialised).
        seed: seeds the sanity check's draws and the random reference map.
        occlusion: occlusion's settings (``patch``, ``stride``, ...).
        names: a name per image for the tables (default ``image 1``, ``image 2``, ...).
    Returns:
        A :class:`Comparison`: one :class:`MethodScores` per method, then one per reference;
        its tensors (curves, rank correlations) are float32 on the model's device.
    Raises:
        ValueError: an unknown method or reference, a callable or bad target, bad ``steps`` or
            ``baseline``.
        ModelError: the model's output is not (N, classes) logits (nor dense, for a Region).

    Example::

        cmp = convlens.compare(clf, "cat.jpg")
        print(cmp.format_table()); cmp.save("compare-out")
    """
    clf: Classifier = as_classifier(model_or_classifier)
    x = clf.batch(x)
    n, _, h, w = x.shape
    methods = choose(methods, ALL_METHODS, "method")
    bad_refs = [r for r in references if r not in REFERENCES]
    if bad_refs:
        raise ValueError(f"unknown reference(s) {bad_refs}; choose from {REFERENCES}")
    occ = {**OCCLUSION, **(occlusion or {})}
    fixed, resolved, out = fixed_target(clf, x, target)
    indices = list(resolved.indices)
    others = per_image_classes(target, resolved.per_class(out).argmin(1).tolist())  # the least likely class
    head = cascade_stages(clf.model, x, output=clf.output)[0] if sanity else None
    curve_args = {"target": fixed, "steps": steps, "baseline": baseline}
    rows: list[MethodScores] = []
    curves: dict[bytes, tuple[PerturbationCurve, PerturbationCurve]] = {}
    for method in dict.fromkeys(methods):
        options = occ if method == "occlusion" else {}
        t0 = time.perf_counter()
        try:
            maps, sal = make_map(clf, x, method, fixed, layer=layer, options=options)
            seconds = (time.perf_counter() - t0) / n
            layer = sal.layer if sal is not None else None
            cs = class_sensitivity(clf, x, method, target=fixed, other=others, layer=layer, options=options,
                                   original=maps)
            check = None
            if sanity:
                check = sanity_check(clf, x, method, target=fixed, layer=layer, stages=[head], seed=seed,
                                     draws=SANITY_DRAWS.get(method, 10), options=options, original=maps)
            # the same map gives the same curves (Grad-CAM and XGrad-CAM agree exactly at a layer
            # right before global pooling): computed once
            key = maps.detach().cpu().numpy().tobytes()
            if key not in curves:
                given = sal if sal is not None else maps
                curves[key] = deletion_insertion(clf, x, {method: given}, **curve_args)[method]
            d, ins = (replace(c, method=method) for c in curves[key])
            rows.append(MethodScores(
                method, False, d, ins, cs.spearman,
                None if check is None else check.spearman[:, 0], None if check is None else check.passed,
                [seconds] * n,
            ))
        except Exception as e:  # noqa: BLE001 -- one failing method never stops the comparison
            log.warning("compare: %s failed: %s", method, e, exc_info=log.isEnabledFor(logging.DEBUG))
            rows.append(MethodScores(method, False, error=f"{type(e).__name__}: {e}"))
        log.info("compare: %s done in %.1f s", method, time.perf_counter() - t0)
    for ref in references:
        m = reference_map(ref, n, h, w, seed=seed, device=x.device)
        d, ins = (replace(c, method=ref) for c in deletion_insertion(clf, x, {ref: m}, **curve_args)[ref])
        rows.append(MethodScores(ref, True, d, ins))
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
            "sanity": {"stage": head, "threshold": SANITY_THRESHOLD, "seed": seed,
                       "draws": {m: SANITY_DRAWS.get(m, 10) for m in methods}} if sanity else None,
            "class_sensitivity": {"other": "least likely class", "threshold": CLASS_THRESHOLD},
            "ranking": "methods passing the sanity and class checks first, then insertion AUC - deletion AUC, "
                       "mean over images",
        },
    )
