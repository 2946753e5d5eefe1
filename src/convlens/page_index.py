"""The index page of a run over many images (:func:`render_index`): a thumbnail grid built from the
run's summary, with the marks (:func:`image_marks`) that ``summary.csv`` shares.
"""

from __future__ import annotations

import math
from typing import Any

from .display import data_uri
from .page import (
    CSP,
    CSS,
    LOW_AGREEMENT,
    LOW_CONFIDENCE,
    _e,
    _tier_html,
)

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

    It is long because it is one page's template (the grid grouped by class, the marks, the skipped
    entries), read top to bottom.
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
