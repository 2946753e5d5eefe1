"""Intermediate activations: exact values, early stop, stage finding, captum agreement, plots,
files, hooks and model state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import convlens
from convlens import activations
from convlens.checks import NonFiniteError
from convlens.cli import main
from convlens.hooks import count_hooks
from convlens.layers import call_counts, find_stages


class Boom(nn.Module):
    """A layer that must never run once armed: proves the pass stopped early."""

    armed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise AssertionError("the forward pass went past the deepest requested layer")
        return x


class Tiny(nn.Module):
    """1x1 conv (weights 1, 2; biases 0, -5) -> ReLU(inplace) -> 2x2 max pool -> Boom."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.head = Boom()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.relu(self.conv(x))))


@pytest.fixture()
def xt() -> torch.Tensor:
    return torch.arange(16.0).view(1, 1, 4, 4)


def test_exact_values_and_early_stop(xt, device):
    m = Tiny().eval().to(device)
    xt = xt.to(device)
    # a name means a module's last call, known only from how often it runs: one traced pass per
    # model and input shape (remembered); after it, every call stops at the deepest layer
    m.head.armed = False
    assert call_counts(m, xt) == {"conv": 1, "relu": 1, "pool": 1, "head": 1}
    m.head.armed = True
    acts = activations(m, xt, ["pool", "conv", "relu"])
    x = xt[0, 0]
    # execution order, whatever the request order
    assert acts.layers == ["conv", "relu", "pool"]
    # the in-place ReLU after conv must not overwrite the captured conv output (2x - 5 < 0 stays)
    torch.testing.assert_close(acts["conv"][0], torch.stack([x, 2 * x - 5]), rtol=0, atol=0)
    torch.testing.assert_close(acts["relu"][0], torch.stack([x, (2 * x - 5).clamp(min=0)]), rtol=0, atol=0)
    torch.testing.assert_close(acts["pool"][0, 0].cpu(), torch.tensor([[5.0, 7.0], [13.0, 15.0]]), rtol=0, atol=0)
    torch.testing.assert_close(acts["pool"][0, 1].cpu(), torch.tensor([[5.0, 9.0], [21.0, 25.0]]), rtol=0, atol=0)
    # channel 1 is the more active at every layer but conv (mean of 2x - 5 = 10 vs 7.5)
    assert acts.top_channels("relu", 2).tolist() == [[1, 0]]
    assert acts.top_channels("conv", 1).tolist() == [[1]]
    assert count_hooks(m) == 0


def test_non_finite_raises_and_constant_rows_warn(xt):
    """One pass per map decides both checks: a NaN or an infinity anywhere in a map is an error
    naming the layer and the counts; an image whose map holds one value warns with its row."""
    m = Tiny().eval()
    m.head.armed = False
    bad = xt.repeat(2, 1, 1, 1)
    bad[1, 0, 3, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the output of conv holds 0 NaN and 2 infinite values of 64"):
        activations(m, bad, ["conv", "relu"])
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the output of conv holds 2 NaN and 0 infinite"):
        activations(m, bad, ["conv"])
    flat = torch.cat([xt, torch.full_like(xt, -3.0)])  # image 1: conv -3 and -11, ReLU 0 everywhere
    with pytest.warns(RuntimeWarning, match=r"activations of relu map is constant \(all 0\) for rows \[1\]") as rec:
        acts = activations(m, flat, ["conv", "relu"])
    assert [str(w.message).split(" map")[0] for w in rec] == ["activations of relu"]  # conv's rows vary
    assert rec[0].filename == __file__  # the warning points at the caller's line
    torch.testing.assert_close(acts["relu"][1], torch.zeros(2, 4, 4), rtol=0, atol=0)
    assert count_hooks(m) == 0


def test_top_channels_rank_by_mean(clf, sample_x):
    acts = activations(clf, sample_x, ["blocks.1"])
    m = acts["blocks.1"]
    expected = m.mean(dim=(2, 3)).argsort(dim=1, descending=True)[:, :5]
    assert acts.top_channels("blocks.1", 5).tolist() == expected.tolist()
    assert acts.top_channels("blocks.1", 1000).shape == (1, 24)
    with pytest.raises(KeyError):
        acts.top_channels("nope")


def test_equals_captum_layer_activation(clf, sample_x):
    import captum.attr as captum  # test extra; imported here, not at the top, to keep collection quick

    names = ["blocks.0", "blocks.3", "bn2"]
    acts = activations(clf, sample_x, names)
    mods = [dict(clf.model.named_modules())[n] for n in names]
    ref = captum.LayerActivation(clf.model, mods).attribute(sample_x)
    for n, r in zip(names, ref):
        torch.testing.assert_close(acts[n], r, rtol=0, atol=0)


def test_stages_of_common_architectures():
    x = torch.zeros(1, 3, 224, 224)
    r50 = torchvision.models.resnet50().eval()
    acts = activations(r50, x, "stages")
    # the spec's five hook points and shapes
    assert {n: tuple(t.shape[1:]) for n, t in acts.maps.items()} == {
        "relu": (64, 112, 112),
        "layer1": (256, 56, 56),
        "layer2": (512, 28, 28),
        "layer3": (1024, 14, 14),
        "layer4": (2048, 7, 7),
    }
    small = torch.zeros(1, 3, 64, 64)
    assert find_stages(torchvision.models.vgg11().eval(), small) == [
        "features.1", "features.4", "features.9", "features.14", "features.19"
    ]
    assert find_stages(torchvision.models.mobilenet_v2().eval(), small) == [
        "features.1", "features.3", "features.6", "features.13", "features.18"
    ]


def test_stages_of_default_model(clf, sample_x):
    acts = activations(clf, sample_x, "stages")
    # timm declares its stages (feature_info); we use them, as timm's features_only would
    assert acts.layers == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert acts.settings["stages"] is True
    assert [t.shape[1] for t in acts.maps.values()] == [16, 24, 40, 112, 320]


def test_stages_without_feature_info_come_from_shapes(clf, sample_x):
    plain = torch.nn.Sequential(*list(clf.model.children())).eval()  # same modules, no feature_info
    names = dict(enumerate(find_stages(plain, sample_x)))
    # last map per resolution: blocks 0, 1, 2, 4 and the head's bn2 (child 4)
    assert names == {0: "2.0", 1: "2.1", 2: "2.2", 3: "2.4", 4: "4"}


def test_patterns_and_modules(clf, sample_x):
    acts = activations(clf, sample_x, ["blocks.?", clf.model.conv_stem])
    assert acts.layers == ["conv_stem"] + [f"blocks.{i}" for i in range(7)]
    with pytest.raises(convlens.LayerError, match="did you mean"):
        activations(clf, sample_x, ["blocks.7x"])
    with pytest.raises(convlens.LayerError, match="matches no layer"):
        activations(clf, sample_x, ["stage*"])


def test_batch_equals_single(clf, sample_x):
    x = torch.cat([sample_x, sample_x.flip(-1)])
    both = activations(clf, x, ["blocks.2"])["blocks.2"]
    one = activations(clf, x[1:], ["blocks.2"])["blocks.2"]
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-6)


def test_model_unchanged_and_no_hooks_after_failure(xt):
    m = Tiny().train()
    m.conv.weight.grad = torch.ones_like(m.conv.weight)
    grad = m.conv.weight.grad
    w = m.conv.weight.detach().clone()
    for bad in (["nope"], ["conv", "head"]):  # unknown name; a layer whose forward raises
        with pytest.raises((convlens.LayerError, AssertionError)):
            activations(m, xt, bad)
        assert count_hooks(m) == 0
    m.head.armed = False  # a successful call (its first traces the whole pass for the call counts)
    activations(m, xt, ["relu"])
    assert m.training and m.relu.inplace and m.conv.weight.grad is grad
    assert torch.equal(m.conv.weight, w) and count_hooks(m) == 0 and torch.is_grad_enabled()


def test_non_map_layer_is_refused():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(convlens.LayerError, match="not an"):
        activations(m, torch.zeros(1, 3, 8, 8), ["1"])


def test_plot_grid(clf, sample_x):
    acts = activations(clf, sample_x, ["blocks.1", "bn2"])
    fig = acts.plot(k=4)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 8
    top = acts.top_channels("bn2", 4)[0].tolist()
    assert [ax.get_title().split()[1] for ax in axes[4:]] == [str(c) for c in top]
    assert "blocks.1\n24x56x56" == axes[0].get_ylabel()
    first = acts.plot(channels="first", k=3)
    assert [ax.get_title().split()[1] for ax in first.axes if ax.images][:3] == ["0", "1", "2"]
    chosen = acts.plot(channels={"blocks.1": [5], "bn2": [7, 9]})
    assert len([ax for ax in chosen.axes if ax.images]) == 3
    with pytest.raises(ValueError, match="out of range"):
        acts.plot(channels=[30])


def test_save_png_and_npy(tmp_path, clf, sample_x):
    acts = activations(clf, sample_x, ["blocks.1", "bn2"])
    with pytest.warns(DeprecationWarning, match="save"):  # the old files
        paths = acts.save(tmp_path, prefix="activations")
    assert sorted(p.name for p in paths) == ["activations.png", "activations_blocks.1.npy", "activations_bn2.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "activations_bn2.npy"), acts["bn2"].numpy())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_activations(tmp_path, capsys, monkeypatch, clf):
    monkeypatch.setattr("convlens.cli.load_classifier", lambda args: clf)
    assert main(["activations", "--layers", "blocks.1", "bn2", "--channels", "0,3", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "chelsea.jpg").iterdir())
    assert names == ["activations.png", "activations_blocks.1.npy", "activations_bn2.npy"]
    assert "1280x7x7" in capsys.readouterr().out
    assert main(["activations", "--channels", "a,b", "--out", str(tmp_path / "a")]) == 2
    assert main(["activations", "--layers", "nope", "--out", str(tmp_path / "b")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_plot_rows_layout_is_the_tiles_picture(clf, sample_x):
    """layout="rows" (explain's report) shows the same channels, titles and colours as the tiles."""
    import matplotlib

    acts = activations(clf, sample_x, ["blocks.1", "bn2"])
    fig = acts.plot(k=3, layout="rows")
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 2 and axes[0].get_ylabel() == "blocks.1\n24x56x56"
    top = acts.top_channels("bn2", 3)[0].tolist()
    m = acts["bn2"][0].numpy()
    assert [t.get_text() for t in axes[1].texts] == [f"ch {c} ({m[c].mean():.2g})" for c in top]
    strip = axes[1].images[0].get_array()
    w = m.shape[2]
    lo, hi = m[top[1]].min(), m[top[1]].max()
    x0 = w + max(1, round(0.12 * w))  # the second tile
    expect = matplotlib.colormaps["viridis"]((m[top[1]] - lo) / (hi - lo))[..., :3]
    np.testing.assert_allclose(strip[:, x0 : x0 + w], expect, atol=1e-6)
    with pytest.raises(ValueError, match="layout"):
        acts.plot(layout="grid")
