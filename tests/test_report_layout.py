"""The report and the compare page as a person reads them, in headless Chromium at a phone's width
(400 px) and a laptop's (1100 px): nothing wider than the screen, no word broken inside, no table
cell overflowing, and every figure's smallest text at least ~10 px as shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import convlens
from convlens.metrics.compare import compare

pytestmark = pytest.mark.usefixtures("one_thread")

#: page-side measurements (the pages themselves carry no script)
MEASURE_JS = r"""(() => {
  const split = [], overflow = [], small = [], scrolled = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest('code') || el.offsetParent === null) continue;
    for (const m of node.data.matchAll(/\S{4,}/g)) {
      // a line break inside the word other than after a hyphen or a slash ("Grad-CA M", "deletio n")
      let last = null;
      for (let i = 0; i < m[0].length; i++) {
        range.setStart(node, m.index + i); range.setEnd(node, m.index + i + 1);
        const r = [...range.getClientRects()].find(r => r.width > 0);
        if (!r) continue;
        if (last !== null && r.top > last + 2 && !'-/'.includes(m[0][i - 1])) { split.push(m[0]); break; }
        last = r.top;
      }
    }
  }
  for (const cell of document.querySelectorAll('td, th')) {
    if (cell.offsetParent !== null && cell.scrollWidth > cell.clientWidth + 1) {
      overflow.push(cell.textContent.slice(0, 40));
    }
  }
  for (const img of document.querySelectorAll('img[data-font-px]')) {
    const shown = img.getBoundingClientRect().width / img.naturalWidth * parseFloat(img.dataset.fontPx);
    small.push([img.alt, Math.round(shown * 10) / 10]);
    const box = img.closest('.fig');
    if (box && box.scrollWidth > box.clientWidth + 1) scrolled.push(img.alt);
  }
  return JSON.stringify({split, overflow, small, scrolled, scrollWidth: document.documentElement.scrollWidth,
                         innerWidth: window.innerWidth, figures: document.querySelectorAll('img[data-font-px]')
                         .length});
})()"""


def _measure(browser, path: Path, width: int) -> dict:
    page = browser.load(path, width=width, height=900, mobile=width < 600)
    assert page.console_errors == [] and page.requests == []
    return json.loads(browser.evaluate(MEASURE_JS))


@pytest.fixture(scope="module")
def pages(tmp_path_factory, clf) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pages")
    report = convlens.explain(None, clf, techniques=["activations", "gradcam", "occlusion", "trust"], fast=True,
                              cache=False)
    report.save(out / "run")
    cmp = compare(clf, convlens.sample_image(), ("gradcam", "eigencam"), steps=4, sanity=False, draws=2)
    cmp.save(out / "cmp")
    return {"report": out / "run" / "report.html", "compare": out / "cmp" / "compare.html"}


@pytest.mark.parametrize("width", [400, 1100])
def test_pages_read_at_phone_and_laptop_width(pages, width) -> None:
    headless = pytest.importorskip("headless", reason="tests/headless.py is not importable")
    exe = headless.find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the layout check did not run")
    with headless.Chromium(exe) as browser:
        for name, path in pages.items():
            m = _measure(browser, path, width)
            assert m["scrollWidth"] <= m["innerWidth"], (name, m["scrollWidth"])  # no sideways scrolling
            assert m["split"] == [], (name, m["split"])  # e.g. "Grad-CA M", "deletio n AUC"
            assert m["overflow"] == [], (name, m["overflow"])
            assert m["figures"] >= 1
            # the smallest text of every figure (the activations' channel titles included) as shown
            assert all(px >= 9.5 for _, px in m["small"]), (name, m["small"])
            if width >= 1100:  # on a laptop every figure fits its box: legible without scrolling sideways
                assert m["scrolled"] == [], (name, m["scrolled"])
