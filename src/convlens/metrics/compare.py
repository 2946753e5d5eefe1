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
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import MODEL_AND_IMAGES, renamed
from ..baselines import Baseline
from ..checks import choose
from ..display import rich_display
from ..methods.registry import map_methods, sanity_draws
from ..models import Classifier, as_classifier
from ..targets import Target
from ._common import MapMethod, make_map
from .evidence import (
    LEVELS,
    MARGIN_SD,
    MIN_IMAGES,
    REFERENCE_DRAWS,
    RESAMPLES,
    grid_name,
    grid_of,
    interval,
    noise_margin,
    paired_bootstrap,
    random_like,
    verdict,
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

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
#: images whose maps are kept as thumbnails (the first ones of a folder), and their side in pixels
THUMB_IMAGES, THUMB_SIZE = 4, 96
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
    ``seconds`` (N,) time to make the map; ``error`` why the method failed, if it did; ``random``
    the name of the random reference row at the method's grid; ``draws`` (draws, N) insertion -
    deletion AUC of each random draw of a reference row (its curves are the mean over the draws).
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
    random: str | None = None
    draws: Tensor | None = field(default=None, repr=False)


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


COLUMNS = {
    "deletion": "deletion AUC: the target's probability, averaged over the deletion curve, as the pixels the map "
                "ranks highest are blurred first. Lower is better: the map found the evidence.",
    "insertion": "insertion AUC: the same, starting from the blurred image and revealing the top pixels first. "
                 "Higher is better.",
    "ins-del": "insertion AUC - deletion AUC, the ranking score (higher is better).",
    "vs random": "ins-del minus that of random maps drawn at the method's own grid and resized like its map "
                 f"(the mean of several draws), with a 95% paired bootstrap interval over {MIN_IMAGES} or more images, "
                 f"or on fewer the noise margin (±, {MARGIN_SD:g} standard deviations of the random draws). Positive "
                 "and real: the map orders pixels better than chance.",
    "vs centre": "ins-del minus that of a centred Gaussian (a map that only says 'the object is in the middle').",
    "vs best": "ins-del minus that of the first-ranked method, with the same interval or margin: where it is not "
               "real, the two methods cannot be told apart on these images.",
    "class rho": "rank correlation of the map for the target and for the least likely class (below "
                 f"{CLASS_THRESHOLD:g}: the map changes with the class, as an explanation must).",
    "sanity": "the sanity check: the map's rank correlation with the map after the classifier is re-initialised "
              f"(below {SANITY_THRESHOLD:g} passes: the map depends on what the model learned).",
    "rank": "the ranking: methods passing both checks first, then by ins-del.",
    "map s": "seconds to make one map (--verbose).",
}


@rich_display
@dataclass(frozen=True, eq=False)
class Comparison:
    """What :func:`compare` found: one :class:`MethodScores` per method, then the references.

    :meth:`summary` gives mean and spread per method over the images, the differences to the
    references and to the best method with their intervals, and the ranking (by insertion AUC
    minus deletion AUC, higher is better); :meth:`verdicts` a verdict per method in words;
    :meth:`format_table` the terminal table; :meth:`save` writes ``compare.csv``,
    ``compare.json``, ``compare.png`` and ``compare.html``. ``thumbnails``: method (and
    ``"image"``) -> small maps (the images as RGB) of the first images, for display.
    """

    rows: list[MethodScores]
    images: list[str]
    target: list[int]
    labels: list[str]
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    thumbnails: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def _repr_lines(self) -> list[str]:
        return [f"Comparison({len(self.rows)} rows, {len(self.images)} images, ranking={self.ranking()})"]

    def columns(self) -> dict[str, str]:
        """What each column of the tables means, in words."""
        return dict(COLUMNS)

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
                if r.draws is not None:
                    rec["draw_spread"] = float(r.draws[:, i].double().std()) if r.draws.shape[0] > 1 else 0.0
                out.append(rec)
        return out

    def _scores(self, method: str) -> dict[str, np.ndarray]:
        r = self.row(method)
        d = r.deletion.auc.detach().double().cpu().numpy()
        i = r.insertion.auc.detach().double().cpu().numpy()
        return {"deletion_auc": d, "insertion_auc": i, "difference": i - d}

    def _margin(self, method: str) -> float:
        """The noise margin: from the random draws at the method's grid (any random row when it has
        none), :func:`noise_margin` per image, mean over the images."""
        r = self.row(method)
        rows = [x for x in self.rows if x.draws is not None and not x.error]
        ref = next((x for x in rows if x.method == r.random), rows[0] if rows else None)
        if ref is None:
            return 0.0
        return float(np.mean([noise_margin(ref.draws[:, i]) for i in range(ref.draws.shape[1])]))

    def _versus(self, method: str, other: str) -> dict[str, Any]:
        """The difference in insertion - deletion, with a bootstrap interval from ``MIN_IMAGES``
        images on; with fewer, the noise margin decides (a bootstrap of 2 to 4 images is too narrow)."""
        a, b = self._scores(method)["difference"], self._scores(other)["difference"]
        seed = int(self.settings.get("seed", 0) or 0)
        d, lo, hi = paired_bootstrap(a, b, seed=seed)
        if len(a) < MIN_IMAGES:
            lo = hi = math.nan
        return interval(d, lo, hi, self._margin(method))

    def summary(self) -> list[dict[str, Any]]:
        """Per row: mean and standard deviation over the images of every number, the share of
        images passing the sanity check, whether the method is class-discriminative (mean class
        sensitivity below the threshold) and its rank: methods that pass the sanity check on most
        images and are not shown to ignore the class come first, each group ordered by insertion -
        deletion (a map that fails either test can still score well on the curves: Grad-CAM++ on
        the default model does; references are not ranked). Per method also ``intervals`` (95%
        paired bootstrap of the mean AUCs over the images, ``RESAMPLES`` resamples, seeded) and
        ``vs``: reference or ``"best"`` -> its difference in insertion - deletion with an interval
        (several images) or the noise margin (one image) and whether it is ``real``."""
        recs = self.per_image()
        out = []
        seed = int(self.settings.get("seed", 0) or 0)
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
            if r.draws is not None:
                s["draws"] = int(r.draws.shape[0])
                s["draw_spread"] = _stat([x["draw_spread"] for x in mine])[0]
            if not r.error and len(self.images) >= MIN_IMAGES:
                s["intervals"] = {k: list(paired_bootstrap(v, seed=seed)[1:])
                                  for k, v in self._scores(r.method).items()}
            if not r.error and not r.reference:
                s["random"] = r.random
                refs = [x.method for x in self.rows if x.reference and not x.error
                        and (x.draws is None or x.method == r.random)]
                s["vs"] = {ref: self._versus(r.method, ref) for ref in refs}
            out.append(s)
        ranked = sorted((s for s in out if not s["reference"] and s.get("difference") is not None),
                        key=lambda s: (not trusted(s), -s["difference"]))
        for k, s in enumerate(ranked, 1):
            s["rank"] = k
            if k > 1:
                s["vs"]["best"] = self._versus(s["method"], ranked[0]["method"])
        return out

    def ranking(self) -> list[str]:
        """The methods, best first: trustworthy ones (see :meth:`summary`) before the others, then by
        insertion AUC - deletion AUC, mean over the images."""
        return [s["method"] for s in sorted(self.summary(), key=lambda s: s.get("rank", 1e9)) if "rank" in s]

    def ranking_text(self) -> str:
        """The ranking with the real differences: ``a > b`` where b is really below a (the interval
        of their difference in insertion - deletion excludes 0, or on one image it exceeds the
        noise margin), ``a ≈ b`` where it is not; the methods that fail the sanity or class check
        come after the others (``; then, failing a check: ...``)."""
        summ = {s["method"]: s for s in self.summary()}
        order = self.ranking()
        if not order:
            return ""
        parts = [order[0]]
        for prev, cur in zip(order, order[1:]):
            if trusted(summ[prev]) != trusted(summ[cur]):
                parts.append(f"; then, failing a check: {cur}")
                continue
            parts.append((" > " if self._versus(prev, cur)["real"] else " ≈ ") + cur)
        return "".join(parts)

    def discriminative(self) -> list[str]:
        """The methods whose mean class sensitivity is below the threshold."""
        return [s["method"] for s in self.summary() if s.get("class_discriminative")]

    def verdicts(self) -> dict[str, dict[str, Any]]:
        """A verdict per method: ``{"level": "trust" | "weak" | "do not trust", "reasons": [...]}``.

        "do not trust": it failed, fails the sanity check on most images, or is not
        class-discriminative. "weak": its insertion - deletion does not beat the random maps at
        its own grid or the centred Gaussian by more than the noise (over several images: the
        95% paired bootstrap interval of the difference includes 0; on one image: the difference
        is within ``MARGIN_SD`` standard deviations of the random draws). "trust" otherwise.
        """
        n = len(self.images)
        return {
            s["method"]: verdict(images=n, versus=s.get("vs") or {}, sanity_passed=s.get("sanity_passed"),
                                 sanity_rho=s.get("sanity_rho"), class_rho=s.get("class_sensitivity"),
                                 margin=0.0 if s.get("error") else self._margin(s["method"]), error=s.get("error"),
                                 class_threshold=CLASS_THRESHOLD, sanity_threshold=SANITY_THRESHOLD)
            for s in self.summary() if not s["reference"]
        }

    def format_table(self, *, verbose: bool = False) -> str:
        """The summary as a text table at most 100 columns wide (``verbose``: the spreads, the
        sanity rho, seconds per map and each image's numbers), what each column means, the
        verdicts and the ranking below it."""
        n = len(self.images)
        summ = self.summary()
        verdicts = self.verdicts()
        head = ["method", "verdict", "deletion", "insertion", "ins-del", "vs random", "class rho", "sanity", "rank"]
        if verbose:
            head[2:5] = ["deletion (sd)", "insertion (sd)", "ins-del (sd)"]
            head += ["sanity rho", "map s"]
        rows = []
        for s in summ:
            name = s["method"]
            if s.get("error"):
                rows.append([name, "do not trust", f"failed: {s['error'][:60]}"] + [""] * (len(head) - 3))
                continue

            def f(key: str, digits: int = 3, s: dict[str, Any] = s) -> str:
                v, sd = s.get(key), s.get(key + "_std")
                if v is None or not math.isfinite(v):
                    return "-"
                return f"{v:.{digits}f}" + (f" ± {sd:.{digits}f}" if verbose and n > 1 and sd is not None else "")

            vr = (s.get("vs") or {}).get(s.get("random") or "")
            vs = "-" if vr is None else (f"{vr['difference']:+.2f} [{vr['low']:+.2f},{vr['high']:+.2f}]" if "low" in vr
                                         else f"{vr['difference']:+.3f} ±{vr['margin']:.3f}")
            sanity = "-" if s["sanity_passed"] is None else (
                ("pass" if s["sanity_passed"] == 1 else "FAIL") if n == 1 else f"{s['sanity_passed']:.0%}")
            level = "reference" if s["reference"] else verdicts.get(s["method"], {}).get("level", "")
            row = [name, level, f("deletion_auc"), f("insertion_auc"),
                   f("difference"), vs, f("class_sensitivity", 2), sanity, str(s.get("rank", ""))]
            if verbose:
                row += [f("sanity_rho", 2), f("seconds", 2)]
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = [" ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
                 " ".join("-" * w for w in widths)]
        lines += [" ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("")
        if verbose:
            keys = ("deletion", "insertion", "ins-del", "vs random", "class rho", "sanity", "rank", "map s")
            lines += [_wrap(f"{k}: {COLUMNS[k]}") for k in keys]
        else:
            lines.append(_wrap(
                "deletion (lower is better) / insertion (higher is better): the class's probability, averaged, as the "
                "map's top pixels are blurred / revealed first; ins-del: their difference; vs random: ins-del minus "
                f"that of random maps at the method's grid, with its noise (± margin, or [95% interval] over "
                f"{MIN_IMAGES}+ images); class rho and sanity: a map must change with the class and when the "
                f"classifier is re-initialised (rho below 0.5). --verbose explains each column."))
        if verbose:
            lines += ["", "per image:"]
            for rec in self.per_image():
                if "error" in rec:
                    continue
                lines.append(f"  {rec['image'][:30]:30} {rec['method'][:20]:20} del {rec['deletion_auc']:.3f} "
                             f"ins {rec['insertion_auc']:.3f}")
        lines.append("")
        lines.append(_wrap("ranking (> a real difference, ≈ within the noise): " + self.ranking_text()))
        for m, v in verdicts.items():
            lines.append(_wrap(f"{m}: {v['level'].upper()}. " + " ".join(v["reasons"])))
        return "\n".join(lines)

    def to_csv(self) -> str:
        """The per-image records as CSV text."""
        keys = ["image", "method", "reference", "target", "deletion_auc", "insertion_auc", "difference",
                "class_sensitivity", "sanity_rho", "sanity_passed", "seconds", "draw_spread", "error"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for rec in self.per_image():
            w.writerow(rec)
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data: settings, verdicts, per-image records, summary, ranking,
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
            "verdicts": self.verdicts(),
            "targets": [{"index": t, "label": lab} for t, lab in zip(self.target, self.labels)],
            "settings": self.settings,
            "fractions": None if first is None else first.deletion.fractions.tolist(),
            "summary": self.summary(),
            "ranking": self.ranking(),
            "ranking_text": self.ranking_text(),
            "class_discriminative": self.discriminative(),
            "columns": COLUMNS,
            "per_image": self.per_image(),
            "mean_curves": curves,
        }

    def plot(self) -> Figure:
        """A row of map thumbnails per method (the first images), then the deletion and insertion
        curves of every row, averaged over the images."""
        from ..plotting import plot_comparison

        return plot_comparison(self)

    def save(self, directory: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        """Write ``compare.csv``, ``compare.json``, ``compare.png`` and ``compare.html`` into
        ``directory`` (each atomically; a file convlens did not write is refused unless ``force``);
        returns the paths."""
        from .. import files as outputs
        from ..report import comparison_html, to_json

        d = Path(directory)
        from ..plotting import figure_bytes

        png = figure_bytes(self.plot(), 110)
        return outputs.save_files([
            (d / "compare.csv", self.to_csv().encode()),
            (d / "compare.json", to_json(self.to_dict()).encode()),
            (d / "compare.png", png),
            (d / "compare.html", comparison_html(self, png).encode()),
        ], force=force)


def _wrap(text: str, width: int = 100) -> str:
    import textwrap

    return textwrap.fill(text, width, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)


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
            rows.append(MethodScores(r0.method, r0.reference, error=err, random=r0.random))
            continue

        def cat_curves(kind: str, same: list[MethodScores] = same) -> PerturbationCurve:
            cs = [getattr(r, kind) for r in same]
            c0 = cs[0]
            return PerturbationCurve(kind=c0.kind, fractions=c0.fractions, scores=torch.cat([c.scores for c in cs]),
                                     auc=torch.cat([c.auc for c in cs]), target=sum((c.target for c in cs), []),
                                     method=c0.method, labels=sum((c.labels for c in cs), []), settings=c0.settings)

        def cat(name: str, same: list[MethodScores] = same, dim: int = 0) -> Tensor | None:
            vals = [getattr(r, name) for r in same]
            return None if vals[0] is None else torch.cat(vals, dim)

        rows.append(MethodScores(
            r0.method, r0.reference, cat_curves("deletion"), cat_curves("insertion"), cat("class_rho"),
            cat("sanity_rho"), None if r0.sanity_passed is None else sum((r.sanity_passed for r in same), []),
            sum((r.seconds for r in same), []), random=r0.random, draws=cat("draws", dim=1),
        ))
    thumbs: dict[str, Tensor] = {}
    for key in parts[0].thumbnails:
        vals = [p.thumbnails[key] for p in parts if key in p.thumbnails]
        thumbs[key] = torch.cat(vals)[:THUMB_IMAGES]
    return Comparison(rows=rows, images=sum((p.images for p in parts), []), target=sum((p.target for p in parts), []),
                      labels=sum((p.labels for p in parts), []), model=parts[0].model, settings=parts[0].settings,
                      thumbnails=thumbs)


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
    default patch 56 / stride 28, as ``explain --fast``). A method that raises gets a row with its
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
