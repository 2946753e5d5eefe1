r"""The HTML of a report: one image's page (:func:`render_html`) and the pieces the other pages share
(the Content-Security-Policy, the CSS, escaping, embedded PNGs, verdict badges, the glossary).

Every page embeds each image as a base64 PNG ``data:`` URI, carries its CSS inline, needs no
JavaScript, makes no network request (its Content-Security-Policy forbids any), reflows for phones,
and escapes every label and file name. ``report`` is a :class:`convlens.report.Report` and ``im`` one
of its :class:`~convlens.report.ImageExplanation`\ s, typed ``Any`` here because
:mod:`convlens.report` imports this module (the import graph has no circles).
"""

from __future__ import annotations

import io
import math
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from .display import METHOD_TITLES, data_uri
from .metrics.evidence import LOW_AGREEMENT as _LOW_AGREEMENT
from .outputs import printable

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


def _caption(im: Any, tech: str, settings: dict[str, Any]) -> str:
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


def _multi_label(report: Any) -> str:
    """The header's note for a multi-label model: its probabilities are independent sigmoids."""
    if not report.input.get("multi_label"):
        return ""
    return " · <strong>multi-label</strong>: each class's probability is its own sigmoid (they need not sum to 1)"


def _predictions(im: Any) -> str:
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


def _image_section(report: Any, im: Any) -> str:
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


def _agreement_html(im: Any) -> str:
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

    rgb = torch.from_numpy(np.asarray(im.rgb, dtype=np.float32)).permute(2, 0, 1)
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


def _settings_table(report: Any) -> str:
    rows = []
    for key, value in report.settings.items():
        if key == "versions":
            continue
        text = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
        rows.append(f"<tr><th>{_e(key)}</th><td><code>{_e(text)}</code></td></tr>")
    versions = ", ".join(f"{k} {v}" for k, v in report.settings.get("versions", {}).items())
    rows.append(f"<tr><th>versions</th><td>{_e(versions)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _body(report: Any) -> str:
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


def render_html(report: Any, *, standalone: bool = True) -> str:
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


# -- the marks of the index page and summary.csv (convlens.page_index, convlens.report) ----------
#: An image whose top-1 probability is below this is marked "low confidence" on the index.
LOW_CONFIDENCE = 0.25


#: An image whose Grad-CAM and occlusion maps (at their common grid) have a Spearman correlation below
#: this is marked "disagree" (calibrated: :data:`convlens.metrics.evidence.LOW_AGREEMENT`)
LOW_AGREEMENT = _LOW_AGREEMENT
