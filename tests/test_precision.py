"""Half, bfloat16 and double precision models, and autocast: inputs follow the model's dtype, the
methods compute their rules in float32 (or wider) and return float32, and the results equal the
float32 model's within these tolerances (max abs difference / max abs of the float32 result):

==============  ==========  =========  =========
result          float64     float16    bfloat16
==============  ==========  =========  =========
CAM maps        1e-5        2e-2       8e-2
activations     1e-5        1e-2       5e-2
occlusion       1e-5        5e-3       3e-2      (logit drops / max |logit|; probability drops: abs)
feature vis.    1e-5        2e-2       8e-2      (objective at the first step, same image)
==============  ==========  =========  =========

Measured on the CPU. Small net (largest over methods), float64 / float16 / bfloat16: CAMs 1e-6 /
1.2e-2 / 1.7e-2, activations 4e-7 / 7e-4 / 5e-3, occlusion 4e-8 / 3e-4 / 1.6e-3, feature
visualisation 4e-7 / 3e-4 / 3.8e-2. Default model in bfloat16: CAMs 2.3-3.3 %, occlusion 0.016
abs; in float16 CAMs 0.3 % (not in the tests: float16 convolutions on a CPU are slow).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tests.test_anymodel import small_net  # the same fixed-seed CNN (batch norm with non-trivial statistics)
from torch import nn

import convlens
from convlens import Classifier, activations, feature_visualization, grad_cam, occlusion

CAMS = ("gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "eigencam")
TOL = {torch.float64: 1e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}
ACT_TOL = {torch.float64: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
OCC_TOL = {torch.float64: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert a.dtype == torch.float32 and ref.dtype == torch.float32
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_small_net_every_technique_in_another_dtype(dtype, device):
    if dtype == torch.float16 and device == "cpu" and not _cpu_half_conv():
        pytest.skip("this torch build has no float16 convolution on the CPU")
    net32 = small_net().to(device)
    net = copy.deepcopy(net32).to(dtype)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32, device=device)
    c32 = Classifier(net32, mean=(0.1, 0.2, 0.3), std=(0.9, 1.0, 1.1), size=None)
    c = Classifier(net, mean=(0.1, 0.2, 0.3), std=(0.9, 1.0, 1.1), size=None)
    assert c.batch(x).dtype == dtype and c.batch(x).device.type == device
    a32 = activations(c32, x, ["3", "7"]).maps
    a = activations(c, x, ["3", "7"]).maps
    for k in a32:
        assert _rel(a[k], a32[k]) <= ACT_TOL[dtype], k
    for method in CAMS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r32 = grad_cam(c32, x, target=[1, 3], layer="6", method=method, batch_size=8)
            r = grad_cam(c, x, target=[1, 3], layer="6", method=method, batch_size=8)
        assert r.maps.device.type == device and float(r32.raw.max()) > 0
        assert _rel(r.raw, r32.raw) <= TOL[dtype], (method, _rel(r.raw, r32.raw))
        assert _rel(r.maps, r32.maps) <= TOL[dtype], method
    for fast in (True, False):
        o32 = occlusion(c32, x, patch=16, stride=8, target=2, fast=fast, score="logit", baseline=3.0)
        o = occlusion(c, x, patch=16, stride=8, target=2, fast=fast, score="logit", baseline=3.0)
        assert float(o32.maps.abs().max()) > 1e-3  # not a comparison of zeros
        # a drop is a difference of two logits, each rounded to the model's precision: the
        # tolerance is relative to the logits, not to the (much smaller) drops
        err = float((o.maps - o32.maps).abs().max()) / float(c32.logits(x).abs().max())
        # on CUDA the float32 reference itself runs its convolutions in TF32 (cuDNN's default):
        # 3.6e-5 measured on an H200 against the float64 model
        tf32 = device == "cuda" and torch.backends.cudnn.allow_tf32
        assert err <= max(OCC_TOL[dtype], 1e-3 if tf32 else 0.0), (fast, err)
    kw = dict(steps=3, size=32, seed=1)
    f32 = feature_visualization(c32, "6", [0, 5], **kw)
    f = feature_visualization(c, "6", [0, 5], **kw)
    assert f.images.dtype == torch.float32 and f.inputs.dtype == torch.float32
    # step 0 sees the same float32 image in both runs: the objective differs by precision only
    assert float(((f.history[0] - f32.history[0]).abs() / f32.history[0].abs()).max()) <= TOL[dtype]
    # the reported objective is the float32 model's on the final (cast) inputs, within the tolerance
    again = activations(c32, f.inputs.to(dtype).float(), ["6"]).maps["6"][[0, 1], [0, 5]].mean(dim=(1, 2))
    assert float(((f.objective - again).abs() / again.abs()).max()) <= TOL[dtype]


def _cpu_half_conv() -> bool:
    try:
        nn.Conv2d(1, 1, 1).half()(torch.zeros(1, 1, 2, 2, dtype=torch.float16))
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="module")
def bf16(clf: convlens.Classifier) -> convlens.Classifier:
    """The default model converted to bfloat16 (a copy: the session fixture stays float32)."""
    c = copy.copy(clf)
    c.model = copy.deepcopy(clf.model).to(torch.bfloat16)
    return c


def test_default_model_in_bfloat16(clf, bf16, sample_x):
    x = bf16.preprocess(convlens.sample_image())
    assert x.dtype == torch.bfloat16
    assert bf16.predict(x)[0][0].index == clf.predict(sample_x)[0][0].index == 285
    for method in ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EigenCAM: one map per image, whatever top= says
            r32 = grad_cam(clf, sample_x, top=2, method=method)
            r = grad_cam(bf16, x, top=2, method=method)
        assert r.raw.dtype == torch.float32 and r.target == r32.target
        assert _rel(r.raw, r32.raw) <= TOL[torch.bfloat16], (method, _rel(r.raw, r32.raw))
    o32 = occlusion(clf, sample_x, patch=56, stride=56)
    o = occlusion(bf16, x, patch=56, stride=56)
    assert float((o.maps - o32.maps).abs().max()) <= 0.05  # probability, absolute
    assert float(o32.maps.abs().max()) > 0.03


def test_autocast_equals_float32(clf, sample_x):
    r32 = grad_cam(clf, sample_x, target=285)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = grad_cam(clf, sample_x, target=285)
        acts = activations(clf, sample_x, ["blocks.4"]).maps["blocks.4"]
    assert r.raw.dtype == torch.float32 and acts.dtype == torch.float32
    assert _rel(r.raw, r32.raw) <= TOL[torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in clf.model.parameters())


def test_every_technique_inside_inference_mode():
    net = small_net()
    x = torch.randn(1, 3, 32, 32)
    ref_cam = grad_cam(net, x, target=1, layer="6").raw
    ref_fv = feature_visualization(net, "6", [2], steps=3, size=32, seed=4)
    with torch.inference_mode():
        xi = x.clone()
        cam = grad_cam(net, xi, target=1, layer="6").raw
        fv = feature_visualization(net, "6", [2], steps=3, size=32, seed=4)
        acts = activations(net, xi, ["6"]).maps["6"]
        occ = occlusion(net, xi, patch=16, stride=16, target=1).maps
        assert torch.is_inference_mode_enabled()
    torch.testing.assert_close(cam, ref_cam)
    torch.testing.assert_close(fv.images, ref_fv.images)
    torch.testing.assert_close(fv.objective, ref_fv.objective)
    assert acts.shape == (1, 16, 16, 16) and float(occ.abs().max()) > 0
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
