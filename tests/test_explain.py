"""`convlens explain` end to end: files, summary, exit codes, refusal/--force, escaping, atomic
writes, and the report in a real (headless Chromium) browser."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convlens
from convlens.cli import main

# explain orchestrates the four techniques; until their branches are merged there is nothing to run
# (once merged, convlens/__init__.py imports them, so a broken one fails the whole suite instead)
for _module in ("activations", "cam", "occlusion", "featureviz"):
    pytest.importorskip(f"convlens.methods.{_module}", reason=f"convlens.methods.{_module} is not merged yet")

EVIL = "<img src=x onerror=alert(1)>.png"
TECHS = ("activations", "gradcam", "occlusion", "trust", "filters")
#: --fast made tinier still, so the end-to-end runs stay quick on a busy 2-core machine
TINY = {
    "activations": {"channels": 4},
    "occlusion": {"patch": 112, "stride": 56},
    "filters": {"channels": 2, "steps": 4, "size": 64},
}


@pytest.fixture(autouse=True)
def tiny_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_explain_module(), "FAST", TINY)


def _explain_module():
    # `convlens.explain` is the function (re-exported); the module lives in sys.modules
    return sys.modules["convlens.explain"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good.jpg (the sample photo), a truncated JPEG, a text file, and a file named like HTML."""
    d = tmp_path_factory.mktemp("images")
    data = convlens.sample_image_path().read_bytes()
    (d / "good.jpg").write_bytes(data)
    (d / "broken.jpg").write_bytes(data[: len(data) // 3])
    (d / "notes.txt").write_text("not an image\n")
    convlens.sample_image().resize((160, 120)).save(d / EVIL)
    return d


@pytest.fixture(scope="module")
def run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The CLI once over the folder (fast settings); returns rc, out dir, summary, html."""
    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_explain_module(), "FAST", TINY)
        rc = main(["explain", str(folder), "--out", str(out), "--fast", "--device", "cpu"])
    return {
        "rc": rc,
        "out": out,
        "summary": json.loads((out / "summary.json").read_text()),
        "html": (out / "report.html").read_text(),
    }


def _image(summary: dict, name: str) -> dict:
    return next(im for im in summary["images"] if im["name"] == name)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(html)
    return p.tags


# -- the CLI over a folder ------------------------------------------------------------------
def test_folder_run_files_summary_and_exit_code(run: dict, folder: Path) -> None:
    assert run["rc"] == 1  # the broken image failed; the others were explained
    s, out = run["summary"], run["out"]
    assert [im["name"] for im in s["images"]] == sorted([EVIL, "broken.jpg", "good.jpg"])
    assert s["skipped"] == [{"path": str(folder / "notes.txt"), "reason": "not an image file (suffix)"}]

    broken = _image(s, "broken.jpg")
    assert broken["ok"] is False and "truncated" in broken["errors"]["image"]
    assert broken["predictions"] == [] and broken["files"] == []
    assert s["errors"] == [{"image": "broken.jpg", "technique": "image", "error": broken["errors"]["image"]}]

    good = _image(s, "good.jpg")
    assert good["ok"] is True and good["errors"] == {}
    assert good["predictions"][0]["label"] == "Egyptian cat" and len(good["predictions"]) == 5
    assert good["target"]["index"] == good["predictions"][0]["index"]
    # feature visualisation optimises the Grad-CAM layer's units before its ReLU6 (bn2 -> bn2.drop)
    assert good["layers"]["gradcam"] == "bn2" and good["layers"]["filters"] == "bn2.drop"
    assert "filters_dead" not in good["channels"]
    # several images: only the channels most shared among the images' top ones are drawn (FOLDER),
    # ceil(0.4 * 2 readable images) = 1 here, and the page says which are not
    top = good["channels"].get("filters_top", good["channels"]["filters"])
    assert len(top) == s["settings"]["filters"]["channels"] and set(good["channels"]["filters"]) <= set(top)
    assert s["settings"]["filters"]["budget"] == 0.4 and s["settings"]["filters"]["shared"] == 1
    assert len(good["channels"]["filters"]) == 1 or "filters_top" not in good["channels"]
    for tech in TECHS:
        assert f"{good['folder']}/{tech}.png" in good["files"]
        assert (out / good["folder"] / f"{tech}.png").is_file()
        assert good["timings"][f"{tech}_s"] > 0
    assert (out / good["folder"] / "gradcam.npy").is_file() and (out / good["folder"] / "filters.npy").is_file()
    assert all((out / f).is_file() for f in good["files"])
    # the settings, versions and model are all recorded
    assert s["settings"]["fast"] is True and s["settings"]["occlusion"] == {
        "patch": 112, "stride": 56, "baseline": 0.0, "score": "probability"}
    assert s["settings"]["filters"]["steps"] == 4 and s["settings"]["gradcam"] == {"method": "gradcam", "layer": None}
    assert s["model"]["name"] == "efficientnet_lite0" and s["model"]["input"]["size"] == 224
    assert s["versions"]["torch"] == torch.__version__ and s["timings"]["total_s"] > 0
    assert s["methods"] == list(TECHS)
    # a lighter run says so: its tier in the summary, at the top of the index and of every image's page
    assert s["settings"]["tier"]["name"] == "folder" and s["settings"]["tier"]["command"].endswith("--full")
    good = _image(s, "good.jpg")
    for page in (run["html"], (out / good["folder"] / "report.html").read_text()):
        head = page[: page.index("</header>")]
        assert "class=tier" in head and "the folder settings (a run over 2 or more images" in head and "--full" in head
    # no temporary files left behind by the atomic writes, and the usual permissions (not mkstemp's 0600)
    assert [p.name for p in out.rglob(".*")] == [".convlens-manifest.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "report.html").stat().st_mode & 0o777 == 0o666 & ~umask


def test_saved_arrays_equal_the_api(run: dict, clf: convlens.Classifier) -> None:
    """The .npy files hold exactly what the techniques return for the same settings."""
    s, out = run["summary"], run["out"]
    good = _image(s, "good.jpg")
    x = clf.preprocess(convlens.sample_image_path())
    probs = clf.logits(x).softmax(1)[0]
    assert good["predictions"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
    cam = convlens.grad_cam(clf, x, layer=good["layers"]["gradcam"])
    np.testing.assert_allclose(np.load(out / good["folder"] / "gradcam.npy"), cam.to_numpy()[0], rtol=1e-5, atol=1e-6)
    o = s["settings"]["occlusion"]
    occ = convlens.occlusion(clf, x, patch=o["patch"], stride=o["stride"], baseline=o["baseline"], score=o["score"])
    np.testing.assert_allclose(np.load(out / good["folder"] / "occlusion.npy"), occ.to_numpy()[0], rtol=1e-5, atol=1e-6)
    acts = convlens.activations(clf, x, "stages")
    for name in good["layers"]["activations"]:
        saved = np.load(out / good["folder"] / f"activations_{name}.npy")
        np.testing.assert_array_equal(saved, acts.maps[name][0].numpy())


def test_report_embeds_the_written_pngs(run: dict) -> None:
    """Every <img> is a base64 PNG data URI that decodes; each technique's PNG file is embedded byte for byte."""
    html, out, s = run["html"], run["out"], run["summary"]
    for im in s["images"]:  # each image's own page embeds that image's PNGs
        if not im["files"]:
            continue
        page = (out / im["folder"] / "report.html").read_text()
        # (the small Grad-CAM / occlusion pair shown where the two disagree is not a file)
        srcs = [a["src"] for tag, a in _tags(page) if tag == "img" and not a.get("alt", "").startswith("side by")]
        assert srcs and all(src.startswith("data:image/png;base64,") for src in srcs)
        for src in srcs:
            with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as pic:
                pic.load()
                assert pic.width > 0 and pic.height > 0
        payloads = {src.split(",", 1)[1] for src in srcs}
        pngs = [f for f in im["files"] if f.endswith(".png")]
        assert all(base64.b64encode((out / f).read_bytes()).decode() in payloads for f in pngs)
        assert len(srcs) == len(pngs)
        assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    # the index: thumbnails only, no scripts, no external resources, the error of the broken image is shown
    thumbs = [a["src"] for tag, a in _tags(html) if tag == "img"]
    assert thumbs and all(src.startswith("data:image/jpeg;base64,") for src in thumbs)
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    assert "truncated" in html and "with errors" in html


def test_malicious_file_name_is_escaped(run: dict) -> None:
    html, s = run["html"], run["summary"]
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in html
    for tag, attrs in _tags(html):
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
    evil = _image(s, EVIL)
    # the whole name, its "<" and ">" made safe, and a hash of the path since it had to change
    assert evil["ok"] is True and re.fullmatch(r"_img src=x onerror=alert\(1\)_\.png~[0-9a-f]{8}", evil["folder"])
    assert (run["out"] / evil["folder"] / "gradcam.png").is_file()


# -- refusal and --force ---------------------------------------------------------------------
def test_existing_outputs_refused_unless_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["explain", "--out", str(out), "--techniques", "gradcam", "--device", "cpu", "--fast"]
    assert main(args) == 0  # no image: the bundled sample with the default model
    s = json.loads((out / "summary.json").read_text())
    assert [im["name"] for im in s["images"]] == ["chelsea.jpg"] and s["methods"] == ["gradcam"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--force" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    assert main([*args, "--force", "--target", "tabby"]) == 0
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["images"][0]["target"] == {"index": 281, "label": "tabby"} and s2["settings"]["target"] == "tabby"


def test_usage_errors_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["explain", "--out", str(out), "--techniques", "gradcam,saliency"]) == 2
    assert "saliency" in capsys.readouterr().err
    args = ["explain", "--out", str(out), "--techniques", "gradcam", "--device", "cpu", "--target", "no such"]
    assert main(args) == 2
    assert "unknown class" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "typo.jpg"), "--out", str(out)]) == 2
    assert "typo.jpg: no such file or folder" in capsys.readouterr().err
    assert not out.exists()


# -- failures inside a run -------------------------------------------------------------------
def test_a_failing_technique_is_recorded_and_the_rest_runs(clf, monkeypatch, tmp_path: Path) -> None:
    ex = _explain_module()

    def boom(*args, **kwargs):
        raise RuntimeError("occlusion exploded")

    monkeypatch.setitem(ex.RUNNERS, "occlusion", boom)
    img = convlens.sample_image()
    report = convlens.explain([img, img.resize((200, 150))], clf, techniques=("gradcam", "occlusion"), fast=True)
    assert [im.ok for im in report.images] == [False, False]
    for im in report.images:
        assert im.errors == {"occlusion": "RuntimeError: occlusion exploded"}
        assert set(im.results) == {"gradcam"}
    assert report.images[0].key != report.images[1].key
    written = report.save(tmp_path)
    for im in report.images:
        page = (tmp_path / im.key / "report.html").read_text()
        assert page.count("Occlusion sensitivity failed") == 1 and "occlusion exploded" in page
    assert (tmp_path / "report.html").read_text().count('class="mark error"') == 2
    assert not any(p.name.startswith("occlusion") for p in written)
    frag = report._repr_html_()
    assert frag.startswith("<style>") and "<html" not in frag and "data:image/png;base64," in frag


def test_interrupted_save_leaves_no_partial_file(clf, monkeypatch, tmp_path: Path) -> None:
    report = convlens.explain(convlens.sample_image_path(), clf, techniques=("gradcam",), fast=True)
    import convlens.report as rep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rep, "summary_csv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.save(tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    # the image was complete and moved into place; summary.json, .csv and report.html were staged together
    # and never moved in; the staging folder is gone; the manifest says the run is incomplete
    assert files == [".convlens-manifest.json", "chelsea.jpg/gradcam.npy", "chelsea.jpg/gradcam.png",
                     "chelsea.jpg/input.png", "chelsea.jpg/report.html", "chelsea.jpg/summary.json",
                     "chelsea.jpg/thumbnail.jpg"]
    manifest = json.loads((tmp_path / ".convlens-manifest.json").read_text())
    assert manifest["complete"] is False and manifest["files"] == []
    assert manifest["images"][0]["files"] == files[1:] and manifest["images"][0]["key"] == "chelsea.jpg"
    with Image.open(tmp_path / "chelsea.jpg" / "gradcam.png") as im:
        im.load()


# -- the report in a real browser ------------------------------------------------------------
def test_report_in_headless_chromium(run: dict, tmp_path: Path) -> None:
    headless = pytest.importorskip("headless", reason="tests/headless.py is not importable")
    exe = headless.find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the browser check did not run")
    html_path = run["out"] / "report.html"
    n_img = sum(tag == "img" for tag, _ in _tags(run["html"]))
    bad = tmp_path / "bad.html"  # a control page: the checks must catch what they look for
    bad.write_text('<!doctype html><img src="http://example.invalid/x.png"><script>console.error("boom")</script>')
    with headless.Chromium(exe) as browser:
        control = browser.load(bad, width=800, height=600)
        laptop = browser.load(html_path, width=1366, height=900)
        phone = browser.load(html_path, width=390, height=844, mobile=True)
    assert "http://example.invalid/x.png" in control.requests and any("boom" in e for e in control.console_errors)
    for page in (laptop, phone):
        assert page.console_errors == [] and page.requests == []
        assert len(page.images) == n_img and all(w > 0 and h > 0 for w, h, _ in page.images), page.images
        assert page.layout["scripts"] == 0 and page.layout["text"] > 200
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot)).convert("RGB"), dtype=np.float32)
        assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 500  # not blank
    # readable on a phone: nothing wider than the screen
    assert phone.layout["scrollWidth"] <= phone.layout["innerWidth"]
    assert laptop.layout["scrollWidth"] <= laptop.layout["innerWidth"]


def test_pre_activation_layer_on_tiny_nets() -> None:
    """Feature visualisation goes before a final once-used ReLU; a reused or absent one keeps the layer."""
    from torch import nn

    from convlens.layers import layer_table

    ex = _explain_module()

    class Reused(nn.Module):  # ResNet-style: one ReLU module called twice, the last call after an add
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.conv(self.relu(x)) + x)

    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        Reused(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.SiLU()),
    )
    table = layer_table(net, torch.zeros(1, 3, 16, 16))
    assert ex.pre_activation_layer(table, "1") == "1.1"
    assert ex.pre_activation_layer(table, "0") == "0"
    assert ex.pre_activation_layer(table, "2") == "2"
    assert ex.pre_activation_layer(table, "3") == "3"  # SiLU never blocks the gradient


def test_bare_module_and_tensor_batch(tmp_path: Path) -> None:
    """A bare nn.Module with a model-ready (N, 3, H, W) batch: one entry per image, same values as the API."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    x = torch.rand(2, 3, 24, 24)
    occ_settings = {"occlusion": {"patch": 8, "stride": 4}}
    report = convlens.explain(x, net, techniques=("gradcam", "occlusion"), options=occ_settings)
    assert [im.name for im in report.images] == ["tensor 1[0]", "tensor 1[1]"] and not report.failed
    for i, im in enumerate(report.images):
        assert im.layers["gradcam"] == "3" and im.target == int(net(x[i : i + 1]).argmax())
        cam = convlens.grad_cam(net, x[i : i + 1], layer="3")
        torch.testing.assert_close(im.results["gradcam"].maps, cam.maps)
        occ = convlens.occlusion(net, x[i : i + 1], patch=8, stride=4)
        torch.testing.assert_close(im.results["occlusion"].maps, occ.maps)
    report.save(tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["images"][0]["predictions"][0]["label"].startswith("class ")
    assert (tmp_path / "tensor 1[0]" / "occlusion.npy").is_file()


def test_trust_section_numbers_once_per_run_sanity_and_plain_words(tmp_path: Path, clf) -> None:
    """The trust technique: AUCs equal the metrics called directly, the sanity verdict is computed once
    per run (on the first image) and shared, and a method that fails says so where its map is shown."""
    from conftest import assert_unchanged, snapshot

    before = snapshot(clf.model)
    x = clf.preprocess(convlens.sample_image())
    report = convlens.explain([x, x.flip(-1)], clf, techniques=("gradcam", "trust"),
                              options={"gradcam": {"method": "gradcam++"}, "trust": {"steps": 4}})
    assert not report.failed
    first, second = report.images
    t = first.results["trust"]
    cam = first.results["gradcam"]
    assert t.auc()["gradcam"]["deletion"] == pytest.approx(float(convlens.deletion(clf, x, cam, steps=4).auc[0]))
    # the references: random maps at Grad-CAM's 7 x 7 grid (resized as its map is) and a centred Gaussian
    assert set(t.curves) == {"gradcam", "random 7x7 map", "centred Gaussian"}
    assert t.verdicts["gradcam"]["level"] == "do not trust"
    # once per run: both images carry the verdict computed on the first
    v = t.sanity["gradcam"]
    assert v is second.results["trust"].sanity["gradcam"] and v["image"] == first.name
    assert v["method"] == "gradcam++" and v["passed"] is False and v["rho"] > 0.8
    # Grad-CAM++ is neither sane nor class-discriminative on this model: said where its map is shown
    notes = " ".join(first.notes["gradcam"])
    assert "hardly changes when the classifier is re-initialised" in notes
    assert "not class-discriminative" in notes
    report.save(tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["images"][0]["trust"]["auc"]["gradcam"]["deletion"] == pytest.approx(t.auc()["gradcam"]["deletion"])
    assert s["images"][0]["trust"]["sanity"]["gradcam"]["passed"] is False
    assert s["images"][0]["trust"]["verdicts"]["gradcam"]["level"] == "do not trust"
    html = (tmp_path / first.key / "report.html").read_text()
    assert "How far to trust these maps" in html and "hardly changes" in html
    assert_unchanged(clf.model, before)
    from convlens.explain import ExplainError

    with pytest.raises(ExplainError, match="trust technique"):
        convlens.explain(x, clf, techniques=("activations", "trust"))
