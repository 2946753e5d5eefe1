"""Occlusion: agreement with captum, exact values on a hand-made net, full coverage, batching
invariance, the fast path equal to the plain one, argument errors, the model left unchanged."""

from __future__ import annotations

import captum.attr as captum_attr  # a test dependency
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

import convlens
from conftest import assert_unchanged, snapshot
from convlens.cli import main
from convlens.hooks import count_hooks
from convlens.methods.occlusion import fit_window, occlusion, window_starts


class SmallNet(nn.Module):
    """A small ResNet-shaped net: stem conv + BN + ReLU + max-pool, two residual stages (one with
    a strided downsample), global pooling and a linear head. Fast at 224 px on a CPU."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down))
        self.layer2 = nn.Sequential(BasicBlock(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    with torch.no_grad():
        model.fc.weight.mul_(8)  # spread the logits so occlusion moves the probabilities
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread per module


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(SmallNet()).eval()


@pytest.fixture(scope="module")
def img() -> torch.Tensor:
    # smooth blobs plus a little noise: occluding a window changes what the net sees
    g = torch.Generator().manual_seed(2)
    blobs = torch.nn.functional.interpolate(torch.randn(2, 3, 8, 8, generator=g), size=224, mode="bilinear")
    return 2 * blobs + 0.3 * torch.randn(2, 3, 224, 224, generator=g)


def _captum(forward, x, patch, stride, target=None, baselines=0.0):
    occ = captum_attr.Occlusion(forward)
    with torch.no_grad():
        a = occ.attribute(
            x, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride),
            target=target, baselines=baselines, perturbations_per_eval=8,
        )
    # captum occludes all channels at once, so every channel carries the same map
    assert torch.equal(a[:, 0], a[:, 2])
    return a[:, 0]


def _brute_force(model, x, patch, stride, target, baseline=0.0):
    """The definition, pixel by pixel: windows at 0, stride, ... plus one flush with the edge."""
    h, w = x.shape[-2:]
    ys = list(range(0, h - patch + 1, stride))
    xs = list(range(0, w - patch + 1, stride))
    ys += [h - patch] if ys[-1] != h - patch else []
    xs += [w - patch] if xs[-1] != w - patch else []
    with torch.no_grad():
        clean = torch.softmax(model(x), 1)[0, target]
        total = torch.zeros(h, w, dtype=torch.float64)
        count = torch.zeros(h, w, dtype=torch.float64)
        for y in ys:
            for xx in xs:
                occ = x.clone()
                occ[:, :, y : y + patch, xx : xx + patch] = baseline
                total[y : y + patch, xx : xx + patch] += float(clean - torch.softmax(model(occ), 1)[0, target])
                count[y : y + patch, xx : xx + patch] += 1
    return total / count, count


# -- agreement with captum --------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True])
def test_equals_captum_probability_per_image_targets(net, img, fast):
    res = occlusion(net, img, target=[4, 7], patch=32, stride=16, fast=fast)
    ref = _captum(lambda z: torch.softmax(net(z), 1), img, 32, 16, target=[4, 7])
    assert res.target == [4, 7]
    assert res.raw.shape == (2, 13, 13) and res.maps.shape == (2, 224, 224)
    assert float(res.maps.abs().amax((1, 2)).min()) > 1e-3  # not a trivially small map
    torch.testing.assert_close(res.maps, ref, atol=1e-6, rtol=0)


def test_equals_captum_logit_mean_baseline(net, img):
    x = img[:1]
    res = occlusion(net, x, target=3, patch=32, stride=16, baseline="mean", score="logit")
    ref = _captum(net, x, 32, 16, target=3, baselines=x.mean((2, 3), keepdim=True).expand_as(x))
    torch.testing.assert_close(res.maps, ref, atol=1e-5, rtol=1e-6)


def test_callable_target_is_the_score(net, img):
    x = img[1:]

    def margin(out):
        return out[:, 2] - out[:, 5]

    res = occlusion(net, x, target=margin, patch=32, stride=16, baseline=0.5)
    ref = _captum(lambda z: margin(net(z)), x, 32, 16, baselines=0.5)
    assert res.settings["score"] == "custom"
    torch.testing.assert_close(res.maps, ref, atol=1e-5, rtol=1e-6)


def test_default_model_equals_captum(clf, sample_x):
    res = occlusion(clf, sample_x, patch=56, stride=28)
    top = clf.predict(sample_x, top=1)[0][0]
    assert res.target == [top.index] and res.labels == [top.label]
    ref = _captum(lambda z: torch.softmax(clf.model(z), 1), sample_x, 56, 28, target=top.index)
    assert res.settings["path"] == "crop"
    assert float(ref.max()) > 0.01
    torch.testing.assert_close(res.maps, ref, atol=1e-6, rtol=0)


# -- exact values on a hand-made net ----------------------------------------------------------------
class Weighted(nn.Module):
    """logit0 = sum over channel 0 of W * x, W = 0, 1, ..., 15 (row-major, 4 x 4); logit1 = 0."""

    def forward(self, x):
        w = torch.arange(16.0).view(4, 4)
        l0 = (x[:, 0] * w).sum((1, 2))
        return torch.stack([l0, torch.zeros_like(l0)], 1)


def test_exact_values_on_a_tiny_net():
    x = torch.ones(1, 3, 4, 4)
    # patch 2 / stride 2: four disjoint windows; the logit drop is the sum of W over each
    res = occlusion(Weighted(), x, target=0, patch=2, stride=2, score="logit")
    assert res.raw[0].tolist() == [[10.0, 18.0], [42.0, 50.0]]
    assert res.maps[0].tolist() == [[10.0, 10.0, 18.0, 18.0]] * 2 + [[42.0, 42.0, 50.0, 50.0]] * 2
    # patch 3 / stride 2 on 4 px: starts [0, 1] (the second one flush with the edge)
    res = occlusion(Weighted(), x, target=0, patch=3, stride=2, score="logit")
    assert res.settings["starts"] == ([0, 1], [0, 1])
    assert res.raw[0].tolist() == [[45.0, 54.0], [81.0, 90.0]]
    m = res.maps[0]
    assert float(m[0, 0]) == 45.0 and float(m[3, 3]) == 90.0 and float(m[0, 3]) == 54.0
    assert float(m[1, 1]) == pytest.approx((45 + 54 + 81 + 90) / 4)
    assert float(m[0, 1]) == pytest.approx((45 + 54) / 2)
    # probability: p0 = sigmoid(l0); clean l0 = 120 * 0.01
    res = occlusion(Weighted(), x * 0.01, target=0, patch=2, stride=2)
    expected = [[torch.sigmoid(torch.tensor(1.2)) - torch.sigmoid(torch.tensor(1.2 - s * 0.01)) for s in row]
                for row in ([10, 18], [42, 50])]
    torch.testing.assert_close(res.raw[0], torch.tensor(expected), atol=1e-7, rtol=0)


# -- coverage to the edge ---------------------------------------------------------------------------
def test_every_pixel_covered_and_equal_to_brute_force(net, img):
    x = img[:1]
    assert window_starts(224, 40, 20)[-2:] == [180, 184]
    res = occlusion(net, x, target=4, patch=40, stride=20)
    ref, count = _brute_force(net, x, 40, 20, 4)
    assert count.min() >= 1
    assert res.settings["windows"] == (11, 11)  # 10 on the stride grid + 1 flush
    torch.testing.assert_close(res.maps[0].double(), ref, atol=1e-6, rtol=0)
    # the last 4 rows/columns (never covered by the tutorial's loop) carry values
    assert float(res.maps[0, 220:].abs().min()) > 0 and float(res.maps[0, :, 220:].abs().min()) > 0


def test_rectangular_patch_stride_and_image(net):
    x = torch.randn(1, 3, 100, 130, generator=torch.Generator().manual_seed(3))
    res = occlusion(net, x, target=2, patch=(30, 20), stride=(25, 15), fast=False, batch_size=4)
    ys, xs = window_starts(100, 30, 25), window_starts(130, 20, 15)
    assert res.settings["starts"] == (ys, xs) and ys[-1] == 70 and xs[-1] == 110
    with torch.no_grad():
        clean = torch.softmax(net(x), 1)[0, 2]
        total = torch.zeros(100, 130, dtype=torch.float64)
        count = torch.zeros(100, 130, dtype=torch.float64)
        for y in ys:
            for xx in xs:
                occ = x.clone()
                occ[..., y : y + 30, xx : xx + 20] = 0
                total[y : y + 30, xx : xx + 20] += float(clean - torch.softmax(net(occ), 1)[0, 2])
                count[y : y + 30, xx : xx + 20] += 1
    assert count.min() >= 1
    torch.testing.assert_close(res.maps[0].double(), total / count, atol=1e-6, rtol=0)


# -- invariants ---------------------------------------------------------------------------------------
def test_every_batch_size_gives_the_same_map(net, img):
    x = img[:1]
    maps = [occlusion(net, x, target=0, patch=48, stride=32, batch_size=b, fast=False).maps for b in (1, 3, 7, 64)]
    maps += [occlusion(net, x, target=0, patch=48, stride=32, batch_size=b).maps for b in (1, 5, 64)]
    for m in maps[1:]:
        torch.testing.assert_close(m, maps[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("baseline", [0.0, "mean", "blur"])
def test_fast_path_equals_plain_path(net, img, baseline):
    a = occlusion(net, img, patch=40, stride=20, baseline=baseline, fast=False)
    b = occlusion(net, img, patch=40, stride=20, baseline=baseline, fast=True)
    assert a.settings["path"] == "plain" and b.settings["path"] == "crop"
    assert "layer1.0" in b.settings["boundaries"]  # crops go past the stem, into the residual stages
    torch.testing.assert_close(b.maps, a.maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.raw, a.raw, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("size", "patch", "stride"), [((101, 137), (17, 23), (9, 11)), ((64, 64), 64, 1)])
def test_fast_path_odd_sizes(net, size, patch, stride):
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
    a = occlusion(net, x, target=3, patch=patch, stride=stride, fast=False, batch_size=8)
    b = occlusion(net, x, target=3, patch=patch, stride=stride, batch_size=5)
    torch.testing.assert_close(b.raw, a.raw, atol=1e-6, rtol=0)


class GlobalMix(nn.Module):
    """Looks local to hooks (convs and ReLUs in a Sequential) but adds the global mean in its own
    forward: the crop path must notice and fall back to full forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = self.mix(x + x.mean((2, 3), keepdim=True))
        return self.head(x.mean((2, 3)))


def test_fast_path_falls_back_when_the_model_is_not_local(img):
    torch.manual_seed(0)
    model = GlobalMix().eval()
    x = img[:1, :, :96, :96]
    a = occlusion(model, x, target=1, patch=24, stride=12, fast=False)
    b = occlusion(model, x, target=1, patch=24, stride=12)
    assert b.settings["path"] == "plain"
    torch.testing.assert_close(b.maps, a.maps, atol=1e-7, rtol=0)


def test_blur_baseline_is_a_blurred_copy(net, img):
    from convlens.methods.occlusion import _gaussian_blur

    x = img[:1]
    blurred = _gaussian_blur(x, 10.0)
    assert float((blurred - x).abs().mean()) > 0.3  # the noise image loses its detail
    a = occlusion(net, x, target=1, patch=40, stride=40, baseline="blur")
    b = occlusion(net, x, target=1, patch=40, stride=40, baseline=blurred)
    torch.testing.assert_close(a.maps, b.maps, atol=0, rtol=0)


def test_long_runs_are_streamed(img):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return torch.stack([x.mean((1, 2, 3)), x[:, 0].mean((1, 2))], 1)

    x = img[:1, :, :160, :160]
    res = occlusion(Probe(), x, patch=8, stride=4, batch_size=64)
    assert res.raw.shape == (1, 39, 39)
    # never more than one chunk of occluded images at a time (the check of the crop path aside)
    assert max(seen) == 64 and sum(seen) >= 39 * 39


def test_1024px_at_stride_4_is_streamed(net):
    """61,009 windows: the occluded images must be made a chunk at a time (all at once would be
    730 GB). Stopped after a few chunks by a target that raises."""
    from convlens._batching import default_batch
    from convlens.methods.occlusion import COPY_BATCH, CROP_BATCH

    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(5))
    assert default_batch(net, x, 61009) == 1
    assert 1 <= default_batch(net, x, 61009, cpu=max(CROP_BATCH, COPY_BATCH)) <= 4  # the memory cap
    calls = []

    def score(out):
        calls.append(out.shape[0])
        if len(calls) == 4:
            raise RuntimeError("enough")
        return out[:, 0]

    with pytest.raises(RuntimeError, match="enough"):
        occlusion(net, x, target=score, patch=16, stride=4)
    assert max(calls) <= 4


# -- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch": 0}, "at least 1"),
        ({"patch": 300}, r"larger than the image \(224, 224\); choose a smaller patch and stride \(e.g. patch 56,"),
        ({"patch": (40, 300)}, "larger than the image"),
        ({"stride": -2}, "at least 1"),
        ({"patch": 2.5}, "positive int"),
        ({"stride": (1, 2, 3)}, "positive int"),
        ({"score": "prob"}, "score must be one of"),
        ({"baseline": "grey"}, "baseline must be"),
        ({"baseline": torch.zeros(5, 5)}, "broadcast"),
        ({"baseline": float("nan")}, "finite"),
        ({"batch_size": 0}, "batch_size"),
        ({"target": 99}, "out of range"),
    ],
)
def test_bad_arguments_raise_clear_errors(net, img, kwargs, match):
    with pytest.raises(ValueError, match=match):
        occlusion(net, img[:1], **kwargs)


# -- the model is left as it was ----------------------------------------------------------------------
@pytest.mark.parametrize("failure", [None, RuntimeError, KeyboardInterrupt])
def test_model_unchanged_also_after_an_error(img, failure):
    torch.manual_seed(0)
    model = _randomise_bn(SmallNet()).train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.conv1.weight.requires_grad_(False)
    before = snapshot(model)
    calls = []

    def score(out):
        calls.append(1)
        if failure is not None and len(calls) == 3:
            raise failure("stop here")
        return out[:, 0]

    grad_mode = torch.is_grad_enabled()
    if failure is None:
        occlusion(model, img[:1], target=score, patch=64, stride=64, batch_size=4)
    else:
        with pytest.raises(failure, match="stop here"):  # mid-run: 16 windows in batches of 4
            occlusion(model, img[:1], target=score, patch=64, stride=64, batch_size=4)
    assert torch.is_grad_enabled() == grad_mode
    assert model.training
    assert_unchanged(model, before)


def test_default_model_unchanged(clf, sample_x):
    before = snapshot(clf.model)
    occlusion(clf, sample_x, patch=112, stride=112)
    assert_unchanged(clf.model, before)


# -- progress and CLI ---------------------------------------------------------------------------------
def test_progress_bar(net, img, capsys):
    occlusion(net, img[:1], patch=112, stride=56, progress=True)
    assert "occlusion" in capsys.readouterr().err


def test_cli_writes_png_and_npy(tmp_path, capsys):
    code = main(["occlusion", "--patch", "112", "--stride", "56", "--target", "285", "--out", str(tmp_path)])
    assert code == 0
    folder = tmp_path / convlens.sample_image_path().name  # the whole file name: chelsea.jpg/
    arr = np.load(folder / "occlusion.npy")
    assert arr.shape == (224, 224) and np.abs(arr).max() > 0
    assert (folder / "occlusion.png").stat().st_size > 1000
    assert "[285]" in capsys.readouterr().out
    # no temporary files or staging folder left; the manifest lists what was written
    assert [p.name for p in tmp_path.rglob(".*")] == [".convlens-manifest.json"]


def test_cli_bad_patch_is_a_one_line_error(tmp_path, capsys):
    assert main(["occlusion", "--patch", "500", "--out", str(tmp_path)]) == 2
    assert "larger than the image" in capsys.readouterr().err


def test_overlay_opacity_follows_the_weight():
    from convlens.plotting import overlay

    rgb = np.full((2, 2, 3), 0.25)
    heat = np.array([[0.0, 1.0], [0.5, 1.0]])
    out = overlay(rgb, heat, alpha=0.5, cmap="gray", weight=np.array([[0.0, 1.0], [1.0, 0.5]]))
    np.testing.assert_allclose(out[0, 0], 0.25)  # weight 0: the photo itself
    np.testing.assert_allclose(out[0, 1], 0.625)  # 0.5 * 0.25 + 0.5 * white
    np.testing.assert_allclose(out[1, 1], 0.4375)  # opacity 0.25


# -- approximate mode on natural photos (exact mode on real architectures: test_occlusion_exact.py) -----
def _photos(clf):
    """The five natural photos: scikit-image's chelsea, coffee, astronaut, rocket and matplotlib's
    grace_hopper.jpg."""
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    arrays = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        arrays.append(np.asarray(Image.open(f).convert("RGB")))
    return torch.cat([clf.preprocess(Image.fromarray(a)) for a in arrays])


def _pearson(a, b):
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_approximate_mode_correlates_with_exact_on_natural_photos(clf):
    """The default model on the five photos, patch 32 / stride 16: the approximate map correlates
    with the exact one (Pearson r >= 0.95 per photo) for less work; with refinement (the default
    share; 13 x 13 windows are a coarse grid for it: r 0.89-0.97 here, >= 0.95 at 16/8, see
    test_occlusion_refine.py) r >= 0.85."""
    x = _photos(clf)
    exact = occlusion(clf, x, patch=32, stride=16)
    approx = occlusion(clf, x, patch=32, stride=16, mode="approximate", target=exact.target)
    refined = occlusion(clf, x, patch=32, stride=16, mode="approximate", refine=True, target=exact.target)
    assert exact.settings["mode"] == "exact" and approx.settings["mode"] == "approximate"
    assert approx.settings["tau"] == 0.9 and refined.settings["refine"] == 0.3
    assert approx.settings["work"] < exact.settings["work"] and refined.settings["work"] < approx.settings["work"]
    assert refined.settings["windows_evaluated"] < 5 * 13 * 13
    assert float(exact.raw.abs().amax((1, 2)).min()) > 0.01  # maps with something to agree on
    assert float(_pearson(approx.maps, exact.maps).min()) >= 0.95
    assert float(_pearson(refined.maps, exact.maps).min()) >= 0.85
    assert not torch.equal(approx.raw, exact.raw)  # it is an approximation


def test_approximate_mode_with_tau_1_is_exact(net, img):
    a = occlusion(net, img, patch=40, stride=20)
    b = occlusion(net, img, patch=40, stride=20, mode="approximate", tau=1.0)
    assert b.settings["mode"] == "approximate" and b.settings["path"] == "crop"
    torch.testing.assert_close(b.raw, a.raw, atol=1e-6, rtol=0)


def test_cli_approximate_and_refine(tmp_path, capsys):
    code = main(["occlusion", "--patch", "56", "--stride", "28", "--mode", "approximate", "--refine",
                 "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "approximate, refined, work" in out
    with pytest.raises(SystemExit) as e:
        main(["occlusion", "--refine", "2", "--out", str(tmp_path)])
    assert e.value.code == 2 and "expected a share in (0, 1]" in capsys.readouterr().err


def test_crop_structure_is_read_once_per_model_shape_and_weights(img, monkeypatch):
    """A folder of same-sized images pays the private copy and the analysis once (any window grid);
    the result is the same as a fresh analysis, and new weights mean a new copy."""
    import copy

    torch.manual_seed(0)
    model = _randomise_bn(SmallNet()).eval()
    copies = []
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda m, *a: (copies.append(m) if m is model else None, real(m, *a))[1])
    first = occlusion(model, img[:1], patch=40, stride=20)
    second = occlusion(model, img[1:], patch=40, stride=20)
    assert len(copies) == 1 and first.settings["path"] == second.settings["path"] == "crop"
    plain = occlusion(model, img[1:], patch=40, stride=20, fast=False)
    torch.testing.assert_close(second.maps, plain.maps, atol=1e-6, rtol=0)
    other = occlusion(model, img[:1], patch=48, stride=24)  # another window grid: the same copy and analysis
    assert len(copies) == 1 and other.settings["path"] == "crop"
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    changed = occlusion(model, img[1:], patch=40, stride=20)
    assert len(copies) == 2 and changed.settings["path"] == "crop"
    torch.testing.assert_close(changed.maps, occlusion(model, img[1:], patch=40, stride=20, fast=False).maps,
                               atol=1e-6, rtol=0)
    assert count_hooks(model) == 0


def test_fit_window_keeps_a_window_that_fits_and_scales_one_that_does_not():
    assert fit_window(56, 28, 224, 300) == ((56, 56), (28, 28))
    assert fit_window(40, (20, 10), 40, 41) == ((40, 40), (20, 10))
    assert fit_window(56, 28, 32, 32) == ((8, 8), (4, 4))  # 32 / 224 of each
    assert fit_window(40, 20, 16, 16) == ((3, 3), (1, 1))
    assert fit_window(400, 1, 8, 300) == ((8, 14), (1, 1))  # never larger than the image, at least 1 px


def test_explain_of_a_small_input_model_gets_its_occlusion_map():
    """A 16 px model (CIFAR-like inputs): explain's 40 px default window does not fit, so it is
    scaled to the image instead of failing the technique."""
    from conftest import tiny_classifier

    clf = tiny_classifier()
    before = snapshot(clf.model)
    report = convlens.explain(convlens.sample_image(), clf, techniques=("occlusion",), cache=False)
    im = report.images[0]
    assert im.ok, im.errors
    x = clf.preprocess(convlens.sample_image())
    expected = occlusion(clf, x, target=im.target, patch=3, stride=1)  # 40 / 20 at 16 / 224
    torch.testing.assert_close(im.results["occlusion"].maps, expected.maps)
    assert_unchanged(clf.model, before)
