"""Grad-CAM on one 224 px image: convlens vs the floor (bare forward), the spec's own grad_cam
(full backward with module backward hooks), captum, pytorch-grad-cam and torch-cam.

``saved MB``: activations autograd keeps for the backward, weights not counted (deterministic; the CPU peak-RSS column
stays near 0 after warm-up because freed memory is reused).

Targets (issue 3): convlens Grad-CAM <= 1.15x a bare forward, its top-5 classes <= 1.4x, and
>= 2.5x faster than pytorch-grad-cam's GradCAM (``pgc / this``; ``captum / this``, ``torch-cam / this``
likewise: the peer's seconds / ours, each at its best thread setting). Correctness columns compare each map with ours:
``rel diff`` = max |theirs - ours| / max |ours| at layer resolution, ``corr`` = Pearson
correlation of the maps (for peers that only return normalised / resized maps).

Run alone: ``python -m benchmarks --only cam``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import common
from .common import Row, table_rows

log = logging.getLogger(__name__)


# -- the spec's implementation, written from the tutorial (technique 3) ------------------------
def spec_grad_cam(model: nn.Module, img_tensor: Tensor, target_class: int, target_layer: nn.Module) -> np.ndarray:
    """The tutorial's grad_cam: forward + full backward hooks, zero_grad, full .backward().
    It needs the model's in-place ReLUs turned off (done once on its own copy of the model)."""
    fmaps, grads = {}, {}

    def fwd_hook(m, inp, out):
        fmaps["A"] = out

    def bwd_hook(m, grad_in, grad_out):
        grads["dA"] = grad_out[0]

    h1 = target_layer.register_forward_hook(fwd_hook)
    h2 = target_layer.register_full_backward_hook(bwd_hook)
    out = model(img_tensor)
    model.zero_grad()
    out[0, target_class].backward()
    h1.remove()
    h2.remove()
    alpha = grads["dA"][0].mean(dim=(1, 2), keepdim=True)
    cam = torch.relu((alpha * fmaps["A"][0]).sum(0))
    cam = F.interpolate(cam[None, None], size=img_tensor.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam.squeeze().detach().cpu().numpy()
    cam -= cam.min()
    if cam.max() > 0:
        cam /= cam.max()
    return cam


def _spec_model(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(getattr(mod, "inplace", None), bool):
            mod.inplace = False  # as the tutorial does: full backward hooks fail on in-place ops
    return m


# -- helpers -----------------------------------------------------------------------------------
def _host(a: Tensor | np.ndarray) -> Tensor:
    """A float32 CPU tensor of a peer's or our map (a CUDA tensor is copied to the host)."""
    return a.detach().float().cpu() if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a, dtype=np.float32))


def _rel(theirs: Tensor | np.ndarray, ours: Tensor) -> float:
    o = _host(ours)
    t = _host(theirs).reshape(o.shape)
    return float((t - o).abs().max() / o.abs().max().clamp(min=1e-12))


def _corr(theirs: Tensor | np.ndarray, ours: Tensor) -> float:
    t = _host(theirs).flatten()
    o = ours.detach().flatten().float().cpu()
    if t.numel() != o.numel():
        side = int(round(t.numel() ** 0.5))
        t = F.interpolate(t.view(1, 1, side, side), size=ours.shape[-2:], mode="bilinear")[0, 0].flatten()
    return float(torch.corrcoef(torch.stack([t, o]))[0, 1])


def saved_for_backward_mb(fn: Callable[[], Any], models: list[nn.Module] = ()) -> float:
    """MB of tensors autograd saves for the backward during one call of ``fn``, weights of
    ``models`` left out: a deterministic measure of the activation graph a method builds (CPU
    RSS peaks are hidden by the allocator's reuse)."""
    total = [0]
    seen = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:  # parameters and shared storages count once
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / 2**20


def _repeats(forward: Callable[[], Any], quick: bool) -> int:
    """More rounds for fast models: on a shared machine a median of 5 sub-second runs is noise."""
    import time

    t0 = time.perf_counter()
    forward()
    per = max(time.perf_counter() - t0, 1e-3)
    n = int(round((1.0 if quick else 3.0) / per))
    return max(5, min(n, 15 if quick else 30))


def _models(quick: bool, device: str) -> list[tuple[str, nn.Module, Tensor]]:
    import torchvision

    import convlens

    torch.manual_seed(0)
    r50 = torchvision.models.resnet50().eval().to(device)
    clf = convlens.load_model(device=device)
    x_sample = clf.preprocess(convlens.sample_image())
    return [
        ("resnet50 (random init)", r50, torch.randn(1, 3, 224, 224, device=device)),
        ("efficientnet_lite0 (default)", clf.model, x_sample),
    ]


def cam_table(name: str, model: nn.Module, x: Tensor, *, quick: bool, device: str) -> list[Row]:
    import convlens
    from convlens.layers import default_cam_layer

    layer_name = default_cam_layer(model, x)
    layer = dict(model.named_modules())[layer_name]
    with torch.no_grad():
        target = int(model(x).argmax(1))
        top5 = model(x).topk(5, dim=1).indices[0].tolist()
    ours = convlens.grad_cam(model, x, layer=layer_name)  # warm the layer memo too
    ours_raw, ours_map = ours.raw[0], ours.maps[0]

    def forward() -> Any:
        with torch.no_grad():
            return model(x)

    cases: dict[str, Callable[[], Any]] = {
        "bare forward (floor)": forward,
        OURS: lambda: convlens.grad_cam(model, x, target=target),
        OURS_TOP5: lambda: convlens.grad_cam(model, x, top=5),
    }
    extra: dict[str, dict[str, Any]] = {}

    spec_model = _spec_model(model)
    spec_layer = dict(spec_model.named_modules())[layer_name]
    all_models = [model, spec_model]  # whose weights the saved-MB column leaves out
    spec_map = spec_grad_cam(spec_model, x, target, spec_layer)
    cases["spec grad_cam (full backward, backward hooks)"] = lambda: spec_grad_cam(spec_model, x, target, spec_layer)
    extra["spec grad_cam (full backward, backward hooks)"] = {"corr": _corr(spec_map, ours_map)}

    try:
        from captum.attr import LayerAttribution, LayerGradCam

        lgc = LayerGradCam(model, layer)

        def captum_cam() -> Tensor:
            a = lgc.attribute(x, target=target, relu_attributions=True)
            return LayerAttribution.interpolate(a, tuple(x.shape[-2:]), "bilinear")

        ref = lgc.attribute(x, target=target, relu_attributions=True).detach()
        cases["captum LayerGradCam"] = captum_cam
        extra["captum LayerGradCam"] = {"rel diff": _rel(ref, ours_raw), "corr": _corr(ref, ours_raw)}
    except ImportError:
        log.warning("captum not installed: row skipped")

    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc_model = copy.deepcopy(model)  # it registers hooks for its lifetime and sets .grad
        all_models.append(pgc_model)
        pgc = GradCAM(pgc_model, [dict(pgc_model.named_modules())[layer_name]])
        t1 = [ClassifierOutputTarget(target)]
        x5 = x.expand(5, -1, -1, -1)
        t5 = [ClassifierOutputTarget(c) for c in top5]
        pgc_map = pgc(x, targets=t1)[0]
        cases["pytorch-grad-cam GradCAM"] = lambda: pgc(x, targets=t1)
        cases[PGC_TOP5] = lambda: pgc(x5, targets=t5)
        extra["pytorch-grad-cam GradCAM"] = {"corr": _corr(pgc_map, ours_map)}
    except ImportError:
        log.warning("pytorch-grad-cam not installed: row skipped")

    try:
        from torchcam.methods import GradCAM as TCGradCAM

        tc_model = copy.deepcopy(model)
        all_models.append(tc_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tc = TCGradCAM(tc_model, layer_name, input_shape=tuple(x.shape[1:]))

        def torchcam_cam() -> Any:
            out = tc_model(x)
            return tc(target, out, normalized=False)

        tc_raw = torchcam_cam()[0][0]
        cases["torch-cam GradCAM"] = torchcam_cam
        extra["torch-cam GradCAM"] = {"rel diff": _rel(tc_raw, ours_raw), "corr": _corr(tc_raw, ours_raw)}
    except ImportError:
        log.warning("torch-cam not installed: row skipped")

    if common.PRIMARY:  # correctness and memory: once, not per thread setting
        extra = {c: {"saved MB": saved_for_backward_mb(fn, all_models), **extra.get(c, {})} for c, fn in cases.items()}
    else:
        extra = {}
    rows = table_rows(
        cases, model=name, batch=x.shape[0], device=device, repeats=_repeats(forward, quick),
        floor="bare forward (floor)", extra=extra,
    )
    for r in rows:  # declared here, filled by the harness between best settings
        r.ratios = RATIOS.get(r.method, {})
    return rows


OURS, OURS_TOP5 = "convlens grad_cam", "convlens grad_cam top-5 (one pass)"
PGC_TOP5 = "pytorch-grad-cam GradCAM top-5 (batch of 5)"
RATIOS = {
    OURS: {"pgc / this": "pytorch-grad-cam GradCAM", "captum / this": "captum LayerGradCam",
           "torch-cam / this": "torch-cam GradCAM"},
    OURS_TOP5: {"pgc / this": PGC_TOP5},
}


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """One table per model: Grad-CAM on one image, layer = the automatic default
    (``layer4`` for ResNet-50, ``bn2`` for EfficientNet-Lite0)."""
    out = []
    for name, model, x in _models(quick, device):
        rows = cam_table(name, model, x, quick=quick, device=device)
        out.append((f"Grad-CAM, one {x.shape[-1]} px image, {name}", rows))
    return out
