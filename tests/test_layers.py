"""Layer lookup by name, module and pattern; the layer table; the automatic Grad-CAM layer."""

from __future__ import annotations

import pytest
import torch
import torchvision

from convlens.hooks import count_hooks
from convlens.layers import LayerError, default_cam_layer, layer_table, resolve_layer, resolve_layers


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18().eval()


def test_resolve_by_name_module_and_suggestions(resnet):
    assert resolve_layer(resnet, "layer4.1.conv2") == ("layer4.1.conv2", resnet.layer4[1].conv2)
    assert resolve_layer(resnet, resnet.layer3) == ("layer3", resnet.layer3)
    with pytest.raises(LayerError, match="did you mean 'layer4'") as info:
        resolve_layer(resnet, "layr4")
    assert "convlens layers" in str(info.value)
    with pytest.raises(LayerError, match="not part of the model"):
        resolve_layer(resnet, torch.nn.Conv2d(1, 1, 1))


def test_patterns_keep_model_order_and_must_match(resnet):
    assert list(resolve_layers(resnet, "layer?")) == ["layer1", "layer2", "layer3", "layer4"]
    assert list(resolve_layers(resnet, ["fc", "layer1.*.conv1", "fc"])) == ["fc", "layer1.0.conv1", "layer1.1.conv1"]
    with pytest.raises(LayerError, match="matches no layer"):
        resolve_layers(resnet, "block*")


def test_layer_table_shapes_and_model_untouched(resnet):
    resnet.train()
    table = {r.name: r for r in layer_table(resnet, torch.randn(1, 3, 64, 96))}
    assert resnet.training and count_hooks(resnet) == 0
    resnet.eval()
    assert table["conv1"].shape == (1, 64, 32, 48)
    assert table["layer4"].shape == (1, 512, 2, 3)
    assert table["fc"].shape == (1, 1000) and table["fc"].params == 513_000
    assert table["layer1"].order < table["layer4"].order < table["fc"].order


def test_default_cam_layer_across_architectures(clf, sample_x):
    x = torch.randn(1, 3, 224, 224)
    assert default_cam_layer(torchvision.models.resnet18().eval(), x) == "layer4"
    assert default_cam_layer(torchvision.models.vgg11().eval(), x) == "features"
    assert default_cam_layer(torchvision.models.densenet121().eval(), x) == "features"
    assert default_cam_layer(clf.model, sample_x) == "bn2"
    with pytest.raises(LayerError, match="spatial"):
        default_cam_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))
