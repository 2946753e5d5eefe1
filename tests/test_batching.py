"""The one batch-memory policy (convlens._batching) that occlusion, Score-CAM and deletion /
insertion share."""

from __future__ import annotations

import torch
from torch import nn

from convlens import _batching
from convlens._batching import default_batch


def test_cpu_batch_is_the_constant_capped_by_items_and_memory(monkeypatch):
    net = nn.Conv2d(3, 3, 1)
    x = torch.zeros(2, 3, 10, 10)  # 300 elements per image -> 76 800 bytes per item by default
    monkeypatch.setattr(_batching, "memory_budget", lambda: 10**9)
    assert default_batch(net, x, 1000) == 1  # full forwards: one at a time on a CPU
    assert default_batch(net, x, 1000, cpu=16) == 16
    assert default_batch(net, x, 5, cpu=16) == 5  # never more than there are items
    assert default_batch(net, x, 0, cpu=16) == 1
    assert default_batch(net, x, 1000, cpu=16, budget=3 * 76_800) == 3  # the memory cap
    assert default_batch(net, x, 1000, cpu=16, budget=10) == 1  # at least one
    assert default_batch(net, x, 1000, cpu=64, budget=1000, bytes_per_item=100) == 10
    monkeypatch.setattr(_batching, "memory_budget", lambda: 2 * 76_800)
    assert default_batch(net, x, 1000, cpu=16) == 2


def test_occlusion_batches_by_kind_of_path():
    """On a CPU: 32 windows per batch on the crop path, 4 full forwards through the private copy
    where crops do not apply (here a layer that reads the whole image first), 1 through the user's
    own model (``fast=False``); never more than there are windows; the maps agree."""
    from convlens import occlusion

    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()

    class Centre(nn.Module):  # not a local layer: every output pixel depends on the whole image
        def forward(self, t):
            return t - t.mean((2, 3), keepdim=True)

    pooled = nn.Sequential(Centre(), *conv).eval()
    crop = occlusion(conv, x, target=0, patch=8, stride=4)
    assert (crop.settings["path"], crop.settings["batch_size"]) == ("crop", 32)
    copy = occlusion(pooled, x, target=0, patch=8, stride=4)
    assert (copy.settings["path"], copy.settings["batch_size"]) == ("plain", 4)
    own = occlusion(pooled, x, target=0, patch=8, stride=4, fast=False)
    assert (own.settings["path"], own.settings["batch_size"]) == ("plain", 1)
    torch.testing.assert_close(copy.raw, own.raw, atol=1e-6, rtol=1e-5)
    few = occlusion(conv, x, target=0, patch=32, stride=32)  # 4 windows
    assert few.settings["batch_size"] == 4


def test_scorecam_batch_follows_memory_mb():
    """Score-CAM's masked forwards per batch fit ``memory_mb`` at 32 input sizes per sample."""
    from convlens import grad_cam

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(5, 2)).eval()
    x = torch.rand(1, 3, 8, 8)
    per_sample = x[0].numel() * x.element_size() * 32  # 24 576 bytes
    one = grad_cam(net, x, target=1, layer="1", method="scorecam", memory_mb=2 * per_sample / 2**20)
    assert one.settings["batch_size"] == 2
    all5 = grad_cam(net, x, target=1, layer="1", method="scorecam", memory_mb=100.0)
    assert all5.settings["batch_size"] == 5  # never more than the 5 channels
    torch.testing.assert_close(one.maps, all5.maps)
