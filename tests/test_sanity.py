"""Sanity check (cascading randomisation) and class sensitivity: verdicts on the default model,
a fixed map that ignores the model, exact re-initialisation steps, the user's model untouched."""

from __future__ import annotations

import pytest
import torch
from tests.test_hooks import tiny_net

import convlens
from conftest import assert_unchanged, snapshot
from convlens.metrics.sanity import _steps, cascade_stages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread per module


def test_steps_reinitialise_from_the_output_down_cumulatively():
    net = tiny_net().eval()
    x = torch.randn(1, 3, 8, 8)
    # conv 0 -> bn 1 -> relu 2 -> conv 3 -> pool 4 -> flatten 5 -> linear 6
    assert _steps(net, x, ["6", "3", "0"]) == [["6"], ["3"], ["0", "1"]]
    assert _steps(net, x, ["3"]) == [["3", "6"]]


def test_a_fixed_map_fails_and_the_model_is_untouched(tmp_path):
    net = tiny_net()
    net.train()
    net[3].weight.grad = torch.ones_like(net[3].weight)
    before = snapshot(net)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fixed = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))

    def ignores_the_model(clf, x, target):
        return fixed.expand(x.shape[0], -1, -1)

    check = convlens.sanity_check(net, x, ignores_the_model, stages=["6", "3", "0"], draws=3)
    assert check.passed == [False, False]
    torch.testing.assert_close(check.spearman, torch.ones(2, 3))
    torch.testing.assert_close(check.ssim, torch.ones(2, 3))
    assert check.stages == ["6", "3", "0"] and check.method == "ignores_the_model"
    assert check.maps.shape == (2, 4, 16, 16)
    assert_unchanged(net, before)
    with pytest.warns(DeprecationWarning, match="save"):  # the old files: <path>.png/.npy
        png, npy = check.save(tmp_path / "sanity", index=1)
    assert png.read_bytes()[:4] == b"\x89PNG"
    import numpy as np

    np.testing.assert_array_equal(np.load(npy)[1, 2], fixed.numpy())
    assert "tensor(" not in repr(check) and "passed=[False, False]" in repr(check)


def test_a_map_of_the_randomised_weights_changes():
    # a "method" that draws the classifier's weight row for the target: any re-init changes it
    net = tiny_net().eval()
    x = torch.randn(1, 3, 8, 8)

    def weight_map(clf, x, target):
        w = dict(clf.model.named_modules())["6"].weight[target[0]]
        return torch.cat([w, torch.zeros(64 - w.numel())]).view(1, 8, 8)

    weights = net[6].weight.clone()
    check = convlens.sanity_check(net, x, weight_map, stages=["6"], draws=2)
    assert len(check.settings["draws"][0]) == 2
    t = check.target[0]
    torch.testing.assert_close(check.maps[0, 0].flatten()[:5], weights[t])  # the original, from the user's model
    assert not torch.equal(check.maps[0, 1], check.maps[0, 0])  # the copy's classifier was re-initialised
    torch.testing.assert_close(net[6].weight, weights, atol=0, rtol=0)
    assert check.target == [int(net(x).argmax())]


def test_default_model_gradcam_passes_gradcam_pp_fails(clf, sample_x):
    before = snapshot(clf.model)
    assert cascade_stages(clf.model, sample_x) == ["classifier", "blocks.6", "blocks.4", "blocks.2", "blocks.1",
                                                   "blocks.0"]
    good = convlens.sanity_check(clf, sample_x, "gradcam", stages=["classifier", "blocks.6"])
    assert good.passed == [True]
    assert good.spearman[0, 0] < 0.5
    assert good.settings["layer"] == "bn2"
    bad = convlens.sanity_check(clf, sample_x, "gradcam++", stages=["classifier"])
    assert bad.passed == [False] and bad.spearman[0, 0] > 0.8
    fig = good.plot()
    assert len(fig.axes) == 4  # input, original, two steps
    assert_unchanged(clf.model, before)


def test_class_sensitivity_on_the_default_model(clf, sample_x):
    before = snapshot(clf.model)
    least = int(clf.logits(sample_x).argmin())
    cam = convlens.class_sensitivity(clf, sample_x, "gradcam")
    assert cam.other == [least] and cam.discriminative == [True]
    assert cam.spearman.item() < 0.5
    # Eigen-CAM never looks at the class: the two maps are the same
    eig = convlens.class_sensitivity(clf, sample_x, "eigencam")
    assert eig.spearman.item() == pytest.approx(1.0) and eig.discriminative == [False]
    torch.testing.assert_close(eig.maps[:, 0], eig.maps[:, 1])
    named = convlens.class_sensitivity(clf, sample_x, "gradcam", other="tench")
    assert named.other == [0] and named.other_labels == ["tench"]
    assert_unchanged(clf.model, before)


def test_bad_arguments():
    net = tiny_net().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="stages is empty"):
        convlens.sanity_check(net, x, "gradcam", stages=[])
    with pytest.raises(ValueError, match="draws"):
        convlens.sanity_check(net, x, "gradcam", stages=["6"], draws=0)
    with pytest.raises(ValueError, match="unknown method"):
        convlens.class_sensitivity(net, x, "saliency")
