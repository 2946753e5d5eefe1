"""The Grad-CAM family: one core (capture the layer, differentiate the target scores down to it),
and a short weighting rule per method.

With ``A`` the layer's output (N, C, h, w) and ``G = d score / d A`` (gradients only down to
that layer, through ``torch.autograd.grad`` on the captured tensor), every map is
``relu(sum_c w_c * A_c)`` for a method's channel weights ``w``, or a per-position rule:

- ``gradcam``   w_c = mean_ij G_cij                                  (Selvaraju et al. 2017)
- ``gradcam++`` w_c = sum_ij relu(G_cij) a_cij,
                a_cij = G^2 / (2 G^2 + sum_ij(A_c) G^3 + eps)        (Chattopadhay et al. 2018)
- ``xgradcam``  w_c = sum_ij G_cij A_cij / (sum_ij A_cij + eps)      (Fu et al. 2020)
- ``layercam``  map = relu(sum_c relu(G_c) * A_c)                   (Jiang et al. 2021)
- ``scorecam``  w = softmax_c(score(x * norm(up(A_c))))             (Wang et al. 2020), no gradient
- ``eigencam``  map = relu(projection of A on its first principal component), no gradient

The eps values and Score-CAM's softmax over channels follow pytorch-grad-cam, so the maps agree.
The rules live in :mod:`convlens.methods.registry`, beside those :func:`convlens.register_cam` adds.

Where methods coincide, and what they do not tell apart:

- At a layer followed only by global average pooling and a linear layer (ResNet's ``layer4``,
  the default model's automatic layer ``bn2``), ``G_cij = W_kc / hw`` is the same at every
  position, so XGrad-CAM's weight ``sum_ij G A / sum_ij A`` equals Grad-CAM's ``mean_ij G``: the
  two maps are identical there (they differ at inner layers).
- EigenCAM never looks at the class: it gives **one map per image**. With ``top=k`` or several
  targets per image it still returns one row per image (for the image's first requested class,
  the top-1 by default, recorded in ``target``; a warning says so); ``settings["class_independent"]``
  is then True.
- Grad-CAM++, LayerCAM and EigenCAM at the last layer of the default model are not
  class-discriminative in practice: their maps for different classes of one photo are nearly the
  same (Grad-CAM++ and LayerCAM keep only positive gradients, and at the last layer every class's
  positive gradient covers the same strongly active positions). Use Grad-CAM, XGrad-CAM or
  Score-CAM to compare classes.
- Score-CAM upsamples each activation channel to the input with ``align_corners=False`` (as the
  maps themselves are upsampled): the h x w cells then sit at their receptive-field centres
  ``(i + 0.5) * stride``. pytorch-grad-cam uses ``UpsamplingBilinear2d`` (``align_corners=True``),
  which stretches the grid so the corner cells' centres land on the image corners (a shift of up
  to half a cell); the maps agree exactly only where no upsampling happens. Each mask is min-max
  scaled to [0, 1] per channel, the masked inputs' target scores (logits, or the callable's
  value) are softmaxed over the channels, and the forwards are shared by all targets of an image.

Precision: a float16/bfloat16/float64 model, or autocast, runs in its own dtype; the weighting
rules, the SVD and the softmax are computed in float32 (float64 for the SVD on CPU/CUDA).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._batching import default_batch
from .._compat import MODEL_AND_IMAGES, renamed
from ..checks import choose, require_finite, warn_constant
from ..hooks import LayerCapture, model_guard
from ..layers import (
    LayerSpec,
    cam_layer_reason,
    default_cam_layer,
    forget,
    missing_layer,
    remembered,
    resolve_layer,
    split_call,
)
from ..layout import LayoutName, Reshape, class_token_model, layout_for
from ..models import Classifier, as_classifier, require_logits
from ..results import Saliency
from ..targets import Region, ResolvedTarget, Target, index_tensor, resolve_target
from .registry import cam_methods, gradient_methods, method_spec

__all__ = ["grad_cam", "cam_from_layer", "CAM_METHODS", "CamMethod"]

#: a built-in method's name; any name :func:`convlens.register_cam` added is accepted too
CamMethod = Literal["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "eigencam"] | str

log = logging.getLogger(__name__)


# -- EigenCAM: no gradient, no class ----------------------------------------------------------
def _eigencam(a: Tensor, g: Tensor | None = None) -> Tensor:
    # rows: positions, columns: channels; centred, then projected on the first right singular
    # vector. Its sign is arbitrary, so it is chosen to agree with the mean activation map.
    # float64 where the device has it (MPS has not), float32 otherwise
    wide = torch.float64 if a.device.type in ("cpu", "cuda") else torch.float32
    flat = a.flatten(2).transpose(1, 2).to(wide)  # (N, hw, C)
    flat = flat - flat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ vh[:, 0, :, None]  # (N, hw, 1)
    mean_map = a.flatten(2).mean(1).to(wide)  # (N, hw)
    sign = torch.sign((proj[..., 0] * (mean_map - mean_map.mean(1, keepdim=True))).sum(1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (proj[..., 0] * sign[:, None]).float().view(a.shape[0], *a.shape[2:])


#: the built-in CAM methods; :func:`convlens.register_cam` adds others (all: ``cam_methods()``)
CAM_METHODS = cam_methods()


def cam_from_layer(method: str, a: Tensor, g: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The map of a gradient method or EigenCAM from a layer's output ``a`` (N, C, h, w) and the
    target's gradient ``g = d score / d a`` (same shape; ``None`` for ``eigencam``).

    Returns ``(raw, maps)``, float32: ``raw = relu(rule(a, g))`` at the layer's resolution
    (NaN -> 0, the rule computed in float32) and ``maps`` that upsampled bilinearly to ``size``,
    exactly what :func:`grad_cam` returns for the same ``a`` and ``g``; a caller that keeps ``a``
    and ``g`` (the local explorer caches them per image and class) gets another method's map
    without any model call.

    Args:
        method: a gradient method (``"gradcam"``, ``"gradcam++"``, ``"xgradcam"``, ``"layercam"``
            or one :func:`convlens.register_cam` added) or ``"eigencam"``.
        a: (N, C, h, w) layer output, any device and floating dtype.
        g: (N, C, h, w) gradient on ``a``'s device, or None for ``eigencam``.
        size: the input's ``(H, W)``.
    Returns:
        ``(raw, maps)``: (N, h, w) and (N, H, W) float32 on ``a``'s device.
    Raises:
        ValueError: another method (Score-CAM needs the model), or a gradient method without ``g``.

    Example::

        raw, maps = cam_from_layer("gradcam++", a, g, (224, 224))
    """
    if method == "eigencam":
        raw = _eigencam(a)
    elif method in gradient_methods():
        if g is None:
            raise ValueError(f"{method} needs the gradient of the target at the layer")
        raw = _weighted(method, a.float(), g.float())
    else:
        raise ValueError(f"cam_from_layer computes {', '.join((*gradient_methods(), 'eigencam'))}, not {method!r}")
    return _relu_upsampled(raw, size)


def _weighted(method: str, a: Tensor, g: Tensor) -> Tensor:
    """``sum_c w_c * A_c`` with the method's weights rule ``w = rule(A, G)``: (N, C), (N, C, 1, 1)
    or (N, C, h, w)."""
    w = method_spec(method).weights(a, g)  # type: ignore[misc]
    if isinstance(w, Tensor) and w.dim() == 2:
        w = w[:, :, None, None]
    if not isinstance(w, Tensor) or w.dim() != 4 or tuple(w.shape[:2]) != tuple(a.shape[:2]) or any(
        s not in (1, t) for s, t in zip(w.shape[2:], a.shape[2:], strict=True)
    ):
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{method}'s weights must be (N, C) or (N, C, h, w) = {tuple(a.shape)}, got {got}")
    return (w.to(a.dtype) * a).sum(1)


def _relu_upsampled(raw: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Every method's last step: ``relu`` (NaN -> 0) in float32 at the layer's resolution, and that
    map upsampled bilinearly to ``size``."""
    raw = torch.nan_to_num(raw.float()).clamp(min=0)
    return raw, F.interpolate(raw[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


# -- targets: one row per (image, target) ---------------------------------------------------
@dataclass(frozen=True)
class _Rows:
    image: list[int]  # input image of each row
    index: list[int]  # class index (-1: callable)
    labels: list[str]
    rounds: list[list[int]]  # row numbers differentiated together (at most one per image)
    custom: ResolvedTarget | None = None  # a callable or Region target: one row per image
    top1: Tensor | None = None  # the top-1 classes on the device; index and labels are read with the checks


def _rows(clf: Classifier, target: Target, top: int | None, out: Tensor, defer: bool = False) -> _Rows:
    n = out.shape[0]
    if defer and target is None and top is None:
        return _Rows(list(range(n)), [], [], [list(range(n))], top1=out.detach().argmax(1))
    if top is not None:
        if target is not None:
            raise ValueError("give either target= or top=, not both")
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"top must be a positive int, not {top!r}")
        k = min(top, out.shape[1])
        per_image = out.detach().topk(k, dim=1).indices.tolist()
    elif isinstance(target, Sequence) and not isinstance(target, str) and any(
        isinstance(t, Sequence) and not isinstance(t, str) for t in target
    ):
        if len(target) != n:
            raise ValueError(f"{len(target)} target lists for {n} images; give one list per image")
        per_image = []
        for t in target:
            items = [t] if isinstance(t, (int, str)) else list(t)
            if not items:
                raise ValueError("an empty target list; give at least one class per image")
            per_image.append(resolve_target(clf, items, len(items), logits=out[:1].expand(len(items), -1)).indices)
    else:
        rt = resolve_target(clf, target, n, logits=out.detach())
        return _Rows(list(range(n)), rt.indices, rt.labels, [list(range(n))], rt if rt.scored else None)
    image, index, rounds = [], [], []
    for i, classes in enumerate(per_image):
        for j, c in enumerate(classes):
            if j == len(rounds):
                rounds.append([])
            rounds[j].append(len(image))
            image.append(i)
            index.append(int(c))
    return _Rows(image, index, [clf.label(c) for c in index], rounds)


def _gradients(out: Tensor, a: Tensor, rows: _Rows) -> Tensor:
    """d score / d A for every row, (R, C, h, w): one backward per round (a round holds at most
    one row per image, so a sum of the images' scores separates them)."""
    grads = a.new_empty((len(rows.image), *a.shape[1:]))
    with torch.enable_grad():  # the caller may be inside no_grad: scoring must be recorded
        for r, members in enumerate(rows.rounds):
            last = r == len(rows.rounds) - 1
            if rows.custom is not None:
                (g,) = torch.autograd.grad(rows.custom.score(out).sum(), a, retain_graph=not last)
                grads[members] = g
                continue
            imgs = [rows.image[m] for m in members]
            if rows.top1 is not None:
                seed = torch.zeros_like(out).scatter_(1, rows.top1[:, None], 1.0)
            else:
                seed = _seed(out, imgs, [rows.index[m] for m in members])
            (g,) = torch.autograd.grad(out, a, grad_outputs=seed, retain_graph=not last)
            if len(rows.rounds) == 1 and members == imgs == list(range(out.shape[0])):  # one row per image: no gather
                return g
            grads[index_tensor(members, g.device)] = g[index_tensor(imgs, g.device)]
    return grads


def _seed(out: Tensor, images: list[int], classes: list[int]) -> Tensor:
    """d score / d out for one round: 1 at ``(images[k], classes[k])``. One class for every image
    (the usual case) needs no index tensor: on a GPU a tensor made from a Python list is a copy
    from the host that waits for the device."""
    seed = torch.zeros_like(out)
    if images == list(range(out.shape[0])) and len(set(classes)) == 1:
        seed[:, classes[0]] = 1.0
    else:
        seed[index_tensor(images, out.device), index_tensor(classes, out.device)] = 1.0
    return seed


def _rows_of(t: Tensor, image: list[int]) -> Tensor:
    """``t[image]``, without a gather (and the index tensor a GPU has to wait for) when each
    image has one row in order."""
    return t if image == list(range(t.shape[0])) else t[index_tensor(image, t.device)]


def _deferred_checks(out: Tensor, g: Tensor | None, raw: Tensor, name: str,
                     top1: Tensor | None) -> tuple[bool, bool, list[int]]:
    """The call's checks, read from the device in one transfer once all its work is queued, with
    the top-1 classes when they were left there (a Grad-CAM call waits for the device nowhere
    else): a non-finite output or gradient raises :class:`NonFiniteError` (the output's first).
    Returns whether the gradient is zero everywhere for some row, whether some map is constant
    (the caller warns), and the top-1 classes (empty without ``top1``)."""
    flat = raw.detach().flatten(1)
    flags = [torch.isfinite(out.detach()).all().view(1), flat.amax(1) - flat.amin(1) <= 0]
    if g is not None:
        flags += [torch.isfinite(g).all().view(1), g.flatten(1).abs().amax(1) == 0]
    read = torch.cat([f.long() for f in flags] + ([] if top1 is None else [top1.long()])).tolist()
    n = flat.shape[0]
    ok_out, constant, read = read[0], read[1 : 1 + n], read[1 + n :]
    if not ok_out:
        require_finite(out, "the model's output")
    if g is not None and not read[0]:
        require_finite(g, f"the gradient at {name}")
    zero, classes = (read[1 : 1 + n], read[1 + n :]) if g is not None else ([], read)
    return any(zero), any(constant), classes


# -- Score-CAM ------------------------------------------------------------------------------
def _scorecam_weights(
    clf: Classifier, x: Tensor, a: Tensor, rows: _Rows, batch_size: int | None, memory_mb: float,
    callback: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, int]:
    """Channel weights per row, (R, C) float32: softmax over channels of the target's score on
    ``x`` masked by each channel's upsampled activation, scaled to [0, 1]. Masks are built and run
    per batch, once per image: the masked outputs score every target of that image."""
    c = a.shape[1]
    if batch_size is None:
        # within memory_mb: on a CPU a forward without autograd holds a few maps a few times the
        # input's size at once (32 input-sizes per sample is generous for ImageNet CNNs); on a GPU
        # the measured peak of one forward
        batch_size = default_batch(clf.model, x, c, cpu=c, budget=int(memory_mb * 2**20),
                                   bytes_per_item=x[0].numel() * x.element_size() * 32)
    weights = torch.empty((len(rows.image), c), device=a.device, dtype=torch.float32)
    images = sorted(set(rows.image))
    for k, i in enumerate(images):
        members = [r for r in range(len(rows.image)) if rows.image[r] == i]
        cols = index_tensor([rows.index[r] for r in members], a.device)  # once per image: a list index waits
        scores = []
        for s in range(0, c, batch_size):
            # masks are made per batch: all C of them at input size at once can be gigabytes
            up = F.interpolate(a[i : i + 1, s : s + batch_size].float(), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)[0]
            lo = up.flatten(1).min(1).values[:, None, None]
            hi = up.flatten(1).max(1).values[:, None, None]
            masks = ((up - lo) / (hi - lo + 1e-8))[:, None].to(x.dtype)
            o = clf.forward(x[i : i + 1] * masks)
            if rows.custom is not None:  # the masked copies are all image i's
                scores.append(rows.custom.select([i] * o.shape[0]).score(o)[:, None].float())
            else:
                scores.append(require_logits(o)[:, cols].float())
            if callback is not None:
                callback(k * c + min(s + batch_size, c), len(images) * c)
        weights[index_tensor(members, a.device)] = torch.cat(scores).softmax(0).T
    return weights, batch_size


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(split_call(name)[0])
    except AttributeError:
        return False
    return True


def _one_row_per_image(rows: _Rows, method: str) -> _Rows:
    """EigenCAM's rows: the first requested target of each image (its map ignores the class)."""
    first: dict[int, int] = {}
    for r, i in enumerate(rows.image):
        first.setdefault(i, r)
    if len(first) < len(rows.image):
        warnings.warn(
            f"{method} does not depend on the class: one map per image, not one per target",
            UserWarning,
            stacklevel=4,  # past grad_cam and its @renamed wrapper: the caller
        )
    keep = [first[i] for i in sorted(first)]
    return _Rows(
        [rows.image[r] for r in keep], [rows.index[r] for r in keep], [rows.labels[r] for r in keep],
        [list(range(len(keep)))], rows.custom,
    )


def _zero_gradient(g: Tensor, model: nn.Module, name: str, settings: dict[str, object]) -> None:
    """Warn, and say so in ``settings``, when a row's gradient is zero at every map position: its
    map is then empty whatever the image shows."""
    zero = (g.flatten(1).abs().amax(1) == 0).nonzero()[:, 0].tolist()
    if not zero:
        return
    why = "the target does not depend on this layer's output at the map's positions"
    if class_token_model(model):
        why = ("in a class-token model the final block's patch tokens do not reach the class token; "
               "use the last block's input norm (blocks[-1].norm1, the automatic layer)")
    msg = f"the gradient of the target at {name} is zero everywhere for rows {zero}: {why}"
    settings["zero_gradient"] = msg
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)  # past grad_cam and its @renamed wrapper


# -- the core -------------------------------------------------------------------------------
@renamed(**MODEL_AND_IMAGES)
def grad_cam(
    model: nn.Module | Classifier,
    images: Tensor | object,
    *,
    target: Target | Sequence[Sequence[int | str]] = None,
    layer: LayerSpec | None = None,
    method: CamMethod = "gradcam",
    top: int | None = None,
    batch_size: int | None = None,
    memory_mb: float = 1024.0,
    callback: Callable[[int, int], None] | None = None,
    layout: LayoutName | None = None,
    reshape: Reshape | None = None,
) -> Saliency:
    """Class activation maps of the Grad-CAM family for a batch.

    ``target``: ``None`` (top-1 class per image), an int or class name, one per image, a
    callable ``f(output) -> (N,)``, or one *list* per image (``[[281, 285], [1]]``) for several
    classes of one image. ``top=k`` explains each image's k most likely classes. All targets
    come from one forward pass; result rows are image-major and ``settings["image_index"]``
    says which input each row explains. ``layer``: name, ``name#k`` (the k-th call of a module
    that runs several times; a plain name is its last call) or module, default the last spatial
    map (:func:`convlens.layers.default_cam_layer`, logged, in ``result.layer``). ``method``:
    one of ``CAM_METHODS`` (formulas, where methods coincide and which are not
    class-discriminative: module docstring). EigenCAM gives one row per image whatever the
    targets. ``batch_size``/``memory_mb``: Score-CAM's masked forwards per batch (default: as many
    as fit ``memory_mb``), run once per image for all its targets; ``callback``, if given, is called
    as ``callback(done, total)`` after each batch of them (an exception it raises stops the call,
    e.g. to cancel). ``layout``/``reshape``: how the layer's output lies on the image
    (:mod:`convlens.layout`: ``"nchw"``, ``"nhwc"``, ``"tokens"`` or a callable ``tensor -> (N, C,
    h, w)`` as pytorch-grad-cam's ``reshape_transform``; default the classifier's, else inferred:
    a ViT's tokens lose their prefix tokens and lie on the patch grid). A gradient that is zero at
    every position of the map warns (and ``settings["zero_gradient"]`` says so). The model's output goes
    through the classifier's output adapter (tuple, dict, ``.logits``, ``output=``); a callable
    target receives the adapted output. ``maps`` (R, H, W) and ``raw`` (R, h, w) are float32 on
    the model's device: ``relu(...)`` upsampled bilinearly to the input size, never normalised.

    Args:
        model: an ``nn.Module`` (its inputs taken as preprocessed) or a
            :class:`convlens.Classifier`; left as it was (weights, flags, ``.grad``, hooks).
        images: (N, C, H, W) float tensor (moved to the model's device and dtype), or image(s) that
            :meth:`Classifier.batch` accepts (path, PIL image, array, list of them).
        target: see above.
        layer: see above.
        method: one of ``CAM_METHODS`` or a name :func:`convlens.register_cam` added.
        top: explain each image's ``top`` most likely classes (not with ``target``).
        batch_size: Score-CAM's masked inputs per forward.
        memory_mb: Score-CAM's memory budget when ``batch_size`` is None.
        callback: Score-CAM's progress, ``callback(done, total)``.
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"``, overriding the inference.
        reshape: a callable ``tensor -> (N, C, h, w)``, overriding ``layout``.
    Returns:
        :class:`convlens.Saliency` with R rows (one per image and target; one per image for
        EigenCAM): ``maps`` (R, H, W), ``raw`` (R, h, w) and ``images`` (R, 3, H, W) float32 on the
        model's device; ``target``, ``labels``, ``layer``, ``method`` and ``settings``
        (``image_index``, ``layer_shape`` (the map's C, h, w), ``layout`` with a token layer's
        ``prefix_tokens`` and ``grid``, ``layer_reason`` for an automatic token-model layer,
        Score-CAM's ``batch_size``).
    Raises:
        ValueError: an unknown method, a bad ``target`` (unknown class, out of range, wrong count,
            a callable that does not give one score per image), ``top`` with ``target`` or not a
            positive int, NaN/inf in the output or the gradient (``NonFiniteError``).
        LayerError: an unknown layer, one that does not run, or one whose output's layout cannot
            be inferred (give ``layout=`` or ``reshape=``).
        ModelError: the model's output is not (N, classes) logits (for a class target).

    Example::

        cam = grad_cam(load_model(), sample_image(), top=5)
        cam.plot(index=0)
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be one name, one of {', '.join(cam_methods())}; got {method!r}")
    choose([method], cam_methods(), "method")
    clf = as_classifier(model)
    x = clf.batch(images)
    model = clf.model
    auto = layer is None
    if layer is None:
        key = ("cam_layer", tuple(x.shape[1:]))
        layer = remembered(model, key, lambda: default_cam_layer(model, x[:1]))
        if not _has(model, layer):  # the model was changed since: choose again
            forget(model)
            layer = remembered(model, key, lambda: default_cam_layer(model, x[:1]))
        log.info("Grad-CAM layer: %s", layer)
    name, module = resolve_layer(model, layer)
    needs_grad = method_spec(method).needs_gradient
    # inside torch.inference_mode() autograd cannot record at all; leave it for this call
    # gradients are wanted for activations only: with the parameters frozen for the call,
    # autograd records and the backward touches nothing but the layers after the captured one
    with torch.inference_mode(False), model_guard(model, freeze=True):
        with LayerCapture({name: module}, grad=[name] if needs_grad else []) as cap:
            out = clf.adapt(cap.run(model, x))
        if name not in cap.outputs:
            raise missing_layer(name, cap.counts)
        lay = layout_for(clf, name, module, tuple(cap[name].shape), tuple(x.shape[-2:]), layout=layout,
                         reshape=reshape, batch=len(x))
        a = lay.apply(cap[name])
        if not isinstance(target, Region) and (not callable(target) or isinstance(target, (str, int))):
            require_logits(out)
        rows = _rows(clf, target, top, out, defer=needs_grad)  # a non-finite output raises below, with the checks
        settings: dict[str, object] = {"layer_shape": tuple(a.shape[1:])}
        if lay.kind != "nchw":
            settings.update(lay.settings())
        why = cam_layer_reason(model, name) if auto else None
        if why:
            settings["layer_reason"] = why
        if top is not None:
            settings["top"] = top
        if method == "eigencam":
            rows = _one_row_per_image(rows, method)
            settings["class_independent"] = True
        settings = {"image_index": rows.image, **settings}
        g = None
        with torch.no_grad():
            if needs_grad:
                g = lay.apply(_gradients(out, cap[name], rows))
                raw, maps = cam_from_layer(method, _rows_of(a.detach(), rows.image), g, x.shape[-2:])
            elif method == "eigencam":
                raw, maps = cam_from_layer(method, a.detach(), None, x.shape[-2:])
            else:
                w, bs = _scorecam_weights(clf, x, a.detach(), rows, batch_size, memory_mb, callback)
                raw, maps = _relu_upsampled((w[:, :, None, None] * a.detach()[rows.image].float()).sum(1), x.shape[-2:])
                settings["batch_size"] = bs
        zero, constant, top1 = _deferred_checks(out, g, raw, name, rows.top1)
        if rows.top1 is not None:
            rows = replace(rows, index=top1, labels=[clf.label(c) for c in top1], top1=None)
        if zero:
            _zero_gradient(g, model, name, settings)  # type: ignore[arg-type]
    if constant and "zero_gradient" not in settings:
        warn_constant(raw, method, f"nothing at {name} supports the target")
    images = _rows_of(clf.denormalise(x.detach()), rows.image)
    return Saliency(
        maps=maps.float(),
        raw=raw.float(),
        target=list(rows.index),
        method=method,
        layer=name,
        images=images,
        labels=list(rows.labels),
        settings=settings,
    )
