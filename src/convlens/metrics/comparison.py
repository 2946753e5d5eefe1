"""What :func:`convlens.compare` returns: :class:`Comparison` (one :class:`MethodScores` row per
method and reference, its table, verdicts, plot, page and files) and :func:`merge` of comparisons
of parts of a folder. Importable from :mod:`convlens.metrics.compare` too, as before the split.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..display import rich_display
from ..results import Result, _titled
from ..settings import CompareSettings, Settings
from .evidence import (
    MARGIN_SD,
    MIN_IMAGES,
    interval,
    noise_margin,
    paired_bootstrap,
    verdict,
)
from .results import PerturbationCurve
from .sanity import (
    CLASS_THRESHOLD,
    SANITY_THRESHOLD,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: images whose maps are kept as thumbnails (the first ones of a folder), and their side in pixels
THUMB_IMAGES, THUMB_SIZE = 4, 96


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
class Comparison(Result):
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
    settings: CompareSettings = field(default_factory=CompareSettings)
    thumbnails: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _settings: ClassVar[type[Settings] | None] = CompareSettings

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
            # each tensor read to the host once, not one number at a time (on a GPU every read waits)
            dels, inss = (None if c is None else c.auc.detach().cpu() for c in (r.deletion, r.insertion))
            class_rho, sanity_rho, draws = (None if t is None else t.detach().cpu()
                                            for t in (r.class_rho, r.sanity_rho, r.draws))
            for i, name in enumerate(self.images):
                rec: dict[str, Any] = {"image": name, "method": r.method, "reference": r.reference,
                                       "target": self.labels[i] if i < len(self.labels) else None}
                if r.error:
                    rec["error"] = r.error
                    out.append(rec)
                    continue
                d, ins = float(dels[i]), float(inss[i])
                rec.update({
                    "deletion_auc": d,
                    "insertion_auc": ins,
                    "difference": ins - d,
                    "class_sensitivity": None if class_rho is None else float(class_rho[i]),
                    "sanity_rho": None if sanity_rho is None else float(sanity_rho[i]),
                    "sanity_passed": None if r.sanity_passed is None else bool(r.sanity_passed[i]),
                    "seconds": r.seconds[i] if i < len(r.seconds) else None,
                })
                if draws is not None:
                    rec["draw_spread"] = float(draws[:, i].double().std()) if draws.shape[0] > 1 else 0.0
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
        draws = ref.draws.detach().cpu()  # read once, not per image
        return float(np.mean([noise_margin(draws[:, i]) for i in range(draws.shape[1])]))

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
            "kind": type(self).__name__,
            "model": self.model,
            "images": self.images,
            "verdicts": self.verdicts(),
            "targets": [{"index": t, "label": lab} for t, lab in zip(self.target, self.labels)],
            "settings": self.settings.to_dict(),
            "fractions": None if first is None else first.deletion.fractions.tolist(),
            "summary": self.summary(),
            "ranking": self.ranking(),
            "ranking_text": self.ranking_text(),
            "class_discriminative": self.discriminative(),
            "columns": COLUMNS,
            "per_image": self.per_image(),
            "mean_curves": curves,
        }

    def plot(self, *, title: str | None = None) -> Figure:
        """A row of map thumbnails per method (the first images), then the deletion and insertion
        curves of every row, averaged over the images."""
        from ..plotting import plot_comparison

        return _titled(plot_comparison(self), title)

    def to_numpy(self) -> np.ndarray:
        """(rows, 2, images) float32: each row's deletion and insertion AUC per image (NaN for a failed row)."""
        out = np.full((len(self.rows), 2, len(self.images)), np.nan, dtype=np.float32)
        for j, r in enumerate(self.rows):
            if not r.error:
                out[j] = torch.stack([r.deletion.auc, r.insertion.auc]).detach().float().cpu().numpy()
        return out

    def save(self, folder: str | os.PathLike[str], name: str | None = None, *, force: bool = False,
             **old: Any) -> list[Path]:
        """Write ``<name>.png``, ``<name>.npy`` (:meth:`to_numpy`) and ``<name>.json`` (:meth:`to_dict`)
        as every result does, and also ``<name>.csv`` (:meth:`to_csv`) and the page ``<name>.html``,
        into ``folder`` (default name ``compare``); each atomically, a file convlens did not write is
        refused unless ``force``; returns the paths."""
        from .. import files as outputs
        from ..plotting import figure_bytes
        from ..report import comparison_html

        if old:
            raise TypeError(f"save() got unexpected keyword(s) {sorted(old)}")
        name = name or "compare"
        d = Path(folder)
        png = figure_bytes(self.plot(), 110)
        files = [(p, png) if p.suffix == ".png" else (p, w) for p, w in outputs.result_files(self, d, name)]
        page = comparison_html(self, png).encode()
        return outputs.save_files([(d / f"{name}.csv", self.to_csv().encode()), *files, (d / f"{name}.html", page)],
                                  force=force)


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
