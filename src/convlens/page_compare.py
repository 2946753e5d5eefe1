"""The page of :func:`convlens.compare` (:func:`comparison_html`): the methods' maps side by side with
their verdicts, as one self-contained HTML page.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .page import (
    CSP,
    CSS,
    LEVEL_CSS,
    _e,
    _img,
    _num,
    _thumb_png,
    glossary_html,
    level_badge,
    verdict_list,
)


def comparison_html(comparison: Any, png: bytes | None = None) -> str:
    """The self-contained HTML page of a :class:`convlens.metrics.compare.Comparison`: the verdicts
    in words first, a row of map thumbnails per method, the summary table (mean over the images,
    the difference to the random maps with its interval) with every column explained under it,
    the ranking, the curves, and the per-image numbers, in the report's style (same CSS, no
    script, no network).

    Example::

        Path("compare.html").write_text(comparison_html(convlens.compare(clf, x)))

    It is long because it is one page's template, top to bottom; its cell formatters are inner helpers.
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
