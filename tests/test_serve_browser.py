"""The explorer in a real browser: headless Chromium from Debian's packages, driven by Selenium
through Debian's chromium-driver (nothing is downloaded; `.ci/run` installs both).

    CONVLENS_SCREENSHOT=docs/images/serve.png python -m pytest -q tests/test_serve_browser.py

also writes the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import starlette  # noqa: F401 -- the test extra has convlens[serve] and selenium
import uvicorn  # noqa: F401
from selenium import webdriver

import convlens

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
DRIVER = shutil.which("chromedriver") or next(
    (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None
)


@pytest.fixture(scope="module")
def server(clf):
    from convlens.serve import Server
    from convlens.serve.explorer import Explorer

    srv = Server(Explorer(clf, [convlens.sample_image_path()]), "127.0.0.1", 0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver); the browser test "
                    "did not run")
    if DRIVER is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver); the browser test did not run")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _until(driver, script: str, timeout: float = 60.0) -> object:
    """Poll a JavaScript expression until it is truthy and no request is in flight."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        value = driver.execute_script(f"return document.body.dataset.pending === '0' && ({script})")
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {script}; error box: {_error(driver)!r}")


def _error(driver) -> str:
    return driver.execute_script("const e = document.getElementById('error'); return e.hidden ? '' : e.innerText")


def _heat(driver) -> str:
    return driver.execute_script("return document.getElementById('heat').getAttribute('src') || ''")


def _changed(driver, old: str) -> str:
    _until(driver, f"(document.getElementById('heat').getAttribute('src') || '') !== {old!r}")
    return _heat(driver)


def test_the_page_in_chromium(server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server.url)
    _until(d, "document.body.dataset.ready === '1' && document.getElementById('heat').getAttribute('src')")
    assert _error(d) == ""

    # the sample's top-5 and its Grad-CAM overlay
    top = d.find_elements(By.CSS_SELECTOR, "#top5 button")
    assert len(top) == 5
    assert top[0].text.startswith("Egyptian cat") and top[0].get_attribute("aria-pressed") == "true"
    assert "Egyptian cat" in d.find_element(By.ID, "cam-title").text
    first = _heat(d)
    assert first.startswith("data:image/png;base64,")
    assert d.execute_script("return document.getElementById('heat').naturalWidth") == 224

    # a class click changes the overlay
    top[1].click()
    second = _changed(d, first)
    assert "tiger cat" in d.find_element(By.ID, "cam-title").text
    assert d.find_elements(By.CSS_SELECTOR, "#top5 button")[1].get_attribute("aria-pressed") == "true"

    # a method switch changes it again
    Select(d.find_element(By.ID, "method")).select_by_value("gradcam++")
    third = _changed(d, second)
    assert "Grad-CAM++" in d.find_element(By.ID, "cam-title").text

    # a class found by typing part of its name, chosen with the keyboard
    search = d.find_element(By.ID, "search")
    search.send_keys("espresso")
    _until(d, "document.querySelectorAll('#search-results button').length === 2")  # and espresso maker
    hit = d.find_element(By.CSS_SELECTOR, "#search-results button")
    assert hit.get_attribute("data-class") == "967" and "maker" not in hit.text  # the exact name first
    search.send_keys(Keys.ENTER)
    fourth = _changed(d, third)
    assert "espresso" in d.find_element(By.ID, "cam-title").text

    # a layer pick shows that layer's channels (and moves the map there)
    Select(d.find_element(By.ID, "layer")).select_by_value("blocks.4")
    _until(d, "document.querySelectorAll('#channels button[data-layer=\"blocks.4\"]').length === 12")
    fifth = _changed(d, fourth)
    assert "blocks.4" in d.find_element(By.ID, "cam-title").text
    assert "of 112 channels of blocks.4" in d.find_element(By.ID, "channels-note").text

    # a channel click shows what it wants (a background job with a progress bar)
    d.find_elements(By.CSS_SELECTOR, "#channels button")[0].click()
    _until(d, "document.getElementById('feature-img').getAttribute('src')", timeout=300)
    channel = d.find_elements(By.CSS_SELECTOR, "#channels button")[0].get_attribute("data-channel")
    assert d.find_element(By.ID, "feature-title").text == f"What blocks.4 channel {channel} wants"
    assert d.execute_script("return document.getElementById('feature-img').naturalWidth") == 128

    # occlusion: a long run is cancelled from its progress bar, a short one shows its map
    for field, value in (("patch", "8"), ("stride", "2")):  # 11881 windows: minutes
        d.find_element(By.ID, field).clear()
        d.find_element(By.ID, field).send_keys(value)
    d.find_element(By.ID, "occ-run").click()
    t0 = time.perf_counter()
    while d.execute_script("return document.getElementById('occ-progress').hidden"):
        assert time.perf_counter() - t0 < 60
        time.sleep(0.05)
    d.find_element(By.ID, "occ-cancel").click()
    _until(d, "document.getElementById('occ-note').textContent === 'cancelled'")
    jobs = [j for j in server.explorer._jobs.values() if j.kind == "occlusion"]
    assert [j.state for j in jobs] == ["cancelled"] and jobs[0].done < jobs[0].total == 11881
    assert d.execute_script("return document.getElementById('occ-viewer').hidden")
    for field, value in (("patch", "56"), ("stride", "56")):
        d.find_element(By.ID, field).clear()
        d.find_element(By.ID, field).send_keys(value)
    d.find_element(By.ID, "occ-run").click()
    _until(d, "document.getElementById('occ-heat').getAttribute('src')", timeout=300)
    assert "16 windows of 56 px every 56 px" in d.find_element(By.ID, "occ-note").text

    # the deletion / insertion curves of the map, where this convlens has them (branch `trust`)
    if hasattr(convlens, "deletion") and hasattr(convlens, "insertion"):
        d.find_element(By.ID, "curves-run").click()
        _until(d, "document.querySelectorAll('#metrics svg polyline').length === 2", timeout=300)
        assert "deletion AUC" in d.find_element(By.ID, "metrics").text
    else:
        assert d.find_element(By.ID, "metrics").text.startswith("metrics not available")

    # the opacity slider acts on the page alone
    d.execute_script("const o = document.getElementById('opacity'); o.value = '0.8';"
                     "o.dispatchEvent(new Event('input'));")
    assert d.execute_script("return document.getElementById('heat').style.opacity") == "0.8"
    assert _heat(d) == fifth

    # a broken upload: an error on the page, and the page still works
    broken = tmp_path / "broken <1>.png"
    broken.write_bytes(b"not a picture at all")
    d.find_element(By.ID, "upload-input").send_keys(str(broken))
    _until(d, "!document.getElementById('error').hidden")
    assert _error(d).startswith("broken <1>.png: not an image in a supported format")
    d.find_element(By.ID, "error-close").click()
    d.find_elements(By.CSS_SELECTOR, "#top5 button")[2].send_keys(Keys.ENTER)
    _changed(d, fifth)
    assert "tabby" in d.find_element(By.ID, "cam-title").text and _error(d) == ""

    # a good upload joins the strip and is explained
    good = tmp_path / "coffee.png"
    import skimage.data  # scikit-image is a dependency of convlens itself
    from PIL import Image

    Image.fromarray(skimage.data.coffee()).save(good)
    d.find_element(By.ID, "upload-input").send_keys(str(good))
    _until(d, "document.querySelectorAll('#strip button').length === 2 && "
              "document.querySelector('#strip button[aria-pressed=true] .name').textContent === 'coffee.png'")
    top = d.find_elements(By.CSS_SELECTOR, "#top5 button")
    assert len(top) == 5 and top[0].text.startswith("espresso") and _error(d) == ""

    shot = os.environ.get("CONVLENS_SCREENSHOT")
    if shot:  # the README's picture: back to the sample, Grad-CAM, the default layer
        d.find_elements(By.CSS_SELECTOR, "#strip button")[0].click()
        _until(d, "document.querySelector('#strip button[aria-pressed=true] .name').textContent === 'chelsea.jpg'")
        Select(d.find_element(By.ID, "method")).select_by_value("gradcam")
        Select(d.find_element(By.ID, "layer")).select_by_value("bn2")
        _until(d, "document.querySelectorAll('#channels button[data-layer=\"bn2\"]').length === 12")
        d.execute_script("const o = document.getElementById('opacity'); o.value = '0.5';"
                         "o.dispatchEvent(new Event('input'));")
        d.find_element(By.ID, "search").clear()
        d.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")
        d.find_elements(By.CSS_SELECTOR, "#channels button")[0].click()
        _until(d, "document.getElementById('feature-img').getAttribute('src')", timeout=300)
        for field, value in (("patch", "40"), ("stride", "20")):
            d.find_element(By.ID, field).clear()
            d.find_element(By.ID, field).send_keys(value)
        d.find_element(By.ID, "occ-run").click()
        _until(d, "document.getElementById('occ-note').textContent.includes('121 windows')", timeout=300)
        if hasattr(convlens, "deletion") and hasattr(convlens, "insertion"):
            d.find_element(By.ID, "curves-run").click()
            _until(d, "document.querySelectorAll('#metrics svg polyline').length === 2", timeout=300)
        d.execute_script("window.scrollTo(0, 0); document.activeElement.blur()")
        height = d.execute_script("return document.documentElement.scrollHeight")
        chrome = d.execute_script("return window.outerHeight - window.innerHeight")
        d.set_window_size(1400, height + chrome)
        d.save_screenshot(shot)

    # nothing went wrong in the page but the refused upload
    errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert all("/api/upload" in m and "400" in m for m in errors), errors
