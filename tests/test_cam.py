"""Grad-CAM family: exact values on a tiny fixed-weight net, agreement with captum and
pytorch-grad-cam on the default model, batching, targets, hooks, memory and model state."""

from __future__ import annotations

import copy
import gc
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import convlens
from conftest import assert_unchanged, snapshot
from convlens import grad_cam
from convlens.cli import main
from convlens.hooks import count_hooks

ALL = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "scorecam")


class Tiny(nn.Module):
    """x (1 channel) -> 1x1 conv (weights 1, 2; biases 0, -5) -> ReLU = A -> mean -> fc.

    For x = arange(16) as 4x4: A0 = x, A1 = relu(2x - 5). fc rows: class 0 [1, -1],
    class 1 [0.5, 1], class 2 [-1, -1]. d logit_c / d A_k = W[c, k] / 16 at every position.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -5.0]))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 1.0], [-1.0, -1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture()
def tiny() -> Tiny:
    return Tiny().eval()


@pytest.fixture()
def xt() -> torch.Tensor:
    return torch.arange(16.0).view(1, 1, 4, 4)


def _acts(xt: torch.Tensor) -> torch.Tensor:
    x = xt[0, 0]
    return torch.stack([x, (2 * x - 5).clamp(min=0)])


# -- exact values -----------------------------------------------------------------------------
def test_gradcam_exact_values_on_tiny_net(tiny, xt, device):
    r = grad_cam(tiny.to(device), xt.to(device), target=0, layer="relu")
    assert r.raw.device.type == device
    # cam = relu((A0 - A1) / 16): x - relu(2x - 5) is 0, 1, 2, 2, 1, 0, -1, ... for x = 0, 1, 2...
    expected = torch.tensor([0, 1, 2, 2, 1] + [0] * 11, dtype=torch.float32).view(4, 4) / 16
    torch.testing.assert_close(r.raw[0].cpu(), expected, rtol=0, atol=1e-7)
    # same resolution: the input-size map is the layer map
    torch.testing.assert_close(r.maps[0].cpu(), expected, rtol=0, atol=1e-7)
    assert r.target == [0] and r.layer == "relu" and r.method == "gradcam"


def test_other_rules_exact_on_tiny_net(tiny, xt, device):
    a = _acts(xt)
    tiny, xd = tiny.to(device), xt.to(device)
    g = torch.tensor([1.0, -1.0]).view(2, 1, 1) / 16  # class 0 gradients, same at every position
    # LayerCAM: relu(G) * A summed over channels = A0 / 16
    torch.testing.assert_close(grad_cam(tiny, xd, target=0, layer="relu", method="layercam").raw[0].cpu(), a[0] / 16)
    # XGrad-CAM: w_k = sum(G_k A_k) / (sum A_k + 1e-7) = G_k * S_k / (S_k + 1e-7)
    s = a.sum(dim=(1, 2), keepdim=True)
    w = g * s / (s + 1e-7)
    torch.testing.assert_close(
        grad_cam(tiny, xd, target=0, layer="relu", method="xgradcam").raw[0].cpu(), (w * a).sum(0).clamp(min=0)
    )
    # Grad-CAM++: alpha = g^2 / (2 g^2 + S g^3 + 1e-6); w_k = sum_ij relu(g_k) alpha_k
    alpha = g**2 / (2 * g**2 + s * g**3 + 1e-6)
    wpp = (g.clamp(min=0) * alpha) * 16
    torch.testing.assert_close(
        grad_cam(tiny, xd, target=0, layer="relu", method="gradcam++").raw[0].cpu(), (wpp * a).sum(0).clamp(min=0)
    )
    # by hand: w0 = (1/16) * 16 / (2 + 120/16) ~= 0.10526 (eps 1e-6 shifts it by 3e-5 relative)
    assert float(wpp[0]) == pytest.approx(1 / (2 + 120 / 16), rel=1e-4) and float(wpp[1]) == 0.0


def test_scorecam_exact_on_tiny_net(tiny, xt, device):
    a = _acts(xt)
    masks = (a - a.amin((1, 2), keepdim=True)) / (a.amax((1, 2), keepdim=True) - a.amin((1, 2), keepdim=True) + 1e-8)
    with torch.no_grad():
        scores = tiny(xt * masks[:, None])[:, 1]
    expected = (scores.softmax(0)[:, None, None] * a).sum(0)
    tiny, xd = tiny.to(device), xt.to(device)
    for bs in (None, 1):
        r = grad_cam(tiny, xd, target=1, layer="relu", method="scorecam", batch_size=bs)
        torch.testing.assert_close(r.raw[0].cpu(), expected)


def test_all_zero_map_warns_and_has_no_nan(tiny, xt):
    for method in ("gradcam", "gradcam++", "xgradcam", "layercam"):
        with pytest.warns(RuntimeWarning, match="constant"):
            r = grad_cam(tiny, xt, target=2, layer="relu", method=method)  # negative weights everywhere
        assert torch.isfinite(r.maps).all() and float(r.maps.abs().max()) == 0.0
    with pytest.warns(RuntimeWarning, match="constant"):
        r = grad_cam(tiny, torch.zeros(1, 1, 4, 4), target=0, layer="relu", method="gradcam++")  # A == 0
    assert torch.isfinite(r.raw).all()
    fig = r.plot()  # a constant map still draws
    assert len(fig.axes) >= 3


# -- agreement with captum and pytorch-grad-cam on the default model ---------------------------
def test_gradcam_equals_captum_layer_gradcam(clf, sample_x):
    import captum.attr as captum  # test extra; imported here, not at the top, to keep collection quick

    r = grad_cam(clf, sample_x)
    assert r.layer == "bn2" and r.target == [285] and r.labels == ["Egyptian cat"]
    ref = captum.LayerGradCam(clf.model, clf.model.bn2).attribute(sample_x, target=285, relu_attributions=True)
    ref = ref.detach()[:, 0]
    assert float(ref.max()) > 0
    torch.testing.assert_close(r.raw, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    up = captum.LayerAttribution.interpolate(ref[:, None], (224, 224), "bilinear")[:, 0]
    torch.testing.assert_close(r.maps, up, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _pgc_raw(cls, model, x, layer, target):
    """pytorch-grad-cam's own map before its ReLU and scaling, from its own activations/gradients."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    m = copy.deepcopy(model)  # it calls zero_grad/backward on the model: keep the fixture clean
    layer_module = dict(m.named_modules())[layer]
    cam = cls(m, [layer_module])
    targets = [ClassifierOutputTarget(target)]
    try:
        cam(x, targets=targets)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy() if cam.activations_and_grads.gradients else None
        raw = cam.get_cam_image(x, layer_module, targets, acts, grads, False)
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(np.maximum(raw, 0)).float(), torch.from_numpy(acts)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam"])
def test_gradient_rules_equal_pytorch_grad_cam(clf, sample_x, method):
    import pytorch_grad_cam as pgc  # test extra (grad-cam); a few seconds to import, so not at the top

    cls = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
           "layercam": pgc.LayerCAM}[method]
    ref, _ = _pgc_raw(cls, clf.model, sample_x, "bn2", 281)
    r = grad_cam(clf, sample_x, target="tabby", method=method)
    assert r.target == [281]
    torch.testing.assert_close(r.raw, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_eigencam_equals_pytorch_grad_cam_up_to_sign(clf, sample_x):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    _, acts = _pgc_raw(pgc.EigenCAM, clf.model, sample_x, "bn2", 0)
    proj = torch.from_numpy(get_2d_projection(acts.numpy()))
    r = grad_cam(clf, sample_x, method="eigencam")
    tol = 1e-4 * float(proj.abs().max())
    assert any(torch.allclose(r.raw, (s * proj).clamp(min=0), atol=tol) for s in (1, -1))
    # the sign is chosen so that the map agrees with the mean activation: the cat, not the border
    mean_map = acts.mean(1)
    assert float(torch.corrcoef(torch.stack([r.raw.flatten(), mean_map.flatten()]))[0, 1]) > 0.5


def test_scorecam_equals_pytorch_grad_cam(monkeypatch):
    import pytorch_grad_cam as pgc
    import pytorch_grad_cam.score_cam as sc

    monkeypatch.setattr(sc.tqdm, "tqdm", lambda it, *a, **k: it)  # its progress bar is noise here
    torch.manual_seed(0)
    # a small random net whose target layer keeps the input's size: mask upsampling is then the
    # identity, so the corner alignment of the two implementations (theirs True, ours False)
    # cannot differ and the maps must agree exactly
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()
    x = torch.randn(1, 3, 24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = _pgc_raw(pgc.ScoreCAM, net, x, "3", 2)
    r = grad_cam(net, x, target=2, layer="3", method="scorecam", batch_size=5)
    assert float(ref.max()) > 0
    torch.testing.assert_close(r.raw, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert r.settings["batch_size"] == 5


# -- batching and several targets ---------------------------------------------------------------
def test_batched_equals_one_by_one(clf, sample_x):
    x = torch.cat([sample_x, sample_x.flip(-1), sample_x.flip(-2)])
    targets = [285, "tabby", 1]
    for method in ("gradcam", "gradcam++", "layercam", "eigencam"):
        batch = grad_cam(clf, x, target=targets, method=method)
        for i, t in enumerate(targets):
            one = grad_cam(clf, x[i : i + 1], target=t, method=method)
            torch.testing.assert_close(batch.raw[i], one.raw[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(batch.maps[i], one.maps[0], rtol=1e-4, atol=1e-6)
        assert batch.target == [285, 281, 1]


def test_top_k_equals_separate_targets_from_one_pass(clf, sample_x):
    x = torch.cat([sample_x, sample_x.flip(-1)])
    r = grad_cam(clf, x, top=3)
    probs = clf.logits(x).topk(3, dim=1).indices.tolist()
    assert r.target == probs[0] + probs[1]
    assert r.settings["image_index"] == [0, 0, 0, 1, 1, 1] and r.maps.shape == (6, 224, 224)
    for row, (i, t) in enumerate(zip(r.settings["image_index"], r.target)):
        one = grad_cam(clf, x[i : i + 1], target=t)
        torch.testing.assert_close(r.raw[row], one.raw[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r.images[3], r.images[4])
    # several named targets per image, ragged
    rr = grad_cam(clf, x, target=[["tabby", 285], [1]])
    assert rr.target == [281, 285, 1] and rr.settings["image_index"] == [0, 0, 1]
    torch.testing.assert_close(rr.raw[1], r.raw[0], rtol=1e-4, atol=1e-6)


def test_callable_target_equals_index(tiny, xt):
    r = grad_cam(tiny, xt, target=lambda out: out[:, 0], layer="relu")
    torch.testing.assert_close(r.raw, grad_cam(tiny, xt, target=0, layer="relu").raw)
    assert r.target == [-1]


def test_default_layer_recorded_for_resnet():
    import torchvision

    m = torchvision.models.resnet18(num_classes=10).eval()
    r = grad_cam(m, torch.randn(2, 3, 64, 64), method="gradcam")
    assert r.layer == "layer4" and r.raw.shape == (2, 2, 2) and r.maps.shape == (2, 64, 64)
    assert torch.isfinite(r.maps).all()


# -- model state, hooks, grad mode, memory --------------------------------------------------------
class WithBN(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("method", ALL)
def test_model_unchanged_from_train_mode_with_grads(method, xt):
    m = WithBN().train()
    m.conv.weight.grad = torch.ones_like(m.conv.weight)
    m.fc.weight.requires_grad_(False)
    before = snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = grad_cam(m, xt, target=0, layer="relu", method=method)
    assert_unchanged(m, before)
    assert count_hooks(m) == 0 and torch.isfinite(r.maps).all()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"target": "no such class"}, ValueError),
        ({"target": 7}, ValueError),
        ({"layer": "nope"}, convlens.LayerError),
        ({"layer": "fc"}, convlens.LayerError),  # not a spatial map
        ({"target": lambda out: out.sum()}, ValueError),  # one score, not one per image
        ({"method": "gradcam+++"}, ValueError),
        ({"top": 0}, ValueError),
        ({"top": 2, "target": 0}, ValueError),
    ],
)
def test_bad_input_leaves_no_hooks_and_model_as_it_was(kwargs, error, xt):
    m = WithBN().train()
    m.conv.weight.grad = torch.zeros_like(m.conv.weight)
    before = snapshot(m)
    kwargs.setdefault("layer", "relu")
    with pytest.raises(error):
        grad_cam(m, xt, **kwargs)
    assert_unchanged(m, before)
    assert count_hooks(m) == 0 and torch.is_grad_enabled()


def test_works_inside_no_grad_and_inference_mode(tiny, xt):
    expected = grad_cam(tiny, xt, target=0, layer="relu").raw
    with torch.no_grad():
        r = grad_cam(tiny, xt, target=0, layer="relu")
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(r.raw, expected)
    assert not r.maps.requires_grad and not r.raw.requires_grad
    with torch.inference_mode():
        r = grad_cam(tiny, xt.clone(), target=0, layer="relu")
        assert torch.is_inference_mode_enabled()
    torch.testing.assert_close(r.raw, expected)


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_flat_over_200_calls(xt):
    m = WithBN().eval()
    for _ in range(20):  # warm caches and allocators
        grad_cam(m, xt, target=0)
        grad_cam(m, xt, top=2, method="gradcam++")
    gc.collect()
    tracemalloc.start()
    rss0 = _rss_mb()
    snap0 = tracemalloc.take_snapshot()
    for _ in range(100):
        grad_cam(m, xt, target=0)
        grad_cam(m, xt, top=2, method="gradcam++")
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename"))
    tracemalloc.stop()
    assert grown < 100_000, f"python heap grew {grown} bytes over 200 calls"
    assert _rss_mb() - rss0 < 20
    assert count_hooks(m) == 0


# -- results and CLI --------------------------------------------------------------------------
def test_plot_and_save(tmp_path, clf, sample_x):
    r = grad_cam(clf, sample_x, top=2)
    fig = r.plot(index=1, alpha=0.3)
    assert "tiger cat" in fig._suptitle.get_text() and "bn2" in fig._suptitle.get_text()
    with pytest.warns(DeprecationWarning, match="save"):  # the old files: <path>.png/.npy per row
        paths = r.save(tmp_path / "cam.png")
    assert [p.name for p in paths] == ["cam_0.png", "cam_0.npy", "cam_1.png", "cam_1.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "cam_1.npy"), r.maps[1].numpy())
    with pytest.raises(ValueError, match="normalize must be one of"):
        r.plot(index=0, normalize="global")  # type: ignore[arg-type]


def test_cli_gradcam_writes_png_and_npy(tmp_path, capsys, monkeypatch, clf):
    monkeypatch.setattr("convlens.cli.load_classifier", lambda args: clf)  # load once per session
    assert main(["gradcam", "--method", "gradcam++", "--top", "2", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "chelsea.jpg").iterdir())
    assert names == ["gradcampp_0.npy", "gradcampp_0.png", "gradcampp_1.npy", "gradcampp_1.png"]
    assert np.load(tmp_path / "chelsea.jpg" / "gradcampp_0.npy").shape == (224, 224)
    assert "Egyptian cat [285]" in capsys.readouterr().out
    assert main(["gradcam", "--target", "tabbby", "--out", str(tmp_path / "a")]) == 2
    assert "did you mean 'tabby'" in capsys.readouterr().err
    assert main(["gradcam", "--layer", "nope", "--out", str(tmp_path / "b")]) == 2


# -- methods stated honestly ---------------------------------------------------------------------
def test_xgradcam_equals_gradcam_before_global_pooling_and_linear(tiny, xt):
    """At a layer followed only by global average pooling and a linear layer, d logit / d A is
    W / hw at every position, so XGrad-CAM's weights equal Grad-CAM's: the maps coincide."""
    import torchvision

    for t in (0, 1):
        x = grad_cam(tiny, xt, target=t, layer="relu", method="xgradcam").raw
        g = grad_cam(tiny, xt, target=t, layer="relu", method="gradcam").raw
        torch.testing.assert_close(x, g)
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 96, 96)
    a = grad_cam(m, x, target=[1, 3], layer="layer4", method="xgradcam").raw
    b = grad_cam(m, x, target=[1, 3], layer="layer4", method="gradcam").raw
    assert float(b.max()) > 0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.max()))
    # and so on the default model at its automatic layer (bn2, then pooling and the classifier)
    # (checked in test_default_model_xgradcam_is_gradcam below); inside the last block they differ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = grad_cam(m, x, target=[1, 3], layer="layer4.1.bn1", method="xgradcam").raw
        b = grad_cam(m, x, target=[1, 3], layer="layer4.1.bn1", method="gradcam").raw
    assert not torch.allclose(a, b, rtol=1e-2, atol=1e-3 * float(b.max()))


def test_eigencam_gives_one_map_per_image(clf, sample_x):
    x = torch.cat([sample_x, sample_x.flip(-1)])
    one = grad_cam(clf, x, method="eigencam")
    assert one.raw.shape[0] == 2 and one.settings["class_independent"]
    assert one.target == clf.logits(x).argmax(1).tolist()
    with pytest.warns(UserWarning, match="one map per image"):
        top = grad_cam(clf, x, method="eigencam", top=3)
    assert top.settings["image_index"] == [0, 1] and top.target == one.target
    torch.testing.assert_close(top.raw, one.raw)
    with pytest.warns(UserWarning, match="one map per image"):
        several = grad_cam(clf, x, method="eigencam", target=[["tabby", 285], [1]])
    assert several.target == [281, 1] and several.settings["image_index"] == [0, 1]
    torch.testing.assert_close(several.raw, one.raw)


def test_scorecam_masked_forwards_are_shared_by_the_targets_of_an_image():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    calls = []
    handle = net.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        top = grad_cam(net, x, top=3, layer="3", method="scorecam", batch_size=5)
    finally:
        handle.remove()
    # one capture pass of the batch, then per image ceil(12 / 5) = 3 batches of masked inputs
    assert calls == [2, 5, 5, 2, 5, 5, 2]
    for row, (i, t) in enumerate(zip(top.settings["image_index"], top.target)):
        one = grad_cam(net, x[i : i + 1], target=t, layer="3", method="scorecam", batch_size=5)
        torch.testing.assert_close(top.raw[row], one.raw[0], rtol=1e-5, atol=1e-7)
    assert len(set(top.target[:3])) == 3 and float(top.raw.max()) > 0


def test_default_model_xgradcam_is_gradcam(clf, sample_x):
    a = grad_cam(clf, sample_x, top=2, method="xgradcam")
    b = grad_cam(clf, sample_x, top=2, method="gradcam")
    assert a.layer == b.layer == "bn2" and float(b.raw.max()) > 0
    torch.testing.assert_close(a.raw, b.raw, rtol=1e-4, atol=1e-6 * float(b.raw.max()))
