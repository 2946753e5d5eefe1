"""Exact occlusion on real architectures: the fast (crop) path against one full forward of the
unmodified model per window, computed here independently in float64.

Float32 rounding is not zero, and the crop path sums in another order (other crop sizes,
channels-last memory, batch norm folded into the convolutions), so "equal to float rounding" is
asserted against the float64 truth: the fast path's error is of the same order as the float32
plain path's own error, never more than a few times it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from convlens._inference import check_tolerance
from convlens.hooks import count_hooks
from convlens.methods import occlusion as occlusion_module
from convlens.methods.occlusion import CROP_DEVICES, occlusion, window_starts

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread per module

PATCH, STRIDE, SIZE, TARGET = 24, 20, 96, 3


def _timm_lite0() -> nn.Module:
    """The default model's architecture (timm's tf_efficientnet_lite0: TF "same" padding decided
    at run time, batch norm + activation modules), random weights, no download."""
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)


def _torchvision(arch: str):
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)(num_classes=10)

    return build


# (builder, crops expected): SE blocks (efficientnet_b0, mobilenet_v3_small) stop the crops at the
# first global pool, DenseNet's concatenations and ConvNeXt's LayerNorm at the stem: the plain path
ARCHS = {
    "resnet18": (_torchvision("resnet18"), True),
    "resnet50": (_torchvision("resnet50"), True),
    "vgg11": (_torchvision("vgg11"), True),
    "tf_efficientnet_lite0": (_timm_lite0, True),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), False),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), False),
    "densenet121": (_torchvision("densenet121"), False),
    "convnext_tiny": (_torchvision("convnext_tiny"), False),
}


def _calibrated(build) -> nn.Module:
    """Random weights with batch-norm statistics from a few images, as training would set them
    (without them a random ResNet-50's activations grow to ~1e4)."""
    torch.manual_seed(0)
    model = build()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)))
    return model.eval()


def _truth(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(rows, cols) logit drops, one float64 forward of a copy of the model per window."""
    model64 = copy.deepcopy(model).double()
    x64 = x.double()
    starts = window_starts(SIZE, PATCH, STRIDE)
    with torch.no_grad():
        clean = model64(x64)[0, TARGET]
        occluded = x64.repeat(len(starts) ** 2, 1, 1, 1)
        for k, (y, xx) in enumerate((y, xx) for y in starts for xx in starts):
            occluded[k, :, y : y + PATCH, xx : xx + PATCH] = 0
        drops = clean - model64(occluded)[:, TARGET]
    return drops.view(len(starts), len(starts))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_mode_equals_full_forwards(arch, device):
    build, crops = ARCHS[arch]
    model = _calibrated(build).to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6)).to(device)
    truth = _truth(model, x).cpu()
    plain = occlusion(model, x, target=TARGET, patch=PATCH, stride=STRIDE, score="logit", fast=False)
    fast = occlusion(model, x, target=TARGET, patch=PATCH, stride=STRIDE, score="logit")
    assert fast.settings["mode"] == "exact" and fast.raw.shape == (1, 5, 5)
    scale = float(truth.abs().max())
    assert scale > 1e-3  # drops worth comparing
    err_plain = float((plain.raw[0].cpu().double() - truth).abs().max())
    err_fast = float((fast.raw[0].cpu().double() - truth).abs().max())
    # a few times the float32 full forward's own error, or the device's rounding of the largest drop
    floor = 0.1 * check_tolerance(x.device, x.dtype) * scale  # CPU: 1e-6 x scale; TF32 on a GPU: 2e-3
    assert err_fast <= max(4 * err_plain, floor), (err_fast, err_plain, scale)
    if crops and x.device.type in CROP_DEVICES:
        assert fast.settings["path"] == "crop", fast.settings["fallback"]
        assert fast.settings["work"] < 0.9
    assert count_hooks(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_device_without_crops_runs_full_batches_through_the_private_copy(monkeypatch, device):
    """Where crops are not tried (a GPU), exact and approximate requests alike run full forwards
    through the checked private copy, the windows in batches sized by memory: the map is exact,
    says so, and says why; nothing of the user's model changes."""
    monkeypatch.setattr(occlusion_module, "CROP_DEVICES", ())
    model = _calibrated(ARCHS["resnet18"][0]).to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6)).to(device)
    truth = _truth(model, x).cpu()
    plain = occlusion(model, x, target=TARGET, patch=PATCH, stride=STRIDE, score="logit", fast=False)
    err_plain = float((plain.raw[0].cpu().double() - truth).abs().max())
    floor = 0.1 * check_tolerance(x.device, x.dtype) * float(truth.abs().max())
    for mode in ("exact", "approximate"):
        got = occlusion(model, x, target=TARGET, patch=PATCH, stride=STRIDE, score="logit", mode=mode)
        assert got.settings["path"] == "plain" and got.settings["mode"] == "exact"
        assert got.settings["fallback"] == f"on {x.device.type} full batches of windows are faster than crops" + (
            "; the map is exact" if mode == "approximate" else "")
        assert got.settings["work"] == 1.0
        if x.device.type == "cpu":  # the private copy's batch (on CUDA half the free memory decides)
            assert got.settings["batch_size"] == occlusion_module.COPY_BATCH
        err = float((got.raw[0].cpu().double() - truth).abs().max())
        assert err <= max(4 * err_plain, floor), (mode, err, err_plain)
    assert count_hooks(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Unsafe(nn.Module):
    """Two convolution / batch-norm pairs that must not be folded: a ReLU module between the first
    pair, an in-place ReLU in the forward code between the second (the batch norm reads the
    convolution's output tensor, changed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu, self.bn1 = nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv2(self.bn1(self.relu(self.conv1(x))))
        y.relu_()
        return self.bn3(self.conv3(self.bn2(y)))


def test_batch_norm_folding_only_where_it_is_the_same_function():
    from convlens._inference import fold_batch_norms

    torch.manual_seed(0)
    model = _Unsafe().eval()
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    folded = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    fold_batch_norms(folded, x[:1])
    assert isinstance(folded.bn1, nn.BatchNorm2d) and isinstance(folded.bn2, nn.BatchNorm2d)
    assert isinstance(folded.bn3, nn.Identity) and folded.conv3.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-6, rtol=1e-6)


def test_fast_module_does_not_import_its_caller():
    """The crop engine receives the reference evaluator as an argument: no import circle."""
    import ast
    import inspect

    from convlens.methods import _occlusion_fast

    tree = ast.parse(inspect.getsource(_occlusion_fast))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m and m.endswith("occlusion")}, imported


def test_windows_of_several_images_share_a_batch(device):
    """As on a GPU: one batch holds windows of several images, in any order; each job's logits
    equal one full forward of its own occluded image."""
    from convlens.methods._occlusion_fast import build_fast_evaluator
    from convlens.methods.occlusion import _PlainEvaluator

    model = _calibrated(ARCHS["resnet18"][0]).to(device)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8)).to(device)
    base = torch.zeros_like(x)
    starts = window_starts(SIZE, PATCH, STRIDE)
    plain = _PlainEvaluator(model, (starts, starts), (PATCH, PATCH))
    fast = build_fast_evaluator(model, x, base, (PATCH, PATCH), starts, starts, reference=plain)
    assert fast is not None
    jobs = [(2, 4, 0), (0, 0, 0), (1, 2, 3), (2, 1, 1), (0, 4, 4), (1, 0, 4)]
    try:
        with torch.no_grad():
            got, want = fast(x, base, jobs), plain(x, base, jobs)
    finally:
        fast.close()
    # the device's rounding (TF32 on a GPU), far below what a job read from another image would give
    tol = 2 * check_tolerance(x.device, x.dtype) * float(want.abs().max())
    assert float((want[:, None] - want[None]).abs().amax(-1).fill_diagonal_(1e9).min()) > 10 * tol
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert count_hooks(model) == 0


def test_border_windows_run_on_shorter_crops(device):
    """A batch's crops are as long as its own windows need: a batch of corner windows (whose
    regions the border cuts) runs on shorter crops, and records less work, than one of central
    windows, and both equal full forwards of the model; :meth:`order` only reorders the jobs."""
    from convlens.methods._occlusion_fast import build_fast_evaluator
    from convlens.methods.occlusion import _PlainEvaluator

    model = _calibrated(ARCHS["resnet18"][0]).to(device)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)).to(device)
    base = torch.zeros_like(x)
    starts = window_starts(SIZE, 16, 8)  # 11 x 11 windows
    plain = _PlainEvaluator(model, (starts, starts), (16, 16))
    fast = build_fast_evaluator(model, x, base, (16, 16), starts, starts, reference=plain)
    assert fast is not None
    n = len(starts)
    corners = [(0, 0, 0), (0, 0, n - 1), (0, n - 1, 0), (0, n - 1, n - 1)]
    centre = [(0, n // 2, n // 2), (0, n // 2 - 1, n // 2), (0, n // 2, n // 2 - 1), (0, n // 2 - 1, n // 2 - 1)]
    tol = 2 * check_tolerance(x.device, x.dtype)
    lengths, work = [], []
    try:
        for jobs in (corners, centre):
            before = fast.work
            with torch.no_grad():
                got, want = fast(x, base, jobs), plain(x, base, jobs)
            torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()))
            work.append(fast.work - before)
            lengths.append([c for stage in fast._crops for c, _ in stage])
        everything = [(0, i, j) for i in range(n) for j in range(n)]
        assert sorted(fast.order(everything, 16)) == everything
    finally:
        fast.close()
    longest = [st.crop for stage in fast.stages for st in stage]
    assert all(c <= m for c, m in zip(lengths[0], longest)) and lengths[0] != longest  # shorter somewhere
    assert all(a <= b for a, b in zip(lengths[0], lengths[1])) and work[0] < work[1]
    assert work[1] <= len(centre) * fast.estimate * (1 + 1e-9)  # the plan's bound: every crop at its longest
    assert count_hooks(model) == 0


class _Flat(nn.Module):
    """Convolutions, then a ``.view`` of the activation, which channels-last memory cannot give:
    the crops run in contiguous memory instead, and still pay."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1))
        self.head = nn.Linear(4 * 24 * 24, 10)

    def forward(self, x):
        y = self.features(x)
        return self.head(y.view(y.shape[0], -1))


def test_crops_in_contiguous_memory_when_the_model_needs_it(caplog):
    torch.manual_seed(0)
    caplog.set_level("INFO", logger="convlens")
    model = _Flat().eval()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(9))
    plain = occlusion(model, x, target=1, patch=8, stride=8, score="logit", fast=False)
    fast = occlusion(model, x, target=1, patch=8, stride=8, score="logit")
    assert fast.settings["path"] == "crop", fast.settings["fallback"]
    assert "private copy: contiguous memory (RuntimeError" in caplog.text
    torch.testing.assert_close(fast.raw, plain.raw, atol=1e-5 * float(plain.raw.abs().max()), rtol=1e-5)
