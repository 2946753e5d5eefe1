"""Feature visualisation: objectives, transforms, determinism, early stop, model safety, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import convlens
from conftest import assert_unchanged, snapshot
from convlens import feature_visualization
from convlens.cli import main
from convlens.hooks import count_hooks
from convlens.layers import call_counts
from convlens.methods.featureviz import jitter, pad, random_rotate, random_scale, standard_transforms

FAST = {"steps": 6, "size": 32}


class Tiny(nn.Module):
    """conv(3->6) relu conv(6->8, stride 2) relu pool fc(8->5), fixed weights; channel 7 of conv2 is
    dead (zero weights, negative bias)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.4)
                m.bias.fill_(0.1)
            self.conv2.weight[7] = 0
            self.conv2.bias[7] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


# conftest's one OpenMP thread: many small ops, and on a shared 2-core machine threads waiting for
# each other cost more than they give (a 30-step run took 8 s with 2 threads under load, 0.08 s with 1)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def tiny() -> Tiny:
    return Tiny().eval()


# -- objectives -------------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["fourier", "pixel"])
@pytest.mark.parametrize(
    "objective, layer, channels",
    [("channel", "conv2", [0, 3]), ("neuron", "conv2", [1, 2]), ("layer", "relu2", None), ("class", None, [0, 4])],
)
def test_objective_rises(tiny, param, objective, layer, channels, device):
    res = feature_visualization(
        tiny.to(device), layer, channels, objective=objective, param=param, steps=30, size=32, transforms=()
    )
    h = res.history
    assert h.shape == (30, len(res.channels))
    # every image's score ends clearly above where it started, and the returned image keeps it
    assert bool((h[-5:].mean(0) > h[:3].mean(0) + 0.08).all()), h[[0, -1]]
    assert bool((res.objective >= h[-1] - 1e-4).all()), (res.objective, h[-1])
    assert res.dead == [False] * len(res.channels)


def test_objective_rises_on_default_model(clf):
    res = feature_visualization(clf, "blocks.2", [0, 7], steps=12, size=48)
    assert bool((res.history[-3:].mean(0) > res.history[:2].mean(0) + 1.0).all()), res.history[[0, -1]]
    assert res.images.min() >= 0 and res.images.max() <= 1
    # the reported objective is the unit's score on the returned image, as the model sees it
    with torch.no_grad():
        x = (res.images - 0.5) / 0.5  # the default model's mean = std = 0.5
        cap = convlens.LayerCapture({"blocks.2": clf.model.blocks[2]}, stop_early=True)
        with convlens.model_guard(clf.model), cap:
            cap.run(clf.model, x)
    assert torch.allclose(cap["blocks.2"][[0, 1], [0, 7]].mean((1, 2)), res.objective, rtol=1e-4, atol=1e-4)


def test_dead_unit_is_reported(tiny):
    with pytest.warns(RuntimeWarning, match="never responded"):
        res = feature_visualization(tiny, "relu2", [0, 7], **FAST)
    assert res.dead == [False, True]
    assert float(res.objective[1]) == 0.0
    assert "DEAD" in res.plot().axes[1].get_title()


def test_diversity_separates_images_of_one_channel(tiny):
    def gram_similarity(res):
        with torch.no_grad():
            a = tiny.conv2(tiny.relu1(tiny.conv1(res.inputs))).flatten(2)
            g = (a @ a.transpose(1, 2)).flatten(1)
            g = g / g.norm(dim=1, keepdim=True)
            return float(g[0] @ g[1])

    plain = feature_visualization(tiny, "conv2", [2, 2], steps=30, size=32, transforms=())
    diverse = feature_visualization(tiny, "conv2", [2, 2], steps=30, size=32, transforms=(), diversity=20.0)
    assert gram_similarity(diverse) < gram_similarity(plain) - 0.05


# -- transforms: exact values on tiny tensors -------------------------------------------------------
def test_pad_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    g = torch.Generator()
    assert torch.equal(
        pad(1)(x, g)[0, 0],
        torch.tensor([[4.0, 3, 4, 3], [2, 1, 2, 1], [4, 3, 4, 3], [2, 1, 2, 1]]),
    )
    const = pad(1, mode="constant", value=0.5)(x, g)[0, 0]
    assert torch.equal(const, torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 1, 2, 0.5], [0.5, 3, 4, 0.5], [0.5] * 4]))


def test_jitter_crops_each_image_at_its_own_offset():
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    out = jitter(1)(x, torch.Generator().manual_seed(5))
    off = torch.randint(0, 2, (2, 2), generator=torch.Generator().manual_seed(5)).tolist()
    assert out.shape == (2, 1, 2, 2)
    for i, (dy, dx) in enumerate(off):
        assert torch.equal(out[i], x[i, :, dy : dy + 2, dx : dx + 2])
    assert torch.equal(jitter(0)(x, torch.Generator()), x)


def test_rotate_and_scale_values():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)
    assert torch.allclose(random_rotate([90])(x, g), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    assert torch.allclose(random_rotate([0])(x, g), x, atol=1e-6)
    y = (10 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None]).view(1, 1, 4, 4)
    assert torch.allclose(random_scale([1.0])(y, g), y, atol=1e-5)
    # zoom 2 about the centre: output pixel j samples input coordinate 0.75 + 0.5 j (bilinear)
    c = 0.75 + 0.5 * torch.arange(4.0)
    assert torch.allclose(random_scale([2.0])(y, g)[0, 0], 10 * c[:, None] + c[None], atol=1e-5)


def test_standard_transforms_shape_and_determinism():
    x = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        out = x
        for t in standard_transforms(128):
            out = t(out, g)
        return out

    a, b, c = run(3), run(3), run(4)
    assert a.shape == (3, 3, 128 + 24 - 8 - 4, 128 + 24 - 8 - 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- determinism and batching -----------------------------------------------------------------------
def test_deterministic_for_a_seed(tiny):
    a = feature_visualization(tiny, "conv2", [0, 3], **FAST)
    b = feature_visualization(tiny, "conv2", [0, 3], **FAST)
    c = feature_visualization(tiny, "conv2", [0, 3], seed=1, **FAST)
    assert torch.equal(a.images, b.images) and torch.equal(a.objective, b.objective)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_batched_equals_separate(tiny, param):
    opts = {"steps": 5, "size": 32, "transforms": (), "param": param}
    batched = feature_visualization(tiny, "conv2", [0, 2, 5], **opts)
    for i, c in enumerate([0, 2, 5]):
        alone = feature_visualization(tiny, "conv2", [c], **opts)
        assert torch.allclose(batched.images[i], alone.images[0], atol=1e-4)
        assert torch.allclose(batched.objective[i], alone.objective[0], rtol=1e-4, atol=1e-5)


def test_batched_reaches_same_objective_over_many_steps(tiny):
    opts = {"steps": 60, "size": 32, "transforms": ()}
    batched = feature_visualization(tiny, "conv2", [1, 4], **opts)
    alone = torch.cat([feature_visualization(tiny, "conv2", [c], **opts).objective for c in (1, 4)])
    assert torch.allclose(batched.objective, alone, rtol=1e-3)


# -- speed mechanics and model safety ---------------------------------------------------------------
def test_forward_stops_at_the_target_layer(clf):
    fired = {"bn1": 0, "blocks.0": 0, "blocks.3": 0, "conv_stem": 0}
    named = dict(clf.model.named_modules())

    def counter(name):
        def hook(*_):
            fired[name] += 1

        return hook

    # how often each module runs is traced once per input shape (a name means its last call)
    call_counts(clf.model, torch.zeros(1, 3, 32, 32))
    handles = [named[n].register_forward_hook(counter(n)) for n in fired]
    try:
        feature_visualization(clf, "conv_stem", [0, 1], steps=3, size=32)
        assert fired == {"bn1": 0, "blocks.0": 0, "blocks.3": 0, "conv_stem": 4}  # 3 steps + the final score
        feature_visualization(clf, "blocks.2", [0], steps=3, size=32)
        assert fired["blocks.0"] == 4 and fired["blocks.3"] == 0
    finally:
        for h in handles:
            h.remove()


def test_no_parameter_gradients_and_model_unchanged(tiny):
    tiny.train()
    tiny.fc.weight.requires_grad_(False)
    tiny.conv1.weight.grad = torch.ones_like(tiny.conv1.weight)
    snap = snapshot(tiny)
    seen = []
    handle = tiny.conv2.register_forward_hook(
        lambda m, i, o: seen.append((m.training, [p.requires_grad for p in tiny.parameters()]))
    )
    try:
        res = feature_visualization(tiny, "relu2", [0, 1], **FAST)
    finally:
        handle.remove()
    assert all(not training and not any(flags) for training, flags in seen)
    assert_unchanged(tiny, snap)
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="has 8 channels"):
        feature_visualization(tiny, "relu2", [0, 8], **FAST)
    assert_unchanged(tiny, snap)
    assert res.images.shape == (2, 3, 32, 32)


def test_default_model_unchanged(clf):
    snap = snapshot(clf.model)
    with torch.no_grad():
        feature_visualization(clf, "blocks.1", [0, 3], steps=2, size=32)
        assert not torch.is_grad_enabled()  # works under the caller's no_grad, which survives
    assert_unchanged(clf.model, snap)


# -- results, input checks, CLI ------------------------------------------------------------------
def test_save_writes_exactly_the_returned_images(tiny, tmp_path):
    res = feature_visualization(tiny, "conv2", [0, 3], **FAST)
    with pytest.warns(DeprecationWarning, match="save"):  # the old files
        paths = res.save(tmp_path / "fv.png")
    assert [p.name for p in paths] == ["fv_0_c0.png", "fv_1_c3.png", "fv.npy", "fv_grid.png"]
    for i in range(2):
        png = np.asarray(Image.open(paths[i]))
        assert png.shape == (32, 32, 3)
        assert np.array_equal(png, np.round(res.images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert np.array_equal(np.load(paths[2]), res.images.numpy())
    assert [ax.get_title().split("\n")[0] for ax in res.plot().axes[:2]] == ["conv2 c0", "conv2 c3"]


def test_class_objective_takes_names(tiny):
    clf = convlens.Classifier(tiny, mean=(0.5,) * 3, std=(0.25,) * 3, labels=list("abcde"))
    res = feature_visualization(clf, None, ["b", 4], objective="class", **FAST)
    assert res.channels == [1, 4] and res.labels == ["b", "e"] and res.layer == "logits"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"objective": "nope"}, "objective"),
        ({"param": "wavelet"}, "param"),
        ({"steps": 0}, "steps"),
        ({"size": 4}, "size"),
        ({"lr": -1.0}, "lr"),
        ({"transforms": "fancy"}, "transforms"),
        ({"channels": [-1]}, "non-negative"),
        ({"channels": []}, "no channels"),
        ({"layer": "conv9"}, "no layer named"),
    ],
)
def test_bad_input_is_a_clear_value_error(tiny, kwargs, match):
    args = {"layer": "conv2", "channels": [0], **FAST, **kwargs}
    with pytest.raises(ValueError, match=match):
        feature_visualization(tiny, args.pop("layer"), args.pop("channels"), **args)


def test_cli_filters(tmp_path, capsys):
    out = tmp_path / "o"
    args = ["--layer", "blocks.1", "--channels", "0,5", "--steps", "2", "--size", "32", "--out", str(out)]
    rc = main(["filters", *args])
    assert rc == 0
    assert sorted(p.name for p in (out / "blocks.1").iterdir()) == [
        "blocks.1.npy", "blocks.1_0_c0.png", "blocks.1_1_c5.png", "blocks.1_grid.png"]
    assert "blocks.1 c5" in capsys.readouterr().out
    assert main(["filters", "--layer", "nope", "--steps", "2", "--out", str(tmp_path / "p")]) == 2
    assert "no layer named" in capsys.readouterr().err


def test_too_small_size_is_a_clear_error():
    # Inception's unpadded convolutions cannot run on 64 px: say so instead of a kernel-size error
    model = torchvision.models.inception_v3(init_weights=False, aux_logits=False).eval()
    with pytest.raises(ValueError, match="size=64 px is too small for this model to reach Mixed_7c"):
        feature_visualization(model, "Mixed_7c", [0], steps=1, size=64)
    assert count_hooks(model) == 0
