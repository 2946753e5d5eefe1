"""Modules called more than once: a name means the module's last call, ``name#k`` its k-th call
(from 1). Checked on ResNet-50 (random weights), whose Bottleneck calls its one ReLU three times,
against computations written out by hand."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from convlens import activations, feature_visualization, grad_cam, layer_table, occlusion
from convlens.cli import main
from convlens.hooks import count_hooks
from convlens.layers import LayerError, resolve_layer, resolve_layers, split_call

GRADIENT_CAMS = ("gradcam", "gradcam++", "xgradcam", "layercam")


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet50(num_classes=10).eval()
    with torch.no_grad():  # non-trivial batch norm statistics, so the blocks are not near-identity
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    """Two 96 px images: layer4 is 3 x 3 (the classes 2 and 5 have non-zero maps at every call)."""
    torch.manual_seed(1)
    return torch.randn(2, 3, 96, 96)


def _manual_last_block(m: nn.Module, x: torch.Tensor):
    """By hand: the input h of layer4.2 and its three ReLU outputs (r1, r2 inside, r3 the output)."""
    with torch.no_grad():
        h = m.layer4[:2](m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        b = m.layer4[2]
        r1 = torch.relu(b.bn1(b.conv1(h)))
        r2 = torch.relu(b.bn2(b.conv2(r1)))
        r3 = torch.relu(b.bn3(b.conv3(r2)) + h)
    return h, r1, r2, r3


def test_names_and_the_layer_table(resnet50, x64):
    assert split_call("layer4.2.relu#2") == ("layer4.2.relu", 2) and split_call("layer4") == ("layer4", None)
    for bad in ("relu#0", "relu#x", "#2", "relu#-1"):
        with pytest.raises(LayerError, match="name#k"):
            split_call(bad)
    assert resolve_layer(resnet50, "layer4.2.relu#1") == ("layer4.2.relu#1", resnet50.layer4[2].relu)
    assert list(resolve_layers(resnet50, "layer4.*.relu#1")) == [f"layer4.{i}.relu#1" for i in range(3)]
    table = {r.name: r for r in layer_table(resnet50, x64[:1])}
    assert table["layer4.2.relu"].calls == 3 and table["relu"].calls == 1 and table["layer4.2"].calls == 1
    # the row describes the last call: the block's output shape, finishing just before the block
    assert table["layer4.2.relu"].shape == table["layer4.2"].shape == (1, 2048, 3, 3)
    assert table["layer4.2.conv3"].order < table["layer4.2.relu"].order < table["layer4.2"].order


def test_activations_at_each_call(resnet50, x64):
    h, r1, r2, r3 = _manual_last_block(resnet50, x64)
    acts = activations(resnet50, x64, ["layer4.2.relu", "layer4.2.relu#1", "layer4.2.relu#2", "layer4.2.relu#3",
                                       "layer4.2"])
    torch.testing.assert_close(acts["layer4.2.relu"], r3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts["layer4.2.relu#1"], r1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts["layer4.2.relu#2"], r2, rtol=1e-5, atol=1e-5)
    assert torch.equal(acts["layer4.2.relu#3"], acts["layer4.2.relu"])
    assert torch.equal(acts["layer4.2.relu"], acts["layer4.2"])
    with pytest.raises(LayerError, match="runs 3 time"):
        activations(resnet50, x64, ["layer4.2.relu#4"])
    assert count_hooks(resnet50) == 0


@pytest.mark.parametrize("method", [*GRADIENT_CAMS, "eigencam"])
def test_gradcam_at_the_last_call_equals_the_block_output(resnet50, x64, method):
    a = grad_cam(resnet50, x64, target=[2, 5], layer="layer4.2.relu", method=method)
    b = grad_cam(resnet50, x64, target=[2, 5], layer="layer4.2", method=method)
    assert a.layer == "layer4.2.relu" and float(a.raw.flatten(1).amax(1).min()) > 0.05
    torch.testing.assert_close(a.raw, b.raw, rtol=1e-5, atol=1e-7)


def test_gradcam_at_an_inner_call_by_hand(resnet50, x64):
    """Grad-CAM at layer4.2.relu#2 (inside the block) written out: A = relu(bn2(conv2(r1))),
    the rest of the network from A, the gradient of the target logit, channel means times A."""
    m = resnet50
    h, r1, r2, _ = _manual_last_block(m, x64)
    b = m.layer4[2]
    a = r2.clone().requires_grad_(True)
    with torch.enable_grad():
        out = torch.relu(b.bn3(b.conv3(a)) + h)
        logits = m.fc(torch.flatten(m.avgpool(out), 1))
        (g,) = torch.autograd.grad(logits[[0, 1], [2, 5]].sum(), a)
    manual = ((g.mean(dim=(2, 3), keepdim=True) * r2).sum(1)).clamp(min=0)
    assert float(manual.flatten(1).amax(1).min()) > 0.05
    got = grad_cam(m, x64, target=[2, 5], layer="layer4.2.relu#2")
    torch.testing.assert_close(got.raw, manual, rtol=1e-4, atol=1e-6 * float(manual.abs().max()))
    assert got.layer == "layer4.2.relu#2"
    assert count_hooks(m) == 0 and all(p.grad is None for p in m.parameters())


def test_scorecam_at_the_last_call_equals_the_block_output():
    """(ResNet-18, whose BasicBlock calls its ReLU twice: 512 masked forwards instead of 2048.)"""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = grad_cam(m, x, target=1, layer="layer4.1.relu", method="scorecam", batch_size=128)
        b = grad_cam(m, x, target=1, layer="layer4.1", method="scorecam", batch_size=128)
        c = grad_cam(m, x, target=1, layer="layer4.1.relu#1", method="scorecam", batch_size=128)
    torch.testing.assert_close(a.raw, b.raw, rtol=1e-5, atol=1e-7)
    assert float(a.raw.max()) > 0 and not torch.allclose(a.raw, c.raw)


def test_feature_visualization_at_calls(resnet50):
    kw = dict(steps=2, size=96, transforms=(), seed=3)
    a = feature_visualization(resnet50, "layer4.2.relu", [102, 380], **kw)
    b = feature_visualization(resnet50, "layer4.2", [102, 380], **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.objective, b.objective)
    # the k-th call: the objective is channel c's mean of that call's map on the final input
    c = feature_visualization(resnet50, "layer4.2.relu#1", [102, 380], **kw)
    _, r1, _, _ = _manual_last_block(resnet50, c.inputs)
    expected = r1[[0, 1], [102, 380]].mean(dim=(1, 2))
    assert float(expected.min()) > 0 and not any(c.dead)
    torch.testing.assert_close(c.objective, expected, rtol=1e-4, atol=1e-6)
    assert c.layer == "layer4.2.relu#1"


def test_occlusion_of_resnet50_crop_path_unchanged(resnet50, x64):
    """The layer semantics do not touch occlusion: its crop path still equals full forwards."""
    fast = occlusion(resnet50, x64[:1], patch=32, stride=32, target=2)
    assert fast.settings["path"] == "crop"
    slow = occlusion(resnet50, x64[:1], patch=32, stride=32, target=2, fast=False)
    torch.testing.assert_close(fast.maps, slow.maps, rtol=0, atol=1e-5)  # probabilities: float32 rounding


def test_cli_layers_shows_the_call_counts(capsys):
    assert main(["layers", "--filter", "blocks.6*"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[-1] == "calls"
    assert "blocks.6.0.conv_pwl" in out
