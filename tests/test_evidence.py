"""What the numbers are worth (convlens.metrics.evidence): random references resized as the maps are,
the paired bootstrap, the verdict in words, Grad-CAM and occlusion at a common grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import convlens
from convlens.metrics.evidence import (
    agreement,
    common_grid,
    grid_name,
    grid_of,
    noise_margin,
    paired_bootstrap,
    random_like,
    upsample,
    verdict,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_random_reference_is_resized_exactly_as_the_method_resizes_its_map(small):
    net, x = small
    cam = convlens.grad_cam(net, x)
    occ = convlens.occlusion(net, x, patch=16, stride=8)
    for sal, kind, name in ((cam, "bilinear", "random 8x8 map"), (occ, "windows", "random 7x7 windows")):
        k, grid, opts = grid_of(sal, (64, 64))
        assert (k, grid_name(k, grid)) == (kind, name)
        # the method's own raw grid, resized by the reference's rule, is the method's map
        torch.testing.assert_close(upsample(sal.raw.cpu(), k, (64, 64), opts), sal.maps.cpu(), atol=1e-5, rtol=1e-5)
    # seeded: the same draws each time, different draws differ, values at the grid in [0, 1)
    a = random_like("bilinear", (8, 8), (64, 64), {}, draws=3, seed=4)
    assert torch.equal(a, random_like("bilinear", (8, 8), (64, 64), {}, draws=3, seed=4))
    assert a.shape == (3, 64, 64) and not torch.equal(a[0], a[1]) and 0 <= float(a.min()) and float(a.max()) < 1
    assert grid_of(None, (64, 64)) == ("pixels", (64, 64), {})


def test_paired_bootstrap_pairs_the_images():
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 1, 12)  # images differ a lot; a is b plus a small, steady gain
    a = b + 0.05 + rng.normal(0, 0.005, 12)
    d, lo, hi = paired_bootstrap(a, b, resamples=500, seed=3)
    assert d == pytest.approx(float((a - b).mean())) and lo < d < hi and lo > 0.04 and hi < 0.06
    # the same draws of the images for a and b: a constant difference has a zero-width interval
    assert paired_bootstrap(b + 0.1, b) == pytest.approx((0.1, 0.1, 0.1))
    # unpaired, the spread between images would swamp the gain: the interval of a alone is wide
    _, lo_a, hi_a = paired_bootstrap(a, resamples=500, seed=3)
    assert hi_a - lo_a > 10 * (hi - lo)
    # seeded; one image has no interval
    assert paired_bootstrap(a, b, resamples=500, seed=3) == (d, lo, hi)
    v, lo1, hi1 = paired_bootstrap([0.3], [0.1])
    assert v == pytest.approx(0.2) and math.isnan(lo1) and math.isnan(hi1)
    assert noise_margin(torch.tensor([0.1, 0.3])) == pytest.approx(2 * float(torch.tensor([0.1, 0.3]).std()))


def test_verdict_levels_and_reasons():
    beats = {"random 7x7 map": {"difference": 0.2, "low": 0.1, "high": 0.3, "real": True},
             "centred Gaussian": {"difference": 0.1, "low": 0.02, "high": 0.2, "real": True}}
    v = verdict(images=5, versus=beats, sanity_passed=1.0, sanity_rho=0.1, class_rho=0.2)
    assert v["level"] == "trust" and len(v["reasons"]) == 1
    assert "passes the sanity check and is class-discriminative" in v["reasons"][0]
    assert "random 7x7 map +0.200 [+0.100, +0.300]" in v["reasons"][0]
    centre = {**beats, "centred Gaussian": {"difference": 0.05, "low": -0.01, "high": 0.1, "real": False}}
    v = verdict(images=5, versus=centre, sanity_passed=1.0, sanity_rho=0.1, class_rho=0.2)
    assert v["level"] == "weak" and "cannot separate it from a map that only says the object is in the middle" in (
        v["reasons"][0])
    v = verdict(images=5, versus=beats, sanity_passed=0.2, sanity_rho=0.9, class_rho=0.95)
    assert v["level"] == "do not trust" and len(v["reasons"]) == 2
    assert v["reasons"][0].startswith("It fails the sanity check on 4 of 5 images")
    assert "not class-discriminative" in v["reasons"][1]
    # one image: the margin decides, and the last reason says what one image cannot do
    one = {"random 7x7 map": {"difference": 0.05, "margin": 0.08, "real": False}}
    v = verdict(images=1, versus=one, margin=0.08)
    assert v["level"] == "weak" and v["reasons"][-1].startswith("One image cannot rank methods closer than the noise "
                                                                "margin (0.080)")
    assert verdict(images=1, versus={}, error="boom")["level"] == "do not trust"


def test_agreement_at_the_common_grid(small):
    net, x = small
    cam = convlens.grad_cam(net, x)  # 8 x 8
    occ = convlens.occlusion(net, x, patch=16, stride=4)  # 13 x 13 windows
    assert common_grid(cam, occ) == (8, 8) == common_grid(occ, cam)
    rho, grid = agreement(cam, occ, 1)
    # independently: block means of the 64 px maps over 8 x 8 px cells, then scipy's Spearman
    a = cam.maps[1].numpy().reshape(8, 8, 8, 8).mean((1, 3))
    b = occ.maps[1].numpy().reshape(8, 8, 8, 8).mean((1, 3))
    assert grid == (8, 8) and rho == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-5)
    flat = convlens.grad_cam(net, x)
    object.__setattr__(flat, "maps", torch.zeros_like(flat.maps))
    assert agreement(flat, occ)[0] is None


def test_the_settings_tier_is_printed_and_named(tmp_path, capsys):
    from convlens.cli import main
    from convlens.explain import FOLDER_FROM, settings_tier

    assert FOLDER_FROM == 2
    assert settings_tier(1)["name"] == "full" and settings_tier(1, fast=True)["name"] == "fast"
    assert settings_tier(2)["name"] == "folder" and settings_tier(9, full=True)["name"] == "full"
    assert settings_tier(1, shard=(1, 2))["name"] == "folder"
    assert settings_tier(3)["command"] == "convlens explain IMAGES --full"
    folder = tmp_path / "in"
    folder.mkdir()
    convlens.sample_image().save(folder / "a.png")
    convlens.sample_image().transpose(0).save(folder / "b.png")
    assert main(["explain", str(folder), "--techniques", "gradcam", "--out", str(tmp_path / "out")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("settings: folder. This run used the folder settings (a run over 2 or more images")
    assert first.endswith("Full settings: convlens explain IMAGES --full")


def test_the_image_page_says_what_the_agreement_means(small):
    from convlens.page import _agreement_html
    from convlens.report import ImageExplanation

    net, x = small
    cam = convlens.grad_cam(net, x[:1])
    occ = convlens.occlusion(net, x[:1], patch=16, stride=8)
    rgb = cam.rgb(0)

    def page(rho):
        im = ImageExplanation(name="a.png", source=None, key="a.png", rgb=rgb,
                              results={"gradcam": cam, "occlusion": occ},
                              agreement={"gradcam_occlusion_spearman": rho})
        return _agreement_html(im)

    low = page(-0.3)  # below the calibrated mark: said, with both maps side by side
    assert "<strong>disagree</strong>" in low and "ρ -0.30" in low and "common 7×7 grid" in low
    assert low.count('alt="side by side: ') == 2
    mid, high = page(0.2), page(0.6)
    assert "neither agree nor disagree" in mid and "side by side" not in mid
    assert "Grad-CAM and occlusion agree on this image" in high and "side by side" not in high
    assert _agreement_html(ImageExplanation(name="b", source=None, key="b")) == ""
