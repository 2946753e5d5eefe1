"""What :func:`convlens.explain` found and how it is kept: :class:`Report` and
:class:`ImageExplanation`, the JSON / CSV summaries and the thumbnails.

Nothing here computes an explanation: it holds and writes what :func:`convlens.explain` found. The
HTML pages are :mod:`convlens.page` (one image), :mod:`convlens.page_index` (the index of a run) and
:mod:`convlens.page_compare` (compare's page); their public names are importable from here too, as
before the split.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .display import rich_display, short
from .files import to_json
from .models import Prediction
from .outputs import RunWriter, npy_writer, printable, safe_key
from .page import (  # the names report.py held before the split
    CSP,  # noqa: F401
    CSS,  # noqa: F401
    GLOSSARY,  # noqa: F401
    LEVEL_CSS,  # noqa: F401
    LOW_AGREEMENT,
    LOW_CONFIDENCE,
    NOTEBOOK_CSS,  # noqa: F401
    TITLES,  # noqa: F401
    glossary_html,  # noqa: F401
    level_badge,  # noqa: F401
    render_html,
    trust_caption,  # noqa: F401
    verdict_list,  # noqa: F401
)
from .page_compare import (  # the names report.py held before the split
    comparison_html,  # noqa: F401
)
from .page_index import (  # the names report.py held before the split
    INDEX_CSS,  # noqa: F401
    _top1,
    image_marks,
    render_index,
)

__all__ = [
    "ImageExplanation", "Report", "image_marks", "planned_outputs", "render_html", "render_index", "run_writer",
    "summary_csv", "summary_dict", "thumbnail", "to_json",
]

log = logging.getLogger(__name__)


# -- the results of a run --------------------------------------------------------------------------------
@rich_display
@dataclass
class ImageExplanation:
    """Everything computed for one image; ``errors`` maps ``"image"`` or a technique to its error."""

    name: str  # display-safe (control characters and undecodable bytes escaped)
    source: str | None  # display-safe path
    key: str  # the image's output folder, unique within a report
    path: Any = field(default=None, repr=False)  # the path exactly as given (for the manifest)
    rgb: np.ndarray | None = None  # (H, W, 3) float32 in [0, 1], as the model saw it
    original_size: tuple[int, int] | None = None  # (width, height) before preprocessing
    predictions: list[Prediction] = field(default_factory=list)
    target: int | None = None
    target_label: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)  # warnings a technique gave
    timings: dict[str, float] = field(default_factory=dict)
    #: how far techniques agree, e.g. ``gradcam_occlusion_spearman`` (None where undefined)
    agreement: dict[str, float | None] = field(default_factory=dict)
    #: once written and released (a run with ``out``): the image's summary entry, and its thumbnail
    summary: dict[str, Any] | None = field(default=None, repr=False)
    thumb: bytes | None = field(default=None, repr=False)
    reused: bool = field(default=False, repr=False)  # kept from an earlier run (``resume``), not recomputed

    @property
    def ok(self) -> bool:
        """True when the image loaded and every technique succeeded."""
        return not self.errors

    def _repr_lines(self) -> list[str]:
        size = f" {self.original_size[0]}x{self.original_size[1]} px" if self.original_size else ""
        target = f"target {self.target_label} [{self.target}]" if self.target is not None else "no target"
        top = f" (top-1 {self.predictions[0].label} {100 * self.predictions[0].probability:.1f}%)" \
            if self.predictions else ""
        errors = "; errors: " + ", ".join(f"{k}: {short(v, 40)}" for k, v in self.errors.items()) if self.errors else ""
        return [f"ImageExplanation: {self.name}{size}, {target}{top}",
                f"results: {', '.join(self.results) or 'none'}{errors}"]


@rich_display
@dataclass
class Report:
    """What :func:`explain` found: the model, the settings, and one :class:`ImageExplanation` per
    image (in order). ``save(dir)`` writes the PNGs, raw arrays, ``summary.json`` and a
    self-contained ``report.html``; in a notebook the report displays itself.
    """

    model: str
    weights: str | None
    device: str
    input: dict[str, Any]
    methods: tuple[str, ...]
    settings: dict[str, Any]
    images: list[ImageExplanation]
    skipped: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
    _png: dict[tuple[str, str], bytes] = field(default_factory=dict, repr=False)
    _files: dict[str, list[str]] = field(default_factory=dict, repr=False)  # image key -> files written
    _planned: int = field(default=0, repr=False)  # images the run will hold (0: as many as it holds now)

    @property
    def failed(self) -> list[ImageExplanation]:
        """The images with any error."""
        return [im for im in self.images if not im.ok]

    def png(self, image: ImageExplanation, technique: str) -> bytes | None:
        """The PNG of one technique's figure for one image (``"input"`` for the photo itself),
        rendered once and cached; ``None`` when there is nothing to show."""
        key = (image.key, technique)
        if key not in self._png:  # a failed drawing is remembered too (as b""), so it is tried once
            # one Axes per stage, not per tile: the same picture, several times faster to draw
            args = ({"k": int(self.settings["activations"]["channels"]), "layout": "rows"}
                    if technique == "activations" else {})
            self._png[key] = _render(image, technique, args) or b""
        return self._png[key] or None

    def outputs(self, directory: str | os.PathLike[str]) -> list[Path]:
        """The top-level outputs of :meth:`save` in ``directory`` (known before anything is computed)."""
        return planned_outputs(directory, [im.key for im in self.images])

    def writer(self, directory: str | os.PathLike[str], *, force: bool = False) -> RunWriter:
        """A :class:`convlens.outputs.RunWriter` for this report's files in ``directory``; raises
        ``FileExistsError`` when ``directory`` holds an earlier run or a file of the same name
        (unless ``force``), before anything is written."""
        return run_writer(directory, self.images, force=force, settings=self.settings)

    def save_image(self, run: RunWriter, im: ImageExplanation) -> list[str]:
        """Stage one image's files and move its folder into place; returns its files relative to
        the output folder. The folder holds ``input.png``, per technique a PNG and the raw ``.npy``,
        the image's own self-contained page ``report.html``, ``thumbnail.jpg`` (for the index) and
        ``summary.json`` (the image's entry of the run's summary, read back by ``--resume`` and
        ``convlens report``). An image that could not be read gets no folder."""
        if "image" in im.errors:
            self._files[im.key] = run.commit_image(im.key, name=im.name, source=im.path, ok=False,
                                                   extra={"errors": dict(im.errors)})
            return self._files[im.key]
        written = []
        for tech in ("input", *self.methods):
            data = self.png(im, tech)
            if data is not None:
                written.append(run.write(im.key, f"{tech}.png", data))
            for suffix, array in _arrays(im, tech):
                written.append(run.write(im.key, f"{tech}{suffix}.npy", npy_writer(array)))
        # the run's skipped entries are shown on its only page, not repeated on each of many
        one = (self._planned or len(self.images)) == 1
        page = replace(self, images=[im], skipped=self.skipped if one else [], timings={})
        written.append(run.write(im.key, "report.html", render_html(page).encode()))
        if im.rgb is not None:
            im.thumb = thumbnail(im.rgb)
            written.append(run.write(im.key, "thumbnail.jpg", im.thumb))
        files = sorted([*written, f"{im.key}/summary.json"])
        entry = summary_dict(page, {im.key: files})["images"][0]
        run.write(im.key, "summary.json", to_json(entry).encode())
        im.summary = entry
        self._files[im.key] = run.commit_image(im.key, name=im.name, source=im.path, ok=im.ok)
        return self._files[im.key]

    def release(self, im: ImageExplanation) -> None:
        """Drop what an image's files now hold (maps, figures, the picture), keeping what the
        summary and the index need (predictions, target, timings, errors, files, a thumbnail):
        memory stays flat over a folder of any size."""
        if im.thumb is None and im.rgb is not None:
            im.thumb = thumbnail(im.rgb)
        if im.summary is None:
            im.summary = summary_dict(replace(self, images=[im]), self._files)["images"][0]
        im.results, im.rgb = {}, None
        for tech in ("input", *self.methods):
            self._png.pop((im.key, tech), None)

    def finish(self, run: RunWriter) -> None:
        """Write ``summary.json``, ``summary.csv`` and ``report.html`` (they describe exactly the
        image files written) and put everything in place, replacing an earlier run as a whole.
        ``report.html`` is the index page (a thumbnail grid linking to each image's own page) when
        there are several images; for one image it is that image's page."""
        summary = summary_dict(self, self._files)
        run.write(None, "summary.json", to_json(summary).encode())
        run.write(None, "summary.csv", summary_csv(summary).encode("utf-8"))
        page = None
        if len(self.images) == 1 and self._files.get(self.images[0].key):
            page = run.locate(f"{self.images[0].key}/report.html").read_bytes()
        elif len(self.images) == 1:
            page = render_html(self).encode()  # an image that could not be read: today's page says why
        else:
            thumbs = {}
            for im in self.images:
                if im.thumb is None and im.rgb is not None:
                    im.thumb = thumbnail(im.rgb)
                if im.thumb is not None:
                    thumbs[im.key] = im.thumb
            page = render_index(summary, thumbs).encode()
        run.write(None, "report.html", page)
        run.finish()

    def to_dict(self) -> dict[str, Any]:
        """What ``summary.json`` holds for this report (model, settings, per image its predictions,
        techniques, timings, errors): JSON-ready, like every result's ``to_dict()``."""
        return summary_dict(self, self._files)

    def save(self, directory: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        """Write every output into ``directory``; returns the paths written.

        The one exception to the results' ``save(folder, name)`` (``<name>.png``, ``.npy``,
        ``.json``): a report is many results, so it writes a whole run folder, which ``convlens
        report`` and ``--resume`` read back.

        Per image, in its own folder: ``input.png``, per technique a PNG and the raw ``.npy``, its
        own page ``report.html`` (see :meth:`save_image`); then ``summary.json``, ``summary.csv``
        and ``report.html`` (the index page for several images, the image's page for one).
        Everything is staged and moved into place (see :mod:`convlens.outputs`): an interrupted
        save leaves no half-written file. An earlier run or a file of the same name in
        ``directory`` is refused unless ``force``.
        """
        with self.writer(directory, force=force) as run:
            for im in self.images:
                self.save_image(run, im)
            self.finish(run)
        files = [f for im in self.images for f in self._files.get(im.key, [])]
        return [run.root / f for f in (*files, "summary.json", "summary.csv", "report.html")]

    def _repr_lines(self) -> list[str]:
        weights = f" ({short(self.weights)})" if self.weights else ""  # the file name, not where it is installed
        fast = ", fast" if self.settings.get("fast") else ""
        n = len(self.images)
        kind = " (multi-label)" if self.input.get("multi_label") else ""
        head = f"Report: {self.model}{kind}{weights} on {self.device}; {', '.join(self.methods)}{fast}"
        shown = [f"{im.name}: {im.target_label} [{im.target}]" if im.ok else f"{im.name}: FAILED" for im in self.images]
        images = f"{n} image{'s' if n != 1 else ''}: " + ", ".join(shown[:3]) + (", …" if n > 3 else "")
        total = self.timings.get("total_s")
        status = (f"{len(self.failed)} with errors" if self.failed else "no errors") + (
            f"; {total:.1f} s" if total is not None else "")
        return [head, images, f"{status}; .save(dir) writes report.html, summary.json and the figures"]

    def _repr_html_(self) -> str:
        return render_html(self, standalone=False)


def planned_outputs(directory: str | os.PathLike[str], keys: Sequence[str]) -> list[Path]:
    """Top-level outputs in ``directory``: ``report.html``, ``summary.json`` and one folder per image."""
    directory = Path(directory)
    return [directory / "report.html", directory / "summary.json", *(directory / k for k in keys)]


def run_writer(
    directory: str | os.PathLike[str], images: Sequence[Any], *, force: bool = False,
    settings: dict[str, Any] | None = None, resume: bool = False,
) -> RunWriter:
    """The checked :class:`RunWriter` of an explain run over ``images`` (items with ``key`` and
    ``path``); raises before any work when ``directory`` cannot take the run."""
    return RunWriter(directory, "explain", keys=[im.key for im in images],
                     files=["report.html", "summary.json", "summary.csv"],
                     inputs=[im.path for im in images if im.path is not None], force=force, settings=settings or {},
                     resume=resume)


def _render(im: ImageExplanation, technique: str, plot_args: dict[str, Any]) -> bytes | None:
    if technique == "input":
        if im.rgb is None:
            return None
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((np.clip(im.rgb, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    result = im.results.get(technique)
    if result is None:
        return None
    try:
        from .plotting import figure_bytes

        # zlib level 3, not 6: a third less time per figure, files 10-13% larger
        return figure_bytes(result.plot(**plot_args), 100, pil_kwargs={"compress_level": 3})
    except Exception as e:  # a figure that cannot be drawn is an error of that technique, not of the run
        log.warning("%s: cannot draw %s: %s", im.name, technique, printable(e))
        im.errors[technique] = printable(f"drawing failed: {type(e).__name__}: {e}")
        return None


def _arrays(im: ImageExplanation, technique: str) -> list[tuple[str, np.ndarray]]:
    """The raw arrays of one technique: ``[(suffix, array)]``."""
    r = im.results.get(technique)
    if r is None:
        return []
    if technique == "activations":
        return [(f"_{safe_key(name)[0]}", _np(t)[0]) for name, t in r.maps.items()]
    if technique == "filters":
        return [("", _np(r.images))]
    return [("", r.to_numpy()[0])]


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def summary_dict(report: Report, files: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce and audit a run, as JSON-ready data."""
    files = files or {}
    errors = [
        {"image": im.name, "technique": tech, "error": msg} for im in report.images for tech, msg in im.errors.items()
    ]
    return {
        "convlens": report.settings.get("versions", {}).get("convlens"),
        "created": report.created,
        "model": {"name": report.model, "weights": report.weights, "device": report.device, "input": report.input},
        "methods": list(report.methods),
        "settings": {k: v for k, v in report.settings.items() if k != "versions"},
        "versions": report.settings.get("versions", {}),
        "timings": report.timings,
        "ok": not errors,
        "errors": errors,
        "skipped": report.skipped,
        "images": [
            {**im.summary, "files": files.get(im.key, im.summary.get("files", []))} if im.summary is not None else
            {
                "name": im.name,
                "source": im.source,
                "folder": im.key,
                "ok": im.ok,
                "original_size": list(im.original_size) if im.original_size else None,
                "predictions": [{"label": p.label, "index": p.index, "probability": p.probability}
                                for p in im.predictions],
                "target": None if im.target is None else {"index": im.target, "label": im.target_label},
                "layers": im.layers,
                "channels": im.channels,
                "timings": im.timings,
                "agreement": im.agreement,
                "errors": im.errors,
                "notes": im.notes,
                "trust": im.results["trust"].to_dict() if "trust" in im.results else None,
                "files": files.get(im.key, []),
            }
            for im in report.images
        ],
    }


def thumbnail(image: Any, size: int = 96, *, quality: int = 82) -> bytes:
    """A small JPEG of an image for the index: an (H, W, 3) float array in [0, 1] (as
    :class:`~convlens.explain.ImageExplanation` ``.rgb`` holds it), a uint8 array or a PIL image,
    scaled so its longer side is ``size`` pixels.

    Example::

        data = thumbnail(report.images[0].rgb)   # a few kB of JPEG
    """
    import io

    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        a = np.asarray(image)
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
        pil = Image.fromarray(a[..., :3] if a.ndim == 3 else a).convert("RGB")
    pil.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


#: The columns of :func:`summary_csv`, in order.
CSV_COLUMNS = (
    "name", "source", "folder", "ok", "top1", "top1_index", "top1_probability", "target", "target_index",
    "gradcam_occlusion_spearman", "marks", "top5", "errors",
)


def _csv_text(value: Any) -> str:
    """A text cell that a spreadsheet shows as text: one starting like a formula gets a leading '."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def summary_csv(
    summary: dict[str, Any], *, low_confidence: float = LOW_CONFIDENCE, low_agreement: float = LOW_AGREEMENT
) -> str:
    """``summary.csv``: one row per image of a summary (:func:`summary_dict`), columns
    :data:`CSV_COLUMNS`. Numbers are written in full precision (``repr``), empty where unknown;
    ``marks`` as :func:`image_marks` gives them, joined with ``;``; text cells that a spreadsheet
    would take for a formula start with ``'``.

    Example::

        Path("summary.csv").write_text(summary_csv(summary_dict(report)), encoding="utf-8")
    """
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for im in summary.get("images", []):
        top = _top1(im) or {}
        target = im.get("target") or {}
        rho = (im.get("agreement") or {}).get("gradcam_occlusion_spearman")
        p = top.get("probability")
        w.writerow([
            _csv_text(im.get("name")), _csv_text(im.get("source")), _csv_text(im.get("folder")),
            "true" if im.get("ok") else "false",
            _csv_text(top.get("label")), "" if top.get("index") is None else int(top["index"]),
            "" if p is None else repr(float(p)),
            _csv_text(target.get("label")), "" if target.get("index") is None else int(target["index"]),
            "" if rho is None else repr(float(rho)),
            ";".join(image_marks(im, low_confidence=low_confidence, low_agreement=low_agreement)),
            _csv_text("; ".join(f"{q['label']} ({q['probability']:.4f})" for q in im.get("predictions") or [])),
            _csv_text("; ".join(f"{k}: {v}" for k, v in (im.get("errors") or {}).items())),
        ])
    return buf.getvalue()
