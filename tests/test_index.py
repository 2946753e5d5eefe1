"""The index page for many images and summary.csv: order, marks, links, thumbnails, escaping."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import convlens
from convlens.report import CSP, CSV_COLUMNS, image_marks, render_index, summary_csv, summary_dict, thumbnail


def _im(name, folder, preds, rho=None, errors=None):
    return {
        "name": name, "source": f"/photos/{name}", "folder": folder, "ok": not errors,
        "predictions": [{"label": lab, "index": i, "probability": p} for lab, i, p in preds],
        "target": {"index": preds[0][1], "label": preds[0][0]} if preds else None,
        "agreement": {} if rho is None else {"gradcam_occlusion_spearman": rho},
        "errors": errors or {},
    }


SUMMARY = {
    "model": {"name": "tiny<net>", "device": "cpu"}, "created": "2026-11-26 09:00:00",
    "skipped": [{"path": "notes.txt", "reason": "not an image file (suffix)"}],
    "images": [
        _im("dog.jpg", "dog.jpg", [("dog", 2, 0.1), ("cat", 1, 0.05)], rho=0.5),
        _im("cat-sure.jpg", "cat-sure.jpg", [("cat", 1, 0.9)], rho=0.6),
        _im("broken.jpg", "broken.jpg", [], errors={"image": "cannot identify image file"}),
        _im("<script>alert(1)</script>.png", "script_alert_1_script_.png", [("cat", 1, 0.5)], rho=-0.2),
        _im("=HYPERLINK(1).jpg", "HYPERLINK_1_.jpg", [("ant", 7, 0.95)], rho=None,
            errors={"occlusion": "RuntimeError: boom"}),
    ],
}


class _Cards(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, str]] = []
        self.tags: list[str] = []
        self._in: dict[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "a" and "card" in (a.get("class") or ""):
            self._in = {**a, "text": "", "img": ""}
            self.cards.append(self._in)
        elif tag == "img" and self._in is not None:
            self._in["img"] = a.get("src", "")

    def handle_endtag(self, tag):
        if tag == "a":
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._in["text"] += data + "|"


def _parse(html: str) -> _Cards:
    p = _Cards()
    p.feed(html)
    return p


def test_marks():
    ims = SUMMARY["images"]
    assert [image_marks(im) for im in ims] == [["low confidence"], [], ["error"], ["disagree"], ["error"]]
    assert image_marks(ims[1], low_confidence=0.95) == ["low confidence"]
    assert image_marks(ims[0], low_agreement=0.55) == ["low confidence", "disagree"]


def test_index_order_links_marks_and_escaping():
    jpeg = thumbnail(np.full((40, 80, 3), 0.5, np.float32))
    html = render_index(SUMMARY, {"cat-sure.jpg": jpeg})
    p = _parse(html)
    # DOM (and no-CSS) order: by class, most frequent class first (cat x2), surest first; no class last
    assert [c["href"] for c in p.cards] == [
        "cat-sure.jpg/report.html", "script_alert_1_script_.png/report.html", "HYPERLINK_1_.jpg/report.html",
        "dog.jpg/report.html", "broken.jpg/report.html"]
    orders = [dict(re.findall(r"--by-(\w+):(\d+)", c["style"])) for c in p.cards]
    assert [int(o["class"]) for o in orders] == [0, 1, 2, 3, 4]
    assert [int(o["conf"]) for o in orders] == [1, 2, 0, 3, 4]  # 0.9, 0.5, 0.95, 0.1, none
    assert [int(o["name"]) for o in orders] == [3, 0, 1, 4, 2]  # '<' < '=' < 'b' < 'c' < 'd'
    assert [c["class"].split()[1:] for c in p.cards] == [[], ["flag"], ["bad"], ["flag"], ["bad"]]
    assert "cat|90.0%|cat-sure.jpg|" == p.cards[0]["text"]
    assert "disagree" in p.cards[1]["text"] and "Spearman -0.20" in p.cards[1]["title"]
    assert "low confidence" in p.cards[3]["text"] and "not explained" in p.cards[4]["text"]
    assert "cannot identify image file" in p.cards[4]["title"]
    assert base64.b64decode(p.cards[0]["img"].split(",", 1)[1]) == jpeg and p.cards[1]["img"] == ""
    assert "script" not in p.tags and "&lt;script&gt;" in html and "tiny&lt;net&gt;" in html
    assert f'content="{CSP}"' in html and "5 images" in html and "2 with errors" in html
    assert "notes.txt" in html and "1 file skipped" in html
    custom = _parse(render_index(SUMMARY, page="pages/{folder}.html"))
    assert custom.cards[0]["href"] == "pages/cat-sure.jpg.html"


def test_thumbnail_size_and_pixels():
    rgb = np.zeros((60, 120, 3), np.float32)
    rgb[..., 0] = 1.0
    im = Image.open(io.BytesIO(thumbnail(rgb, 96)))
    assert im.format == "JPEG" and im.size == (96, 48)
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


def test_summary_csv_rows():
    rows = list(csv.reader(io.StringIO(summary_csv(SUMMARY))))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 6
    rec = [dict(zip(CSV_COLUMNS, r)) for r in rows[1:]]
    assert rec[0]["top1"] == "dog" and float(rec[0]["top1_probability"]) == 0.1 and rec[0]["marks"] == "low confidence"
    assert rec[0]["top5"] == "dog (0.1000); cat (0.0500)" and rec[0]["gradcam_occlusion_spearman"] == "0.5"
    assert rec[2]["ok"] == "false" and rec[2]["top1"] == "" and rec[2]["errors"] == "image: cannot identify image file"
    assert rec[3]["name"] == "<script>alert(1)</script>.png" and rec[3]["marks"] == "disagree"
    assert rec[4]["name"] == "'=HYPERLINK(1).jpg" and rec[4]["gradcam_occlusion_spearman"] == ""


def test_index_and_csv_from_a_real_run(clf, tmp_path):
    img = convlens.sample_image()
    img.save(tmp_path / "cat.png")
    img.transpose(0).save(tmp_path / "cat-mirror.png")
    report = convlens.explain(tmp_path, clf, techniques=["gradcam", "occlusion"],
                              options={"occlusion": {"patch": 112, "stride": 56}})
    summary = summary_dict(report)
    thumbs = {im.key: thumbnail(im.rgb) for im in report.images}
    html = render_index(summary, thumbs)
    p = _parse(html)
    assert sorted(c["href"] for c in p.cards) == ["cat-mirror.png/report.html", "cat.png/report.html"]
    for im in report.images:
        card = next(c for c in p.cards if c["href"].startswith(im.key + "/"))
        assert card["text"].startswith(f"{im.predictions[0].label}|{100 * im.predictions[0].probability:.1f}%")
    assert len(html) < 40_000  # thumbnails, not figures: a thousand images stay a few MB
    rows = list(csv.DictReader(io.StringIO(summary_csv(summary))))
    assert [r["name"] for r in rows] == [im.name for im in report.images]
    assert [float(r["top1_probability"]) for r in rows] == [im.predictions[0].probability for im in report.images]
    assert [float(r["gradcam_occlusion_spearman"]) for r in rows] == [
        im.agreement["gradcam_occlusion_spearman"] for im in report.images]


def test_index_views_in_headless_chromium(tmp_path):
    """The CSS-only views really reorder and filter the one grid in a browser, with no script."""
    headless = pytest.importorskip("headless", reason="tests/headless.py is not importable")
    exe = headless.find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the browser check did not run")
    path = tmp_path / "index.html"
    path.write_text(render_index(SUMMARY, {"cat-sure.jpg": thumbnail(np.full((40, 80, 3), 0.5, np.float32))}))
    shown = ("JSON.stringify([...document.querySelectorAll('.card')].filter(c => c.offsetParent !== null)"
             ".map(c => [Math.round(c.getBoundingClientRect().top), Math.round(c.getBoundingClientRect().left),"
             " c.getAttribute('href').split('/')[0]]))")

    def visual(view: str | None) -> list[str]:
        if view:
            browser.evaluate(f"document.querySelector('label[for={view}]').click()")
        return [h for _, _, h in sorted(json.loads(browser.evaluate(shown)))]

    with headless.Chromium(exe) as browser:
        page = browser.load(path, width=420, height=900)  # three cards per row
        assert page.console_errors == [] and page.requests == [] and page.layout["scripts"] == 0
        assert page.layout["scrollWidth"] <= page.layout["innerWidth"]
        by_class = visual(None)
        by_conf = visual("v-conf")
        by_name = visual("v-name")
        marked = visual("v-flag")
    assert by_class == ["cat-sure.jpg", "script_alert_1_script_.png", "HYPERLINK_1_.jpg", "dog.jpg", "broken.jpg"]
    assert by_conf == ["HYPERLINK_1_.jpg", "cat-sure.jpg", "script_alert_1_script_.png", "dog.jpg", "broken.jpg"]
    assert by_name == ["script_alert_1_script_.png", "HYPERLINK_1_.jpg", "broken.jpg", "cat-sure.jpg", "dog.jpg"]
    assert sorted(marked) == ["HYPERLINK_1_.jpg", "broken.jpg", "dog.jpg", "script_alert_1_script_.png"]
