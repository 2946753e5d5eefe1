"""What :func:`convlens.explain` found and how it is written: :class:`Report` and
:class:`ImageExplanation`, the self-contained HTML pages, the index page and the JSON / CSV summaries.

Nothing here computes an explanation: it holds and formats what :func:`convlens.explain` found. The HTML
embeds every image as a base64 PNG ``data:`` URI, carries its CSS inline, needs no JavaScript,
makes no network request (its Content-Security-Policy forbids any), reflows for phones, and
escapes every label and file name.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .display import METHOD_TITLES, data_uri, rich_display, short
from .metrics.evidence import LOW_AGREEMENT as _LOW_AGREEMENT
from .models import Prediction
from .outputs import RunWriter, npy_writer, printable, safe_key

__all__ = [
    "ImageExplanation", "Report", "image_marks", "planned_outputs", "render_html", "render_index", "run_writer",
    "summary_csv", "summary_dict", "thumbnail", "to_json",
]

log = logging.getLogger(__name__)

TITLES = {
    "input": "Input",
    "activations": "Activations",
    "gradcam": METHOD_TITLES["gradcam"],
    "occlusion": "Occlusion sensitivity",
    "trust": "How far to trust these maps",
    "filters": "Feature visualisation",
}

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
.convlens-report{--fg:#1d2330;--muted:#5b6475;--line:#dde2ea;--card:#fff;--bg:#f4f6f9;--accent:#2b6cb0;
 --bad:#b42318;--badbg:#fef3f2;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
 max-width:1180px;margin:0 auto;padding:16px;box-sizing:border-box;overflow-wrap:anywhere}
.convlens-report *{box-sizing:border-box}
.convlens-report h1{font-size:1.6em;margin:.2em 0}
.convlens-report h2{font-size:1.25em;margin:0 0 .6em}
.convlens-report h3{font-size:1.05em;margin:0 0 .3em}
.convlens-report .meta,.convlens-report .muted,.convlens-report figcaption{color:var(--muted);font-size:.92em}
.convlens-report code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;
 background:var(--bg);padding:0 .25em;border-radius:3px}
.convlens-report nav ul{display:flex;flex-wrap:wrap;gap:.4em;list-style:none;padding:0;margin:.6em 0}
.convlens-report nav a{display:inline-block;padding:.15em .6em;border:1px solid var(--line);border-radius:99px;
 text-decoration:none;color:var(--accent);background:var(--card)}
.convlens-report nav a.bad{color:var(--bad);border-color:var(--bad)}
.convlens-report section.image{background:var(--card);border:1px solid var(--line);border-radius:10px;
 padding:16px;margin:18px 0;box-shadow:0 1px 2px rgba(0,0,0,.04)}
.convlens-report .head{display:grid;grid-template-columns:minmax(0,240px) minmax(0,1fr);gap:16px;align-items:start}
.convlens-report img{max-width:100%;height:auto;display:block;border-radius:4px}
.convlens-report figure{margin:18px 0 0;padding-top:12px;border-top:1px solid var(--line)}
.convlens-report table{border-collapse:collapse;width:100%}
.convlens-report td,.convlens-report th{padding:.2em .4em;text-align:left;vertical-align:top;
 border-bottom:1px solid var(--line)}
.convlens-report table.preds th:first-child{width:2.2em}
.convlens-report table.preds th:last-child{width:4.5em}
.convlens-report td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.convlens-report .bar{height:.55em;background:var(--accent);border-radius:3px;min-width:1px}
.convlens-report tr.target td{font-weight:600}
.convlens-report .error{background:var(--badbg);color:var(--bad);border:1px solid var(--bad);border-radius:6px;
 padding:.5em .8em;margin:.6em 0}
.convlens-report .note{color:#8a5a00;font-size:.92em;margin:.3em 0}
.convlens-report details{margin-top:.6em}
.convlens-report summary{cursor:pointer;color:var(--accent)}
.convlens-report footer{margin-top:24px}
.convlens-report td,.convlens-report th,.convlens-report h1,.convlens-report h2,.convlens-report h3,
.convlens-report .level{overflow-wrap:normal;word-break:normal;hyphens:none}
.convlens-report .scroll,.convlens-report .fig{overflow-x:auto;max-width:100%}
.convlens-report .fig img{height:auto}
.convlens-report .tier{background:#fff4d6;color:#7a4b00;border:1px solid #e8c66a;border-radius:6px;
 padding:.5em .8em;margin:.6em 0}
.convlens-report .pair{display:flex;flex-wrap:wrap;gap:8px}
.convlens-report .pair figure{margin:0;padding:0;border:0}
.convlens-report .pair img{width:160px}
.convlens-report dl.glossary dt{font-weight:600;margin-top:.4em}
.convlens-report dl.glossary dd{margin:0 0 0 1em}
@media (max-width:640px){
 .convlens-report{padding:8px;font-size:14px}
 .convlens-report .head{grid-template-columns:minmax(0,1fr)}
 .convlens-report section.image{padding:10px}
 .convlens-report table{display:block;overflow-x:auto;max-width:100%}
}
"""

#: the report's glossary (end of every page): the words its numbers use
GLOSSARY = {
    "Grad-CAM": "a map of where the features that raise the class's score lie, from the gradient at one layer "
                "(coarse: one value per cell of that layer's grid, 7 x 7 on the default model).",
    "occlusion": "a map of how much the class's probability drops when a patch of the photo is greyed out.",
    "deletion AUC": "blur the pixels a map ranks highest first and follow the class's probability: the area under "
                    "that curve. Lower is better: the map found what the model uses.",
    "insertion AUC": "start from the blurred photo and reveal the top pixels first: the area under the curve. "
                     "Higher is better.",
    "random map": "random values on the same grid as the map, enlarged the same way: what a map that knows nothing "
                  "scores. Several draws; their spread is the noise of the numbers on one photo.",
    "centred Gaussian": "a blob in the middle of the photo: what a map that only says 'the object is in the middle' "
                        "scores.",
    "rho (ρ)": "Spearman rank correlation: 1 when two maps order the pixels the same way, 0 when unrelated.",
    "class rho": "rho between the map for the class and for the least likely class: high means the map does not "
                 "depend on the class.",
    "sanity check": "the map again after the classifier's weights are replaced by random ones: a real explanation "
                    "changes (rho below 0.5).",
    "verdict": "trust: passes both checks and beats the references; weak: no better than a reference by more than "
               "the noise; do not trust: fails the sanity check or does not depend on the class.",
}


def glossary_html() -> str:
    """The glossary as a folded definition list."""
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in GLOSSARY.items())
    return f"<details class=glossary-box><summary>Glossary</summary><dl class=glossary>{items}</dl></details>"


#: For the notebook fragment only: notebook front-ends style every table in an output (JupyterLab
#: right-aligns cells with a two-class selector and stripes rows); the doubled class outranks that.
NOTEBOOK_CSS = """
.convlens-report.convlens-report td,.convlens-report.convlens-report th{text-align:left}
.convlens-report.convlens-report td.num{text-align:right}
.convlens-report.convlens-report tbody tr{background:none}
"""


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

    def save(self, directory: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        """Write every output into ``directory``; returns the paths written.

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


def _e(value: Any) -> str:
    return escape(printable(value), quote=True)  # control characters and undecodable bytes escaped too


def _img(png: bytes | None, alt: str) -> str:
    """An embedded PNG. A figure that says its smallest text size (``plotting.FONT_KEY``) is shown
    at least as wide as keeps that text ``MIN_TEXT_PX`` tall, in a box that scrolls sideways on a
    narrow screen (a phone) instead of shrinking the text to nothing."""
    if not png:
        return ""
    from PIL import Image

    from .plotting import FONT_KEY, MIN_TEXT_PX

    data = data_uri(png)
    try:
        with Image.open(io.BytesIO(png)) as im:
            width, font = im.size[0], float(getattr(im, "text", {}).get(FONT_KEY, 0))
    except (OSError, ValueError):
        width, font = 0, 0.0
    if font <= 0:
        return f'<img src="{data}" alt="{_e(alt)}" loading="eager">'
    least = math.ceil(width * MIN_TEXT_PX / font)
    return (f'<div class=fig><img src="{data}" alt="{_e(alt)}" loading="eager" '
            f'style="min-width:{least}px" data-font-px="{font:.2f}" width="{width}"></div>')


def _caption(im: ImageExplanation, tech: str, settings: dict[str, Any]) -> str:
    label = f"“{_e(im.target_label)}”" if im.target_label else "the target"
    if tech == "activations":
        layers = im.layers.get("activations") or []
        names = ", ".join(f"<code>{_e(n)}</code>" for n in layers)
        k = settings["activations"]["channels"]
        return (f"Outputs of the model's stages ({names}); each row shows a stage's {_e(k)} most active "
                "channels on this image (“ch 12 (0.34)”: channel 12, its mean activation 0.34). Early stages answer "
                "to edges and colours, later ones to parts and textures.")
    if tech == "gradcam":
        method = settings["gradcam"]["method"]
        return (f"{_e(METHOD_TITLES.get(method, method))} at <code>{_e(im.layers.get('gradcam', ''))}</code> "
                f"for {label}: where the features that raise this class's score lie.")
    if tech == "occlusion":
        s = settings["occlusion"]
        return (f"A grey patch of {_e(s['patch'])} px, moved in steps of {_e(s['stride'])} px; red where hiding "
                f"the region lowers the {_e(s['score'])} of {label}, blue where it raises it.")
    if tech == "trust":
        return trust_caption(im.results.get("trust"), label)
    if tech == "filters":
        chans = ", ".join(_e(c) for c in im.channels.get("filters", []))
        fv, cam = im.layers.get("filters", ""), im.layers.get("gradcam", "")
        where = f"<code>{_e(fv)}</code>" + (f" (before the activation of <code>{_e(cam)}</code>)"
                                             if cam and fv != cam else "")
        return (f"Synthetic images that excite channels {chans} of {where} most: the channels of the Grad-CAM "
                "layer that fired most on this photo, i.e. what the network saw here.")
    return ""


def _multi_label(report: Report) -> str:
    """The header's note for a multi-label model: its probabilities are independent sigmoids."""
    if not report.input.get("multi_label"):
        return ""
    return " · <strong>multi-label</strong>: each class's probability is its own sigmoid (they need not sum to 1)"


def _predictions(im: ImageExplanation) -> str:
    if not im.predictions:
        return ""
    rows = []
    for rank, p in enumerate(im.predictions, 1):
        cls = ' class="target"' if p.index == im.target else ""
        width = f"{max(0.0, min(100.0, 100 * p.probability)):.1f}%"
        rows.append(
            f"<tr{cls}><td class=num>{rank}</td><td>{_e(p.label)} <span class=muted>[{_e(p.index)}]</span>"
            f'<div class=bar style="width:{width}"></div></td><td class=num>{100 * p.probability:.1f}%</td></tr>'
        )
    head = "<thead><tr><th>#</th><th>class</th><th>prob.</th></tr></thead>"
    return f"<table class=preds>{head}<tbody>{''.join(rows)}</tbody></table>"


def _image_section(report: Report, im: ImageExplanation) -> str:
    # the anchor is the image's position: a folder name may hold spaces, which an id cannot
    anchor = f"img-{next(i for i, other in enumerate(report.images) if other is im)}"
    parts = [f'<section class="image" id="{anchor}"><h2>{_e(im.name)}</h2>']
    if "image" in im.errors:
        msg = _e(im.errors["image"])
        parts.append(f'<div class="error"><strong>Could not explain this image:</strong> {msg}</div>')
        if im.source:
            parts.append(f"<p class=meta>file: <code>{_e(im.source)}</code></p>")
        parts.append("</section>")
        return "".join(parts)
    size = f"{im.original_size[0]}×{im.original_size[1]} px" if im.original_size else ""
    if im.rgb is not None:
        h, w = im.rgb.shape[:2]
        size += f"{', ' if size else ''}shown as the model sees it ({w}×{h})"
    target = (f"<p>Explained class: <strong>{_e(im.target_label)}</strong> [{_e(im.target)}]"
              f"{' (top-1)' if im.predictions and im.predictions[0].index == im.target else ''}</p>")
    parts.append(
        f'<div class="head"><div>{_img(report.png(im, "input"), "input: " + im.name)}'
        f"<p class=meta>{_e(size)}</p></div><div>{target}{_predictions(im)}</div></div>"
    )
    for tech in report.methods:
        png = report.png(im, tech)  # rendering may itself record a drawing error
        parts.append(f"<figure><h3>{_e(TITLES[tech])}</h3>")
        if tech in im.errors:
            parts.append(f'<div class="error"><strong>{_e(TITLES[tech])} failed:</strong> {_e(im.errors[tech])}</div>')
        for note in im.notes.get(tech, []):
            parts.append(f'<p class="note">{_e(note)}</p>')
        if png:
            parts.append(_img(png, f"{TITLES[tech]}: {im.name}"))
            parts.append(f"<figcaption>{_caption(im, tech, report.settings)}</figcaption>")
        parts.append("</figure>")
    parts.append(_agreement_html(im))
    times = ", ".join(f"{_e(k.removesuffix('_s'))} {v:.1f} s" for k, v in im.timings.items())
    parts.append(f"<p class=meta>time: {times}</p></section>")
    return "".join(parts)


def _agreement_html(im: ImageExplanation) -> str:
    """Whether Grad-CAM and occlusion agree on this image: the value, what it means, and both maps
    side by side where they disagree."""
    from .metrics.evidence import CHANCE_AGREEMENT, LOW_AGREEMENT

    rho = (im.agreement or {}).get("gradcam_occlusion_spearman")
    if rho is None:
        return ""
    cam, occ = im.results.get("gradcam"), im.results.get("occlusion")
    grid = ""
    if cam is not None and occ is not None:
        from .metrics.evidence import common_grid

        g = common_grid(cam, occ)
        grid = f" {g[0]}×{g[1]}"
    agree = rho >= LOW_AGREEMENT
    if rho >= CHANCE_AGREEMENT:
        word = "agree"
        meaning = "more than the maps of two different photos do in 95% of cases: each supports the other"
    elif agree:
        word = "neither agree nor disagree"
        meaning = ("no more than the maps of two different photos often do (up to "
                   f"{CHANCE_AGREEMENT:g}): neither map confirms the other")
    else:
        word = "<strong>disagree</strong>"
        meaning = (f"less than the maps of two different photos usually do (their median is {LOW_AGREEMENT:g}): "
                   "they point at different evidence, marked “disagree”; read neither alone")
    text = (f"<p>Grad-CAM and occlusion {word} on this image: rank correlation ρ {rho:.2f} between the two maps "
            f"at their common{grid} grid (the coarser of the two), {meaning}.</p>")
    if agree or cam is None or occ is None or im.rgb is None:
        return f"<figure><h3>Do the maps agree?</h3>{text}</figure>"
    import torch

    from .plotting import map_thumbnail

    rgb = torch.as_tensor(np.asarray(im.rgb, dtype=np.float32)).permute(2, 0, 1)
    pair = "".join(
        f"<figure>{_img(_thumb_png(map_thumbnail(rgb, r.maps[0])), 'side by side: ' + name)}"
        f"<figcaption>{_e(name)}</figcaption></figure>"
        for name, r in (("Grad-CAM", cam), ("occlusion", occ)))
    return f"<figure><h3>Do the maps agree?</h3>{text}<div class=pair>{pair}</div></figure>"


def _tier_html(settings: dict[str, Any]) -> str:
    """The banner at the top of every page of a run with lighter settings, with the command for the
    full ones."""
    tier = settings.get("tier") or {}
    if tier.get("name", "full") == "full":
        return ""
    return (f"<div class=tier>{_e(tier.get('said', ''))} For the full settings: "
            f"<code>{_e(tier.get('command', ''))}</code></div>")


def _settings_table(report: Report) -> str:
    rows = []
    for key, value in report.settings.items():
        if key == "versions":
            continue
        text = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
        rows.append(f"<tr><th>{_e(key)}</th><td><code>{_e(text)}</code></td></tr>")
    versions = ", ".join(f"{k} {v}" for k, v in report.settings.get("versions", {}).items())
    rows.append(f"<tr><th>versions</th><td>{_e(versions)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _body(report: Report) -> str:
    n, bad = len(report.images), len(report.failed)
    status = f"{n} image{'s' if n != 1 else ''} explained"
    if bad:
        status += f", <strong style=\"color:var(--bad)\">{bad} with errors</strong>"
    if report.skipped:
        status += f", {len(report.skipped)} folder entr{'ies' if len(report.skipped) != 1 else 'y'} skipped"
    total = report.timings.get("total_s")
    if total is not None:
        status += f" in {total:.1f} s"
    # the file name is enough here; summary.json keeps the whole path
    weights = f" · weights <code>{_e(Path(report.weights).name)}</code>" if report.weights else ""
    out = [
        "<header><h1>convlens report</h1>",
        f"<p class=meta>model <strong>{_e(report.model)}</strong>{weights}{_multi_label(report)}"
        f" · device {_e(report.device)}"
        f" · {_e(report.created)}</p><p>{status}.</p>",
        _tier_html(report.settings),
    ]
    if n > 1:
        links = "".join(
            f'<li><a href="#img-{i}"{" class=bad" if not im.ok else ""}>{_e(im.name)}</a></li>'
            for i, im in enumerate(report.images)
        )
        out.append(f"<nav><ul>{links}</ul></nav>")
    out.append("</header>")
    out.extend(_image_section(report, im) for im in report.images)
    if report.skipped:
        items = "".join(f"<li><code>{_e(s['path'])}</code>: {_e(s['reason'])}</li>" for s in report.skipped)
        out.append(f'<section class="skipped"><h2>Skipped</h2><ul>{items}</ul></section>')
    out.append(f"<footer>{glossary_html()}<details><summary>Settings and versions</summary>"
               f"<div class=scroll>{_settings_table(report)}</div></details></footer>")
    return "".join(out)


def render_html(report: Report, *, standalone: bool = True) -> str:
    """The report as HTML: a whole page (``standalone``) or a fragment for notebooks.

    Example::

        Path("report.html").write_text(render_html(convlens.explain("cat.jpg")))
    """
    body = f'<div class="convlens-report">{_body(report)}</div>'
    if not standalone:
        return f"<style>{CSS}{LEVEL_CSS}{NOTEBOOK_CSS}</style>{body}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>convlens report: {_e(report.model)}</title><style>{CSS}{LEVEL_CSS}"
        "body{margin:0;background:#f4f6f9}</style></head>\n"
        f"<body>{body}</body></html>\n"
    )


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


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {printable(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, str):
        return printable(v)  # valid UTF-8 JSON, no terminal escapes, whatever the file names hold
    if v is None or isinstance(v, (int, float, bool)):
        return v
    if hasattr(v, "tolist"):
        return _clean(v.tolist())
    return str(v)


def to_json(data: dict[str, Any]) -> str:
    """Strict JSON (non-finite numbers become null; other objects their ``str``)."""
    return json.dumps(_clean(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# -- the comparison page (convlens compare) -------------------------------------------------
def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


LEVEL_CSS = """
.convlens-report .level{display:inline-block;padding:0 .45em;border-radius:4px;font-weight:600;white-space:nowrap}
.convlens-report .level.trust{background:#dcfae6;color:#085d3a}
.convlens-report .level.weak{background:#fff4d6;color:#7a4b00}
.convlens-report .level.do-not-trust{background:var(--badbg);color:var(--bad)}
.convlens-report ul.verdicts{list-style:none;padding:0}
.convlens-report ul.verdicts li{margin:.5em 0}
.convlens-report .thumbs{display:flex;flex-wrap:wrap;gap:4px;align-items:center;margin:.3em 0 .8em}
.convlens-report .thumbs img{width:96px;height:auto}
.convlens-report dl.columns dt{font-weight:600;margin-top:.4em}
.convlens-report dl.columns dd{margin:0 0 0 1em}
"""


def level_badge(level: str) -> str:
    """A verdict level as a coloured label (``trust`` green, ``weak`` amber, ``do not trust`` red)."""
    return f'<span class="level {_e(level.replace(" ", "-"))}">{_e(level)}</span>'


def verdict_list(verdicts: dict[str, dict[str, Any]], names: dict[str, str] | None = None) -> str:
    """The verdicts as an HTML list: method, level, reasons."""
    items = "".join(
        f"<li><strong>{_e((names or {}).get(m, m))}</strong> {level_badge(v['level'])} "
        f"{' '.join(_e(r) for r in v['reasons'])}</li>"
        for m, v in verdicts.items()
    )
    return f"<ul class=verdicts>{items}</ul>"


def _thumb_png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def comparison_html(comparison: Any, png: bytes | None = None) -> str:
    """The self-contained HTML page of a :class:`convlens.metrics.compare.Comparison`: the verdicts
    in words first, a row of map thumbnails per method, the summary table (mean over the images,
    the difference to the random maps with its interval) with every column explained under it,
    the ranking, the curves, and the per-image numbers, in the report's style (same CSS, no
    script, no network).

    Example::

        Path("compare.html").write_text(comparison_html(convlens.compare(clf, x)))
    """
    from .plotting import map_thumbnail

    summary = comparison.summary()
    verdicts = comparison.verdicts()
    n = len(comparison.images)
    rows = []
    for s in summary:
        name = _e(s["method"])
        if s.get("error"):
            rows.append(f"<tr><td>{name}</td><td>{level_badge('do not trust')}</td>"
                        f"<td colspan=7 class=error>{_e(s['error'])}</td></tr>")
            continue
        passed = s.get("sanity_passed")
        sanity = "–" if passed is None else (("pass" if passed == 1 else "FAIL") if n == 1 else f"{passed:.0%} pass")
        cls = ' class="bad"' if passed is not None and passed < 1 else ""
        vr = (s.get("vs") or {}).get(s.get("random") or "")
        vc = (s.get("vs") or {}).get("centred Gaussian")

        def vs(v: dict[str, Any] | None) -> str:
            if v is None:
                return "<td class=num>–</td>"
            extra = f" [{v['low']:+.2f}, {v['high']:+.2f}]" if "low" in v else f" ± {v['margin']:.3f}"
            return f"<td class=num>{v['difference']:+.3f}<br><span class=muted>{_e(extra.strip())}</span></td>"

        def auc(key: str, s: dict[str, Any] = s) -> str:  # the mean, and its 95% interval over 5+ images
            ci = (s.get("intervals") or {}).get(key)
            extra = f"<br><span class=muted>[{ci[0]:.2f}, {ci[1]:.2f}]</span>" if ci else ""
            return f"<td class=num>{_num(s.get(key))}{extra}</td>"

        level = "<span class=muted>reference</span>" if s["reference"] else level_badge(
            verdicts.get(s["method"], {}).get("level", ""))
        best = (s.get("vs") or {}).get("best")
        rows.append(
            f"<tr><td>{name}</td><td>{level}</td>{auc('deletion_auc')}{auc('insertion_auc')}{auc('difference')}"
            f"{vs(vr)}{vs(vc)}{vs(best) if not s['reference'] and s.get('rank', 0) > 1 else '<td class=num>–</td>'}"
            f"<td class=num>{_num(s.get('class_sensitivity'), 2)}</td><td{cls}>{_e(sanity)}</td>"
            f"<td class=num>{_e(s.get('rank', ''))}</td></tr>"
        )
    head = ("<tr><th>method</th><th>verdict</th><th>deletion</th><th>insertion</th><th>ins-del</th>"
            "<th>vs random</th><th>vs centre</th><th>vs best</th><th>class rho</th><th>sanity</th><th>rank</th></tr>")
    columns = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in comparison.columns().items() if k != "map s")
    thumbs = getattr(comparison, "thumbnails", {}) or {}
    strip = []
    if "image" in thumbs:
        imgs = thumbs["image"]
        for key in ["image"] + [r.method for r in comparison.rows if not r.reference and r.method in thumbs]:
            cells = "".join(
                _img(_thumb_png((imgs[i].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
                                if key == "image" else map_thumbnail(imgs[i], thumbs[key][i])),
                     f"{key}: {comparison.images[i] if i < n else i}")
                for i in range(imgs.shape[0]))
            label = "the images" if key == "image" else key
            badge = "" if key == "image" else " " + level_badge(verdicts.get(key, {}).get("level", ""))
            strip.append(f"<h3>{_e(label)}{badge}</h3><div class=thumbs>{cells}</div>")
    shown = min(n, int(thumbs["image"].shape[0])) if "image" in thumbs else 0
    per = comparison.per_image()
    keys = ["image", "method", "deletion_auc", "insertion_auc", "class_sensitivity", "sanity_rho", "seconds"]

    def pcell(v: Any) -> str:
        if isinstance(v, float):
            return f"<td class=num>{_e(_num(v, 3))}</td>"
        return f"<td>{_e('' if v is None else v)}</td>"

    prow = "".join("<tr>" + "".join(pcell(r.get(k)) for k in keys) + "</tr>" for r in per)
    s = comparison.settings
    refs = s.get("references") or {}
    how = (
        f"Deletion / insertion: {s.get('steps')} steps, baseline <code>{_e(s.get('baseline'))}</code>, score = "
        "probability of the target class, AUC = trapezoid over the fraction of pixels. Random references: "
        f"{_e(refs.get('random map', ''))}. Margin on one image: {_e(refs.get('margin', ''))}; intervals over "
        f"images: {_e(refs.get('bootstrap', ''))}. Occlusion: <code>{_e(s.get('occlusion'))}</code>."
    )
    from .metrics.evidence import MIN_IMAGES

    few = "One image" if n == 1 else f"{n} images"
    one = "" if n >= MIN_IMAGES else (
        f"<p class=note>{few} cannot rank methods closer than the noise margin: the differences below are real only "
        f"where they exceed it. Compare {MIN_IMAGES} or more photos for intervals.</p>")
    body = (
        f"<header><h1>Which map to believe</h1><p class=meta>model <strong>{_e(comparison.model)}</strong> · "
        f"{n} image{'s' if n != 1 else ''}</p></header>"
        f'<section class="image"><h2>Verdicts</h2>{verdict_list(verdicts)}{one}'
        f"<p>Ranking (&gt; a real difference, ≈ within the noise): {_e(comparison.ranking_text())}.</p></section>"
        + (f'<section class="image"><h2>The maps it ranks</h2><p class=meta>the first {shown} image'
           f"{'s' if shown != 1 else ''}; red where the map is highest</p>{''.join(strip)}</section>" if strip else "")
        + f'<section class="image"><h2>Summary</h2><div class=scroll><table>{head}{"".join(rows)}</table></div>'
        f"<dl class=columns>{columns}</dl><p class=meta>{how}</p></section>"
        f'<section class="image"><h2>Curves</h2>{_img(png, "map thumbnails and deletion and insertion curves")}'
        "</section>"
        f'<section class="image"><details><summary>Per image</summary><div class=scroll><table><tr>'
        + "".join(f"<th>{_e(k)}</th>" for k in keys) + f"</tr>{prow}</table></div></details></section>"
        f"<footer>{glossary_html()}</footer>"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>convlens compare: {_e(comparison.model)}</title><style>{CSS}{LEVEL_CSS}"
        ".convlens-report td.bad{color:var(--bad);font-weight:600}"
        "body{margin:0;background:#f4f6f9}</style></head>\n"
        f'<body><div class="convlens-report">{body}</div></body></html>\n'
    )


# -- the trust section (convlens explain) ---------------------------------------------------
def trust_caption(trust: Any, label: str) -> str:
    """The caption of the report's "How far to trust these maps" figure: the verdict per map in
    words first, then how to read the curves, then a table of each map's deletion and insertion
    AUC beside the references' (random maps at the map's own grid, a centred Gaussian), class
    sensitivity and sanity verdict."""
    if trust is None:
        return ""

    auc = trust.auc()
    rows = []
    for tech, a in auc.items():
        ref = tech not in trust.class_rho
        name = tech if ref else METHOD_TITLES.get(tech, tech)
        rho = trust.class_rho.get(tech)
        other = trust.other.get(tech)
        cls = "–" if rho is None or not math.isfinite(rho) else (
            f"{rho:.2f} vs “{_e(other)}” ({'different' if rho < trust.settings['class_threshold'] else 'same'} map)")
        v = trust.sanity.get(tech)
        sanity = "–" if v is None else (
            f"{'passes' if v['passed'] else '<strong>fails</strong>'} (ρ {v['rho']:.2f} after re-initialising "
            f"<code>{_e(v['stage'])}</code>; checked once per run, on {_e(v['image'])})")
        spread = getattr(trust, "spread", {}).get(tech)
        extra = f" <span class=muted>(draws ± {spread:.3f})</span>" if spread is not None else ""
        level = (getattr(trust, "verdicts", {}).get(tech) or {}).get("level")
        rows.append(f"<tr><td>{_e(name)}{extra}</td><td>{level_badge(level) if level else 'reference'}</td>"
                    f"<td class=num>{a['deletion']:.3f}</td><td class=num>{a['insertion']:.3f}</td>"
                    f"<td class=num>{a['insertion'] - a['deletion']:.3f}</td><td>{cls}</td><td>{sanity}</td></tr>")
    head = ("<tr><th>map</th><th>verdict</th><th>deletion AUC (lower is better)</th>"
            "<th>insertion AUC (higher is better)</th><th>ins − del</th><th>class ρ (vs least likely)</th>"
            "<th>sanity check (model randomisation)</th></tr>")
    steps, base = trust.settings.get("steps"), trust.settings.get("baseline")
    names = {t: METHOD_TITLES.get(t, t) for t in getattr(trust, "verdicts", {})}
    verdicts = verdict_list(trust.verdicts, names) if getattr(trust, "verdicts", None) else ""
    return (
        f"{verdicts}Deletion: the pixels a map ranks highest are replaced first by a <code>{_e(base)}</code> copy "
        f"({_e(steps)} steps); if the map found what the model uses, the probability of {label} falls fast, so "
        "a lower area under the curve (AUC) is better. Insertion: start from the blurred photo and reveal the top "
        "pixels first; the probability should rise fast, so a higher AUC is better. The references give the scale: "
        "random maps drawn on each map's own grid and enlarged the same way (dashed; their spread is the noise on "
        "one photo) and a centred Gaussian (a map that only says 'the object is in the middle'). Class ρ: how alike "
        "the maps for this class and for the least likely class are (high: the map ignores the class). The sanity "
        "check re-initialises the classifier: a map that explains the decision must change (ρ below 0.5)."
        f"<div class=scroll><table>{head}{''.join(rows)}</table></div>"
    )


# -- many images: the index page and summary.csv -----------------------------------------------
#: An image whose top-1 probability is below this is marked "low confidence" on the index.
LOW_CONFIDENCE = 0.25
#: An image whose Grad-CAM and occlusion maps (at their common grid) have a Spearman correlation below
#: this is marked "disagree" (calibrated: :data:`convlens.metrics.evidence.LOW_AGREEMENT`)
LOW_AGREEMENT = _LOW_AGREEMENT

INDEX_CSS = """
.convlens-index .views{display:flex;flex-wrap:wrap;gap:.4em;align-items:center;margin:.6em 0}
.convlens-index .views label{padding:.15em .7em;border:1px solid var(--line);border-radius:99px;cursor:pointer;
 color:var(--accent);background:var(--card)}
.convlens-index input.view{position:absolute;opacity:0;pointer-events:none}
.convlens-index .grid{display:flex;flex-wrap:wrap;gap:8px;margin-top:8px}
.convlens-index .card{display:block;width:118px;padding:6px;border:1px solid var(--line);border-radius:8px;
 background:var(--card);text-decoration:none;color:var(--fg);font-size:12px;line-height:1.3}
.convlens-index .card img{width:104px;height:104px;object-fit:cover;border-radius:4px;background:var(--bg)}
.convlens-index .card .thumb-missing{width:104px;height:104px;border-radius:4px;background:var(--badbg)}
.convlens-index .card .cls{font-weight:600;display:block;margin-top:3px}
.convlens-index .card .name{color:var(--muted);display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.convlens-index .card.flag{border-color:#c27c00}
.convlens-index .card.bad{border-color:var(--bad);background:var(--badbg)}
.convlens-index .mark{display:inline-block;font-size:10px;padding:0 .35em;margin:2px 2px 0 0;border-radius:3px;
 background:#fff4d6;color:#7a4b00}
.convlens-index .mark.error{background:var(--bad);color:#fff}
#v-class:checked~.grid .card{order:var(--by-class)}
#v-conf:checked~.grid .card{order:var(--by-conf)}
#v-name:checked~.grid .card{order:var(--by-name)}
#v-flag:checked~.grid .card:not(.flag):not(.bad){display:none}
#v-class:checked~.views label[for=v-class],#v-conf:checked~.views label[for=v-conf],
#v-name:checked~.views label[for=v-name],#v-flag:checked~.views label[for=v-flag]{background:var(--accent);color:#fff}
"""


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


def _top1(im: dict[str, Any]) -> dict[str, Any] | None:
    preds = im.get("predictions") or []
    return preds[0] if preds else None


def image_marks(
    im: dict[str, Any], *, low_confidence: float = LOW_CONFIDENCE, low_agreement: float = LOW_AGREEMENT
) -> list[str]:
    """Why one image of a summary deserves a look: ``"error"`` (any technique or the image
    failed), ``"low confidence"`` (top-1 probability < ``low_confidence``), ``"disagree"`` (Grad-CAM
    and occlusion maps' Spearman correlation < ``low_agreement``).

    Example::

        image_marks(summary["images"][0])   # e.g. ["low confidence"]
    """
    marks = []
    if im.get("errors") or not im.get("ok", True):
        marks.append("error")
    top = _top1(im)
    if top is not None and top.get("probability") is not None and top["probability"] < low_confidence:
        marks.append("low confidence")
    rho = (im.get("agreement") or {}).get("gradcam_occlusion_spearman")
    if rho is not None and rho < low_agreement:
        marks.append("disagree")
    return marks


def render_index(
    summary: dict[str, Any],
    thumbnails: dict[str, bytes] | None = None,
    *,
    page: str = "{folder}/report.html",
    low_confidence: float = LOW_CONFIDENCE,
    low_agreement: float = LOW_AGREEMENT,
) -> str:
    """The index page of a run over many images, from its summary (:func:`summary_dict`'s dict).

    A grid of small thumbnails (``thumbnails``: image folder -> JPEG/PNG bytes, embedded as data
    URIs; see :func:`thumbnail`), each with the image's top-1 class and probability, linking to the
    image's own page (``page`` with ``{folder}`` filled in, URL-quoted). Images with errors, low
    confidence or Grad-CAM/occlusion disagreement are marked (:func:`image_marks`); an image
    that could not be read and has no files (so no page) has no link. Views without
    JavaScript (the page's CSP forbids scripts): radio buttons and CSS ``order`` sort one grid by
    predicted class (then probability), by probability, or by name, or show only marked images;
    without CSS it reads in class order. Each thumbnail appears once, so the page stays small.

    Example::

        html = render_index(summary, {im.key: thumbnail(im.rgb) for im in report.images})
    """
    from urllib.parse import quote

    thumbnails = thumbnails or {}
    images = list(summary.get("images", []))

    def conf(im: dict[str, Any]) -> float:
        top = _top1(im)
        p = top.get("probability") if top else None
        return float(p) if isinstance(p, (int, float)) and math.isfinite(p) else -1.0

    def cls(im: dict[str, Any]) -> str:
        top = _top1(im)
        return str(top["label"]) if top else ""

    counts: dict[str, int] = {}
    for im in images:
        counts[cls(im)] = counts.get(cls(im), 0) + 1
    # by class: the most frequent classes first, then by name; inside a class the surest first
    by_class = sorted(range(len(images)), key=lambda i: (cls(images[i]) == "", -counts[cls(images[i])],
                                                         cls(images[i]), -conf(images[i]), i))
    by_conf = sorted(range(len(images)), key=lambda i: (-conf(images[i]), i))
    by_name = sorted(range(len(images)), key=lambda i: (str(images[i].get("name", "")), i))
    rank = {name: {i: r for r, i in enumerate(order)} for name, order in
            (("class", by_class), ("conf", by_conf), ("name", by_name))}
    cards = []
    n_flag = n_bad = 0
    for i in by_class:
        im = images[i]
        marks = image_marks(im, low_confidence=low_confidence, low_agreement=low_agreement)
        kind = "bad" if "error" in marks else ("flag" if marks else "")
        n_bad += kind == "bad"
        n_flag += kind == "flag"
        folder = str(im.get("folder", ""))
        href = page.format(folder=quote(folder))
        top = _top1(im)
        thumb = thumbnails.get(folder)
        pic = (f'<img src="{data_uri(thumb)}" alt="{_e(im.get("name", ""))}" loading="lazy">' if thumb
               else '<div class="thumb-missing"></div>')
        label = (f'<span class=cls>{_e(top["label"])}</span>{100 * conf(im):.1f}%' if top
                 else '<span class=cls>not explained</span>')
        badges = "".join(f'<span class="mark{" error" if m == "error" else ""}">{_e(m)}</span>' for m in marks)
        tip = "; ".join(f"{k}: {v}" for k, v in (im.get("errors") or {}).items())
        rho = (im.get("agreement") or {}).get("gradcam_occlusion_spearman")
        if rho is not None:
            tip = (tip + "; " if tip else "") + f"Grad-CAM/occlusion Spearman {rho:.2f}"
        style = f"--by-class:{rank['class'][i]};--by-conf:{rank['conf'][i]};--by-name:{rank['name'][i]}"
        unread = im.get("files") == [] and "image" in (im.get("errors") or {})  # no page was written
        link = "" if unread else f' href="{_e(href)}"'
        cards.append(
            f'<a class="card {kind}"{link} style="{style}" title="{_e(tip)}">{pic}{label}'
            f'<span class=name>{_e(im.get("name", ""))}</span>{badges}</a>'
        )
    model = summary.get("model") or {}
    n = len(images)
    status = f"{n} image{'s' if n != 1 else ''}"
    if n_bad:
        status += f', <strong style="color:var(--bad)">{n_bad} with errors</strong>'
    if n_flag:
        status += f", {n_flag} marked (top-1 below {100 * low_confidence:.0f}% or Grad-CAM/occlusion " \
                  f"rank correlation below {low_agreement:g})"
    skipped = summary.get("skipped") or []
    if skipped:
        status += f", {len(skipped)} file{'s' if len(skipped) != 1 else ''} skipped"
    views = (
        '<input class=view type=radio name=view id=v-class checked><input class=view type=radio name=view id=v-conf>'
        "<input class=view type=radio name=view id=v-name><input class=view type=radio name=view id=v-flag>"
        '<div class=views><span class=muted>order:</span><label for=v-class>by class</label>'
        "<label for=v-conf>by confidence</label><label for=v-name>by name</label>"
        "<label for=v-flag>marked only</label></div>"
    )
    body = (
        f"<header><h1>convlens report</h1><p class=meta>model <strong>{_e(model.get('name', ''))}</strong>"
        f" · device {_e(model.get('device', ''))} · {_e(summary.get('created', ''))}</p><p>{status}.</p>"
        f"{_tier_html(summary.get('settings') or {})}</header>"
        f'{views}<div class="grid">{"".join(cards)}</div>'
    )
    if skipped:
        items = "".join(f"<li><code>{_e(s.get('path', ''))}</code>: {_e(s.get('reason', ''))}</li>" for s in skipped)
        body += f'<section class="skipped"><h2>Skipped</h2><ul>{items}</ul></section>'
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>convlens report: {_e(model.get('name', ''))}, {n} images</title><style>{CSS}{INDEX_CSS}"
        "body{margin:0;background:#f4f6f9}</style></head>\n"
        f'<body><div class="convlens-report convlens-index">{body}</div></body></html>\n'
    )


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
