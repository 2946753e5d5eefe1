"""convlens.compare and `convlens compare`: rows equal the metrics called one by one, references,
aggregation over images, the files written, the model untouched."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch

import convlens
from conftest import assert_unchanged, snapshot
from convlens.cli import main
from convlens.metrics.compare import merge, reference_map

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread per module


OCC = {"patch": 16, "stride": 8}


def test_rows_equal_the_metrics_one_by_one(small, device):
    net, x = copy.deepcopy(small[0]).to(device), small[1].to(device)
    before = snapshot(net)
    cmp = convlens.compare(net, x, ("gradcam", "occlusion"), steps=8, options={"occlusion": OCC}, draws=3)
    # one random reference per grid: Grad-CAM's 8 x 8 layer, occlusion's 7 x 7 windows (16 / 8 on 64 px)
    assert [r.method for r in cmp.rows] == ["gradcam", "occlusion", "random 8x8 map", "random 7x7 windows",
                                            "centred Gaussian"]
    assert cmp.row("gradcam").random == "random 8x8 map" and cmp.row("occlusion").random == "random 7x7 windows"
    cam = convlens.grad_cam(net, x)
    assert cmp.target == cam.target
    row = cmp.row("gradcam")
    torch.testing.assert_close(row.deletion.scores, convlens.deletion(net, x, cam, steps=8).scores)
    torch.testing.assert_close(row.insertion.auc, convlens.insertion(net, x, cam, steps=8).auc)
    cs = convlens.class_sensitivity(net, x, "gradcam")
    torch.testing.assert_close(row.class_rho, cs.spearman)
    occ = convlens.occlusion(net, x, **OCC)
    torch.testing.assert_close(cmp.row("occlusion").deletion.scores, convlens.deletion(net, x, occ, steps=8).scores)
    # the random reference: 3 seeded draws of 8 x 8 uniform noise, upsampled bilinearly as Grad-CAM's map is
    # (the same draws for every image), judged for the methods' targets; its curves are the draws' mean
    raw = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(raw[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    ins = [convlens.insertion(net, x, up[k].expand(2, -1, -1), target=cam.target, steps=8) for k in range(3)]
    dels = [convlens.deletion(net, x, up[k].expand(2, -1, -1), target=cam.target, steps=8) for k in range(3)]
    ref = cmp.row("random 8x8 map")
    torch.testing.assert_close(ref.insertion.scores, torch.stack([c.scores for c in ins]).mean(0))
    torch.testing.assert_close(ref.draws, torch.stack([i.auc - d.auc for i, d in zip(ins, dels)]))
    assert ref.class_rho is None and ref.reference
    assert_unchanged(net, before)


def test_reference_maps_by_hand():
    # 3 x 5: the centre is (1, 2), sigma = min(3, 5) / 4 = 0.75, 2 sigma^2 = 1.125
    g = reference_map("centred Gaussian", 2, 3, 5)
    assert g.shape == (2, 3, 5) and torch.equal(g[0], g[1])
    assert g[0, 1, 2].item() == 1.0
    assert g[0, 0, 2].item() == pytest.approx(math.exp(-1 / 1.125), rel=1e-6)
    assert g[0, 2, 0].item() == pytest.approx(math.exp(-(1 + 4) / 1.125), rel=1e-6)
    # even sizes: the centre falls between pixels, (1.5, 1.5) on 4 x 4, sigma 1
    assert reference_map("centred Gaussian", 1, 4, 4)[0, 1, 1].item() == pytest.approx(math.exp(-0.25), rel=1e-6)
    r = reference_map("random map", 3, 4, 6, seed=5)
    assert torch.equal(r[0], r[2]) and 0 <= r.min() and r.max() < 1 and len(r[0].unique()) == 24
    assert torch.equal(r, reference_map("random map", 3, 4, 6, seed=5))
    assert not torch.equal(r, reference_map("random map", 3, 4, 6, seed=6))
    with pytest.raises(ValueError, match="unknown reference"):
        reference_map("gaussian", 1, 4, 4)


def test_summary_aggregates_and_ranks(small):
    net, x = small
    cmp = convlens.compare(net, x, ("gradcam", "eigencam"), steps=4, sanity=False)
    summ = {s["method"]: s for s in cmp.summary()}
    for r in cmp.rows:
        d = r.deletion.auc.double()
        assert summ[r.method]["deletion_auc"] == pytest.approx(float(d.mean()))
        assert summ[r.method]["deletion_auc_std"] == pytest.approx(float(d.std()))  # n - 1, as the table says
    # trustworthy methods first (here: class-discriminative, as sanity was not run), then by difference
    keys = {m: (summ[m]["class_discriminative"] is False, -summ[m]["difference"]) for m in ("gradcam", "eigencam")}
    assert cmp.ranking() == sorted(keys, key=keys.get)
    assert "rank" not in summ["random 8x8 map"] and summ["random 8x8 map"]["draws"] == 8
    assert summ["gradcam"]["sanity_passed"] is None
    # two one-image comparisons merged give the two-image one
    parts = [convlens.compare(net, x[i : i + 1], ("gradcam", "eigencam"), steps=4, sanity=False, names=[f"i{i}"])
             for i in range(2)]
    merged = merge(parts)
    assert merged.images == ["i0", "i1"]
    for r in cmp.rows:
        torch.testing.assert_close(merged.row(r.method).deletion.auc, r.deletion.auc, atol=1e-6, rtol=0)
    # Eigen-CAM ignores the class: its maps for both classes agree exactly
    assert summ["eigencam"]["class_sensitivity"] == pytest.approx(1.0)
    assert summ["eigencam"]["class_discriminative"] is False


def test_a_failing_method_gets_a_row_and_the_others_go_on(small):
    net, x = small
    cmp = convlens.compare(net, x[:1], ("gradcam", "occlusion"), steps=4, sanity=False,
                           options={"occlusion": {"patch": 200, "stride": 8}})
    assert "larger than the image" in cmp.row("occlusion").error
    assert cmp.row("gradcam").error is None
    v = cmp.verdicts()["occlusion"]
    assert v["level"] == "do not trust" and "larger than the image" in v["reasons"][0]
    with pytest.raises(ValueError, match="unknown method"):
        convlens.compare(net, x, ("gradcam", "nope"))


def test_cli_compare_on_the_sample_photo(tmp_path, capsys, clf):
    out = tmp_path / "cmp"
    before = snapshot(clf.model)
    code = main(["compare", "--methods", "gradcam,eigencam", "--steps", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert max(len(line) for line in text.splitlines() if not line.startswith("wrote ")) <= 100  # table: 100 columns
    assert "eigencam: DO NOT TRUST. It fails the sanity check" in text and "not class-discriminative" in text
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["gradcam", "eigencam", "random 7x7 map", "centred Gaussian"]
    data = json.loads((out / "compare.json").read_text())
    assert data["class_discriminative"] == ["gradcam"]
    assert data["verdicts"]["eigencam"]["level"] == "do not trust" and len(data["verdicts"]["eigencam"]["reasons"]) == 2
    assert data["verdicts"]["gradcam"]["level"] in ("trust", "weak")
    # one image: the page says it cannot rank methods closer than the noise margin
    assert "One image cannot rank methods closer than the noise margin" in data["verdicts"]["gradcam"]["reasons"][-1]
    assert data["per_image"][0]["sanity_passed"] is True and data["per_image"][1]["sanity_passed"] is False
    assert float(rows[0]["deletion_auc"]) == pytest.approx(data["summary"][0]["deletion_auc"])
    html = (out / "compare.html").read_text()
    assert "<script" not in html and "Content-Security-Policy" in html and "data:image/png;base64," in html
    # the verdicts come first, then a row of map thumbnails per method, then the table with its columns explained
    assert html.index("<h2>Verdicts</h2>") < html.index("The maps it ranks") < html.index("<h2>Summary</h2>")
    assert html.count('<div class=thumbs>') == 3  # the image, gradcam, eigencam
    assert "<dt>vs random</dt>" in html and "<dt>class rho</dt>" in html and "<th>vs best</th>" in html
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # an earlier run is kept; bad input is a one-line error
    assert main(["compare", "--methods", "gradcam", "--out", str(out)]) == 2
    assert "from an earlier run" in capsys.readouterr().err
    assert main(["compare", "--methods", "gradcam,saliency", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert_unchanged(clf.model, before)


def test_cli_compare_over_a_folder_aggregates_and_skips_a_broken_file(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    convlens.sample_image().save(folder / "a.png")
    convlens.sample_image().transpose(0).save(folder / "b.png")  # mirrored
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "cmp"
    code = main(["compare", str(folder), "--methods", "gradcam", "--steps", "2", "--no-sanity", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "broken.jpg: skipped" in captured.err
    assert "2 images" in captured.out
    # two images: too few for a bootstrap interval, the noise margin decides and the verdict says so
    import re

    assert re.search(r"gradcam .* [+-]\d\.\d\d\d ±\d\.\d\d\d", captured.out)
    assert "2 images cannot rank methods closer than the noise margin" in captured.out
    data = json.loads((out / "compare.json").read_text())
    assert data["images"] == ["a.png", "b.png"]
    per = [r for r in data["per_image"] if r["method"] == "gradcam"]
    mean = sum(r["deletion_auc"] for r in per) / 2
    assert data["summary"][0]["deletion_auc"] == pytest.approx(mean)
    vs = data["summary"][0]["vs"]["random 7x7 map"]
    assert "low" not in vs and vs["margin"] > 0 and vs["real"] == (abs(vs["difference"]) > vs["margin"])


def test_default_occlusion_window_is_scaled_to_a_small_input():
    """compare's 56 px default window on a 16 px model input: scaled to 4 / 2 px (16 / 224 of it),
    not an error row."""
    from conftest import tiny_classifier

    clf = tiny_classifier()
    x = clf.preprocess(convlens.sample_image())
    cmp = convlens.compare(clf, x, ("occlusion",), steps=4, sanity=False)
    assert cmp.row("occlusion").error is None
    occ = convlens.occlusion(clf, x, patch=4, stride=2)
    torch.testing.assert_close(cmp.row("occlusion").deletion.scores, convlens.deletion(clf, x, occ, steps=4).scores)
