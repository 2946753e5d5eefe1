"""Deletion / insertion: hand-computed curves and AUCs, the random-map symmetry, a perfect map,
batching, and the model left as it was."""

from __future__ import annotations

import math

import pytest
import torch
from tests.test_hooks import tiny_net
from torch import nn

import convlens
from conftest import assert_unchanged, snapshot
from convlens.metrics.faithfulness import auc, pixel_order

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread per module


class Weighted(nn.Module):
    """logit 0 = sum over channels and pixels of W * x with W = [[1, 2], [3, 4]] per channel; logit 1 = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = (x * self.w).sum((1, 2, 3))
        return torch.stack([a, torch.zeros_like(a)], 1)


X = torch.ones(1, 1, 2, 2)
MAP = torch.tensor([[[0.0, 2.0], [2.0, 1.0]]])  # order: pixel 1, 2 (tie, flat index), 3, 0


def test_pixel_order_is_a_stable_sort_of_the_negated_map():
    assert pixel_order(MAP).tolist() == [[1, 2, 3, 0]]
    assert pixel_order(torch.zeros(1, 2, 3)).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_auc_is_the_trapezoid_over_k_over_steps():
    s = torch.tensor([[10.0, 8.0, 5.0, 1.0, 0.0]])
    assert auc(s).item() == pytest.approx((10 / 2 + 8 + 5 + 1 + 0 / 2) / 4)


def test_deletion_and_insertion_by_hand_logit(device):
    net, x, m = Weighted().to(device), X.to(device), MAP.to(device)
    d = convlens.deletion(net, x, m, target=0, steps=4, baseline=0.0, score="logit")
    # pixel weights in order 2, 3, 4, 1: deleting them one by one from 10
    assert d.scores.tolist() == [[10.0, 8.0, 5.0, 1.0, 0.0]]
    assert d.auc.item() == pytest.approx(19 / 4)
    assert d.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    i = convlens.insertion(net, x, m, target=0, steps=4, baseline=0.0, score="logit")
    assert i.scores.tolist() == [[0.0, 2.0, 5.0, 9.0, 10.0]]
    assert i.auc.item() == pytest.approx(21 / 4)
    assert d.settings["forwards"] == i.settings["forwards"] == 5
    assert d.target == [0] and d.kind == "deletion" and i.kind == "insertion"


def test_pixels_per_step_is_a_ceiling_and_capped():
    # steps 3 on 4 pixels: ceil(4/3) = 2 pixels per step, counts 0, 2, 4, 4
    d = convlens.deletion(Weighted(), X, MAP, target=0, steps=3, baseline=0.0, score="logit")
    assert d.scores.tolist() == [[10.0, 5.0, 0.0, 0.0]]
    assert d.auc.item() == pytest.approx((10 / 2 + 5 + 0 + 0) / 3)
    assert d.settings["pixels_per_step"] == 2


def test_probability_baseline_tensor_and_top1_target():
    # logits (a, 0): the probability of class 0 is sigmoid(a); top-1 is class 0 for a > 0
    base = torch.full((1, 1, 2, 2), 0.5)
    d = convlens.insertion(Weighted(), X, MAP, steps=4, baseline=base)
    logits = [5.0, 6.0, 7.5, 9.5, 10.0]  # 0.5 * 10, then pixels of weight 2, 3, 4, 1 set to 1
    expected = [1 / (1 + math.exp(-a)) for a in logits]
    torch.testing.assert_close(d.scores[0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert d.target == [0]


def test_map_is_resized_bilinearly_and_saliency_target_is_used():
    x = torch.ones(1, 1, 4, 4)
    small = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    big = torch.nn.functional.interpolate(small[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]

    class Sum(nn.Module):
        def forward(self, x):
            a = (x * torch.arange(16.0).view(4, 4)).sum((1, 2, 3))
            return torch.stack([a, -a], 1)

    a = convlens.deletion(Sum(), x, small, target=1, steps=4, baseline=0.0, score="logit")
    b = convlens.deletion(Sum(), x, big, target=1, steps=4, baseline=0.0, score="logit")
    torch.testing.assert_close(a.scores, b.scores)
    sal = convlens.Saliency(maps=big, raw=small, target=[1], method="handmade", layer=None, images=x)
    c = convlens.deletion(Sum(), x, sal, steps=4, baseline=0.0, score="logit")
    torch.testing.assert_close(c.scores, b.scores)
    assert c.method == "handmade" and c.target == [1]


def test_batched_equals_one_by_one():
    net = tiny_net().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 10, generator=g)
    maps = torch.rand(2, 12, 10, generator=g)
    for kind in (convlens.deletion, convlens.insertion):
        one = kind(net, x, maps, steps=8, batch_size=1)
        many = kind(net, x, maps, steps=8, batch_size=7)
        alone = torch.cat([kind(net, x[i : i + 1], maps[i : i + 1], steps=8, batch_size=18).scores for i in range(2)])
        torch.testing.assert_close(one.scores, many.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(one.scores, alone, atol=1e-6, rtol=0)
        assert one.settings["forwards"] == 18


def test_model_untouched_also_after_an_error():
    net = tiny_net()
    net.train()
    net[0].weight.grad = torch.ones_like(net[0].weight)
    before = snapshot(net)
    x = torch.randn(1, 3, 8, 8)
    convlens.deletion(net, x, torch.rand(1, 8, 8), steps=4)
    assert_unchanged(net, before)
    with pytest.raises(ValueError, match="non-finite"):
        convlens.insertion(net, x, torch.full((1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="2 maps for 1 images"):
        convlens.insertion(net, x, torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="baseline"):
        convlens.insertion(net, x, torch.rand(1, 8, 8), baseline="zeros")
    with pytest.raises(ValueError, match="steps"):
        convlens.deletion(net, x, torch.rand(1, 8, 8), steps=0)
    assert_unchanged(net, before)


class OnePatch(nn.Module):
    """Looks only at the 8x8 patch at rows 8..15, cols 16..23: logit 0 = 4 * its mean, logit 1 = 0."""

    def forward(self, x):
        a = 4 * x[:, :, 8:16, 16:24].mean((1, 2, 3))
        return torch.stack([a, torch.zeros_like(a)], 1)


def test_perfect_map_beats_a_random_map():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 32, 32, generator=g) + 0.5
    net = OnePatch()
    occ = convlens.occlusion(net, x, target=0, patch=4, stride=2, fast=False)
    rnd = torch.rand(1, 32, 32, generator=g)
    kw = {"target": 0, "baseline": 0.0, "score": "logit"}
    d_occ, d_rnd = (convlens.deletion(net, x, m, **kw) for m in (occ, rnd))
    i_occ, i_rnd = (convlens.insertion(net, x, m, **kw) for m in (occ, rnd))
    clean = d_occ.scores[0, 0].item()
    # the patch is 1/16 of the image: the occlusion map hides (or reveals) all of it within 2 steps
    assert d_occ.scores[0, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert i_occ.scores[0, 2].item() == pytest.approx(clean, abs=1e-5)
    assert d_occ.auc.item() < 0.1 * clean
    assert i_occ.auc.item() > 0.9 * clean
    # a random order removes the patch's pixels at the rate of the others: about half the area
    assert 0.4 * clean < d_rnd.auc.item() < 0.6 * clean
    assert 0.4 * clean < i_rnd.auc.item() < 0.6 * clean


def test_random_map_deletion_and_insertion_agree_on_the_default_model(clf, sample_x):
    # for a per-pixel random order, inserting a fraction f is distributed like deleting 1 - f,
    # so the two AUCs agree up to noise
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        rnd = torch.rand(1, 224, 224, generator=g)
        d = convlens.deletion(clf, sample_x, rnd)
        i = convlens.insertion(clf, sample_x, rnd)
        assert abs(d.auc.item() - i.auc.item()) < 0.05, (d.auc.item(), i.auc.item())
        assert d.scores[0, 0].item() == pytest.approx(i.scores[0, -1].item(), abs=1e-6)


def test_default_model_gradcam_beats_random_and_model_is_unchanged(clf, sample_x):
    before = snapshot(clf.model)
    cam = convlens.grad_cam(clf, sample_x)
    ins = convlens.insertion(clf, sample_x, cam)
    rnd = convlens.insertion(clf, sample_x, torch.rand(1, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert ins.target == cam.target
    assert ins.auc.item() > rnd.auc.item()
    assert_unchanged(clf.model, before)


def test_plot_and_save_write_png_and_npy(tmp_path):
    d = convlens.deletion(Weighted(), X, MAP, target=0, steps=4, baseline=0.0, score="logit")
    with pytest.warns(DeprecationWarning, match="save"):  # the old files
        written = d.save(tmp_path / "del.png")
    assert [p.name for p in written] == ["del.png", "del.npy"]
    import numpy as np

    assert np.load(written[1]).tolist() == [[10.0, 8.0, 5.0, 1.0, 0.0]]
    assert "tensor(" not in repr(d) and "4.750" in repr(d)


def test_several_classes_per_image_follow_the_saliency_rows():
    net = tiny_net().eval()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    cam = convlens.grad_cam(net, x, layer="3", top=2)  # rows: image 0 x2, image 1 x2
    d = convlens.deletion(net, x, cam, steps=4, score="logit")
    assert d.target == cam.target and d.scores.shape == (4, 5)
    for row, (i, t) in enumerate(zip(cam.settings["image_index"], cam.target)):
        one = convlens.deletion(net, x[i : i + 1], cam.maps[row : row + 1], target=t, steps=4, score="logit")
        torch.testing.assert_close(d.scores[row], one.scores[0])


class TupleOut(nn.Module):
    """The same scores as :class:`Weighted`, returned as ``(logits, features)`` (an auxiliary head)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Weighted()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(x), x.flatten(1)


def test_models_with_tuple_or_dict_outputs_give_the_same_curves():
    d = convlens.deletion(TupleOut(), X, MAP, target=0, steps=4, baseline=0.0, score="logit")
    assert d.scores.tolist() == [[10.0, 8.0, 5.0, 1.0, 0.0]]
    named = convlens.as_classifier(TupleOut(), output=lambda out: out[0])  # the user's own output= adapter
    i = convlens.insertion(named, X, MAP, target=0, steps=4, baseline=0.0, score="logit")
    assert i.scores.tolist() == [[0.0, 2.0, 5.0, 9.0, 10.0]]


def test_deletion_insertion_shares_the_clean_and_baseline_forwards_and_equals_one_by_one():
    """Several maps in one call: every curve equal to its own deletion / insertion call (values,
    AUCs, targets), with the clean images and the full baseline run once for all the curves."""
    net = tiny_net().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 12, 10, generator=g)
    maps = {"a": torch.rand(2, 12, 10, generator=g), "b": torch.rand(2, 12, 10, generator=g)}
    sal = convlens.Saliency(maps=maps["b"], raw=maps["b"], target=[1, 0], method="handmade", layer=None, images=x)
    both = convlens.deletion_insertion(net, x, {"a": maps["a"], "b": sal}, steps=6, batch_size=5)
    for name, saliency in (("a", maps["a"]), ("b", sal)):
        d, i = both[name]
        want_d = convlens.deletion(net, x, saliency, steps=6)
        want_i = convlens.insertion(net, x, saliency, steps=6)
        torch.testing.assert_close(d.scores, want_d.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(i.scores, want_i.scores, atol=1e-6, rtol=0)
        assert (d.kind, i.kind, d.target, i.target) == ("deletion", "insertion", want_d.target, want_i.target)
    assert both["b"][0].target == [1, 0] and both["b"][0].method == "handmade"
    # 2 images: clean + baseline once (4), then 2 maps x 2 kinds x 2 images x 5 inner steps (40)
    assert both["a"][0].settings["forwards"] == 44 and want_d.settings["forwards"] == 14


def test_curves_run_on_a_private_copy_only_when_it_computes_the_same():
    """The forwards run on a private copy of the model (eval, folded batch norms, channels-last)
    only after its output matched the model's; a forward hook of the caller that changes the
    output (the copy has none) makes the curves use the model itself, hook included."""
    from convlens._inference import fast_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(1, 3, 8, 8)
    clf = convlens.as_classifier(net)
    assert fast_model(clf, x) is not net  # the copy passed its check
    before = snapshot(net)
    plain = convlens.deletion(net, x, torch.rand(1, 8, 8), target=2, steps=4, score="logit")
    assert_unchanged(net, before)
    handle = net[5].register_forward_hook(lambda m, a, out: out * 0 + torch.tensor([0.0, 0.0, 7.0]))
    try:
        assert fast_model(clf, x) is net  # the user's hook changes the output: no copy
        hooked = convlens.deletion(net, x, torch.rand(1, 8, 8), target=2, steps=4, score="logit")
    finally:
        handle.remove()
    assert hooked.scores.tolist() == [[7.0] * 5]  # the hook's output, at every step
    assert not torch.equal(plain.scores, hooked.scores)
