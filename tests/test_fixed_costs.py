"""The CLI's fixed costs (issue 26): what ``import convlens`` loads, Grad-CAM's waits for the device,
the approximate occlusion map's quick evidence (the same numbers where it is not reduced), the
Spearman without scipy, and bad --target / --layer failing before any image is read."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import convlens
from conftest import assert_unchanged, snapshot
from convlens.cli import main
from convlens.metrics._common import average_ranks, rank_correlation


# -- import laziness ---------------------------------------------------------------------------
def test_import_convlens_and_the_cli_load_no_plotting_stats_or_model_zoo():
    code = (
        "import sys, convlens, convlens.cli; print(sorted(m for m in ('matplotlib', 'scipy', 'pydantic', "
        "'timm', 'torchvision', 'skimage', 'sklearn', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- Spearman without scipy --------------------------------------------------------------------
def test_rank_correlation_equals_scipy_with_ties_and_keeps_the_constant_rules():
    rng = np.random.default_rng(3)
    for n, levels in ((2, 2), (7, 3), (300, 5), (1000, 1000)):
        a = rng.integers(0, levels, n).astype(np.float32)
        b = np.round(rng.normal(size=n) * 3) if n % 2 else rng.normal(size=n)
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        assert rank_correlation(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4.0, 1.0, 4.0, 2.0, 4.0])
    assert rank_correlation(np.ones(5), np.arange(5.0)) == 0.0  # constant vs varying: no shared ordering
    assert np.isnan(rank_correlation(np.ones(5), np.zeros(5)))
    assert rank_correlation(np.arange(9.0), -np.exp(np.arange(9.0))) == -1.0


# -- Grad-CAM: one wait for the device per call ------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture()
def syncs(monkeypatch):
    """Counts the calls that copy a tensor's value to the host (on a GPU: wait for the device)."""
    seen: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            seen.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


def _reference_cam(net: Net, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    a = net.act(net.conv(x))
    out = net.fc(a.mean((2, 3)))
    (g,) = torch.autograd.grad(out[range(len(target)), target].sum(), a)
    return (g.mean((2, 3), keepdim=True) * a).sum(1).clamp(min=0).detach()


def test_grad_cam_reads_the_device_once_per_call(syncs, device):
    net, x = Net().eval().to(device), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    before = snapshot(net)
    r = convlens.grad_cam(net, x, target=2, layer="act")
    assert syncs == ["tolist"]  # the deferred checks: finite output and gradient, zero gradient, constant map
    torch.testing.assert_close(r.raw, _reference_cam(net, x, [2, 2, 2]), rtol=1e-5, atol=1e-6)
    syncs.clear()
    top = convlens.grad_cam(net, x, layer="act")
    assert syncs == ["tolist"]  # the top-1 classes, which the result names, are read with the checks
    want = net(x).argmax(1).tolist()
    assert top.target == want
    torch.testing.assert_close(top.raw, _reference_cam(net, x, want), rtol=1e-5, atol=1e-6)
    assert_unchanged(net, before)


def test_grad_cam_deferred_checks_still_raise_and_warn():
    net, x = Net().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(convlens.checks.NonFiniteError, match="the model's output holds 4 NaN and 0 infinite values"):
        convlens.grad_cam(net, torch.where(torch.arange(64).view(8, 8) < 1, torch.nan, x), target=0, layer="act")
    with torch.no_grad():
        net.fc.weight.zero_()
    with pytest.warns(RuntimeWarning, match="gradient of the target at act is zero everywhere for rows \\[0\\]"):
        r = convlens.grad_cam(net, x, target=0, layer="act")
    assert "zero_gradient" in r.settings and float(r.raw.abs().max()) == 0.0


# -- the approximate occlusion map's quick evidence --------------------------------------------
def test_quick_evidence_keeps_the_maps_numbers_and_says_so(clf, sample_x):
    from convlens.cli_support import QUICK_DRAWS, _evidence
    from convlens.metrics.evidence import random_like
    from convlens.metrics.trust import TRUST_DRAWS, trust_summary

    occ = convlens.occlusion(clf, sample_x, patch=56, stride=56)
    quick = replace(occ, settings={**occ.settings, "mode": "approximate"})
    before = snapshot(clf.model)
    lines = _evidence(clf, sample_x, quick)
    assert_unchanged(clf.model, before)
    full = trust_summary(clf, sample_x, {"x": occ}, class_maps=[], draws=TRUST_DRAWS)
    few = trust_summary(clf, sample_x, {"x": occ}, class_maps=[], draws=QUICK_DRAWS)
    for name in ("x", "centred Gaussian"):  # the map's and the Gaussian's curves: the same numbers
        for j in (0, 1):
            torch.testing.assert_close(few.curves[name][j].scores, full.curves[name][j].scores, rtol=0, atol=0)
    # the quick references are the full evidence's first draws
    torch.testing.assert_close(
        random_like("windows", (4, 4), (224, 224), few_opts(occ), draws=QUICK_DRAWS),
        random_like("windows", (4, 4), (224, 224), few_opts(occ), draws=TRUST_DRAWS)[:QUICK_DRAWS],
    )
    auc = few.auc()
    shown = re.search(
        r"deletion AUC ([\d.]+), insertion AUC ([\d.]+) .*random 4x4 windows ([\d.]+) / ([\d.]+), "
        r"centred Gaussian ([\d.]+) / ([\d.]+)\)",
        lines[0],
    )
    assert shown, lines[0]
    want = [
        auc["x"]["deletion"],
        auc["x"]["insertion"],
        auc["random 4x4 windows"]["deletion"],
        auc["random 4x4 windows"]["insertion"],
        auc["centred Gaussian"]["deletion"],
        auc["centred Gaussian"]["insertion"],
    ]
    assert [float(v) for v in shown.groups()] == [round(v, 3) for v in want]
    assert f"quick evidence for an approximate map: the random references from {QUICK_DRAWS} draws" in lines[-2]
    assert not any("quick evidence" in line for line in _evidence(clf, sample_x, occ))


def few_opts(occ) -> dict:
    return {"starts": [list(s) for s in occ.settings["starts"]], "patch": list(occ.settings["patch"])}


# -- bad input fails before any image is read --------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["gradcam", "--target", "espreso"],
        ["occlusion", "--target", "espreso"],
        ["explain", "--target", "espreso"],
        ["compare", "--target", "espreso"],
        ["gradcam", "--layer", "blocks.99"],
        ["explain", "--layer", "nope"],
        ["activations", "--layers", "nope"],
        ["filters", "--layer", "nope", "--channels", "1"],
    ],
)
def test_a_misspelt_target_or_layer_fails_fast(argv, monkeypatch, capsys, tmp_path, clf):
    monkeypatch.setattr("convlens.models.load_model", lambda *a, **k: clf)  # the CLI's checks, not the load

    def no_image_work(*a, **k):
        raise AssertionError("an image was read before the options were checked")

    monkeypatch.setattr(type(clf), "preprocess", no_image_work)
    monkeypatch.setattr(convlens.images, "load_image", no_image_work)
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown class 'espreso'; did you mean 'espresso'" in err or "no layer named" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
