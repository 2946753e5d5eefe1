"""The self-contained HTML report and the JSON summary of a :class:`convlens.explain.Report`.

Nothing here computes an explanation: it formats what :func:`convlens.explain` found. The HTML
embeds every image as a base64 PNG ``data:`` URI, carries its CSS inline, needs no JavaScript,
makes no network request (its Content-Security-Policy forbids any), reflows for phones, and
escapes every label and file name.
"""

from __future__ import annotations

import base64
import json
import math
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .explain import ImageExplanation, Report

__all__ = ["render_html", "summary_dict", "to_json"]

TITLES = {
    "input": "Input",
    "activations": "Activations",
    "gradcam": "Grad-CAM",
    "occlusion": "Occlusion sensitivity",
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
@media (max-width:640px){
 .convlens-report{padding:8px;font-size:14px}
 .convlens-report .head{grid-template-columns:minmax(0,1fr)}
 .convlens-report section.image{padding:10px}
}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" loading="eager">'


def _caption(im: ImageExplanation, tech: str, settings: dict[str, Any]) -> str:
    label = f"“{_e(im.target_label)}”" if im.target_label else "the target"
    if tech == "activations":
        layers = im.layers.get("activations") or []
        names = ", ".join(f"<code>{_e(n)}</code>" for n in layers)
        k = settings["activations"]["channels"]
        return (f"Outputs of the model's stages ({names}); each row shows a stage's {_e(k)} most active "
                "channels on this image. Early stages answer to edges and colours, later ones to parts and textures.")
    if tech == "gradcam":
        return (f"Grad-CAM ({_e(settings['gradcam']['method'])}) at <code>{_e(im.layers.get('gradcam', ''))}</code> "
                f"for {label}: where the features that raise this class's score lie.")
    if tech == "occlusion":
        s = settings["occlusion"]
        return (f"A grey patch of {_e(s['patch'])} px, moved in steps of {_e(s['stride'])} px; red where hiding "
                f"the region lowers the {_e(s['score'])} of {label}, blue where it raises it.")
    if tech == "filters":
        chans = ", ".join(_e(c) for c in im.channels.get("filters", []))
        fv, cam = im.layers.get("filters", ""), im.layers.get("gradcam", "")
        where = f"<code>{_e(fv)}</code>" + (f" (before the activation of <code>{_e(cam)}</code>)"
                                             if cam and fv != cam else "")
        return (f"Synthetic images that excite channels {chans} of {where} most: the channels of the Grad-CAM "
                "layer that fired most on this photo, i.e. what the network saw here.")
    return ""


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
    parts = [f'<section class="image" id="img-{_e(im.key)}"><h2>{_e(im.name)}</h2>']
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
    times = ", ".join(f"{_e(k.removesuffix('_s'))} {v:.1f} s" for k, v in im.timings.items())
    parts.append(f"<p class=meta>time: {times}</p></section>")
    return "".join(parts)


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
        status += f", {len(report.skipped)} non-image file{'s' if len(report.skipped) != 1 else ''} skipped"
    total = report.timings.get("total_s")
    if total is not None:
        status += f" in {total:.1f} s"
    # the file name is enough here; summary.json keeps the whole path
    weights = f" · weights <code>{_e(Path(report.weights).name)}</code>" if report.weights else ""
    out = [
        "<header><h1>convlens report</h1>",
        f"<p class=meta>model <strong>{_e(report.model)}</strong>{weights} · device {_e(report.device)}"
        f" · {_e(report.created)}</p><p>{status}.</p>",
    ]
    if n > 1:
        links = "".join(
            f'<li><a href="#img-{_e(im.key)}"{" class=bad" if not im.ok else ""}>{_e(im.name)}</a></li>'
            for im in report.images
        )
        out.append(f"<nav><ul>{links}</ul></nav>")
    out.append("</header>")
    out.extend(_image_section(report, im) for im in report.images)
    if report.skipped:
        items = "".join(f"<li><code>{_e(s['path'])}</code>: {_e(s['reason'])}</li>" for s in report.skipped)
        out.append(f'<section class="skipped"><h2>Skipped</h2><ul>{items}</ul></section>')
    out.append(f"<footer><details><summary>Settings and versions</summary>{_settings_table(report)}</details></footer>")
    return "".join(out)


def render_html(report: Report, *, standalone: bool = True) -> str:
    """The report as HTML: a whole page (``standalone``) or a fragment for notebooks.

    Example::

        Path("report.html").write_text(render_html(convlens.explain("cat.jpg")))
    """
    body = f'<div class="convlens-report">{_body(report)}</div>'
    if not standalone:
        return f"<style>{CSS}</style>{body}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>convlens report: {_e(report.model)}</title><style>{CSS}"
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
                "files": files.get(im.key, []),
            }
            for im in report.images
        ],
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if hasattr(v, "tolist"):
        return _clean(v.tolist())
    return str(v)


def to_json(data: dict[str, Any]) -> str:
    """Strict JSON (non-finite numbers become null; other objects their ``str``)."""
    return json.dumps(_clean(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
