"""A private, faster copy of the user's model for forwards that need no gradient.

Occlusion's windows and the deletion / insertion curves run hundreds of forwards of one model.
They run on a copy (:func:`private_copy`): eval mode, without the caller's hooks, in channels-last
memory, with every batch norm that directly follows a convolution folded into it. On a 2-core CPU
that is 1.6x (one image) to 2-3x (a few per batch) faster than the user's model for EfficientNet-
Lite0. The user's model is never touched; the copy is made once per weights (a changed weight
means a new copy) and is used only after its output has been checked against the user's model's
(:func:`check_tolerance`); anything else means the user's model.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .hooks import forward_hooks, unhooked_copy

if TYPE_CHECKING:
    from .models import Classifier

log = logging.getLogger(__name__)

LAYOUT = torch.channels_last  # the private copy's memory layout where its forward allows it


def check_tolerance(device: torch.device, dtype: torch.dtype) -> float:
    """Relative tolerance of the self-check: float32 rounding, or the coarser precision the device
    computes in (half types; TF32 matmuls and convolutions on CUDA, the PyTorch default for cuDNN
    convolutions), where the crops' other summation order differs by more than float32 rounding:
    measured on an H200 with TF32, ResNet-50 and EfficientNet-Lite0 crops differed from their full
    forwards by up to ~1e-2 of the logits' size (1.98x the 5e-3 first chosen), hence 2e-2."""
    if dtype == torch.bfloat16:
        return 5e-2
    if dtype == torch.float16:
        return 1e-2
    if device.type == "cuda" and (
        torch.backends.cudnn.allow_tf32
        or torch.backends.cuda.matmul.allow_tf32
        or torch.get_float32_matmul_precision() != "highest"
    ):
        return 2e-2
    return 1e-5


def _copy(model: nn.Module, x: Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode, without the caller's hooks, in channels-last memory (the
    layout the CPU and cuDNN convolutions run fastest in, on small crops most of all), with every
    batch norm that directly follows a convolution folded into it (:func:`fold_batch_norms`)."""
    private = unhooked_copy(model).eval()
    fold_batch_norms(private, x)
    private.to(memory_format=LAYOUT)
    try:  # a forward that needs contiguous memory (a .view() of an activation): keep that layout
        with torch.no_grad():
            private(x.contiguous(memory_format=LAYOUT))
        private.convlens_layout = LAYOUT
    except Exception as e:
        log.info("private copy: contiguous memory (%s: %s)", type(e).__name__, e)
        private.to(memory_format=torch.contiguous_format)
        private.convlens_layout = torch.contiguous_format
    return private


def _foldable() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The convolution and batch-norm classes whose pairs fold: exactly these (a subclass may
    compute otherwise, e.g. a weight-standardised convolution); timm's where timm is imported (a
    timm model imported it; importing it here would cost a torchvision user seconds)."""
    convs: tuple[type, ...] = (nn.Conv2d,)
    norms: tuple[type, ...] = (nn.BatchNorm2d,)
    if "timm" not in sys.modules:
        return convs, norms
    try:  # TF-"same" convolution, batch norm + activation (EfficientNet-Lite, the default model)
        from timm.layers import BatchNormAct2d, Conv2dSame
    except ImportError:  # an older timm
        return convs, norms
    return convs + (Conv2dSame,), norms + (BatchNormAct2d,)


def fold_batch_norms(model: nn.Module, x: Tensor) -> None:
    """Folds each eval-mode batch norm that reads the output of the module called just before it,
    a convolution (each called once, the tensor not changed in place in between), into that
    convolution's weight and bias, in place (on the private copy): ``conv(x) * g + h`` with
    ``g = gamma / sqrt(var + eps)``, ``h = beta - mean * g``. A plain ``BatchNorm2d`` becomes
    ``Identity``, timm's ``BatchNormAct2d`` its dropout and activation. The same function to float
    rounding, one pass over each activation less. (Were the convolution's output also read
    elsewhere, the check against the user's model would fail and the plain path run.)"""
    convs, norms = _foldable()
    # every module call in order: (module, "in" / "out", the tensor, its in-place version)
    events: list[tuple[nn.Module, str, object, int]] = []

    def note(m: nn.Module, side: str, t: object) -> None:
        events.append((m, side, t, t._version if isinstance(t, Tensor) else -1))

    names = {m: name for name, m in model.named_modules()}
    with forward_hooks() as add, torch.no_grad():
        for m in names:
            add(m, lambda m, args: note(m, "in", args[0] if args else None), pre=True)
            add(m, lambda m, args, out: note(m, "out", out))
        model(x)
    calls: dict[nn.Module, int] = {}
    for m, side, _, _ in events:
        calls[m] = calls.get(m, 0) + (side == "in")
    for (conv, side, out, version), (bn, side2, bn_in, version2) in zip(events, events[1:]):
        if not (side == "out" and side2 == "in" and type(conv) in convs and type(bn) in norms
                and isinstance(out, Tensor) and bn_in is out and version == version2
                and calls[conv] == calls[bn] == 1 and not bn.training
                and bn.running_mean is not None and bn.running_var is not None):
            continue
        with torch.no_grad():
            g = (bn.weight.double() if bn.weight is not None else 1.0) / (bn.running_var.double() + bn.eps).sqrt()
            h = (bn.bias.double() if bn.bias is not None else 0.0) - bn.running_mean.double() * g
            if conv.bias is not None:
                h = h + conv.bias.double() * g
            conv.weight.copy_((conv.weight.double() * g.view(-1, 1, 1, 1)).to(conv.weight.dtype))
            conv.bias = nn.Parameter(h.to(conv.weight.dtype), requires_grad=False)
        parent_name, _, attr = names[bn].rpartition(".")
        rest = nn.Identity() if type(bn) is nn.BatchNorm2d else nn.Sequential(bn.drop, bn.act)
        setattr(model.get_submodule(parent_name), attr, rest)


def _stamp(model: nn.Module) -> tuple:
    """The weights' in-place version counters and storage: a changed weight means a new copy."""
    return tuple((t._version, t.data_ptr()) for t in model.state_dict(keep_vars=True).values())


def _hooks(model: nn.Module) -> tuple:
    """The forward hooks on ``model`` and the global ones (the copy has none): a hook added since
    the check may change the output, so it means a new check."""
    from torch.nn.modules import module as nn_module

    names = ("_forward_hooks", "_forward_pre_hooks")
    own = tuple((id(m), *(tuple(getattr(m, a)) for a in names)) for m in model.modules()
                if any(getattr(m, a) for a in names))
    return own, tuple(nn_module._global_forward_hooks), tuple(nn_module._global_forward_pre_hooks)


def private_copy(model: nn.Module, x: Tensor) -> nn.Module:
    """The remembered private copy of ``model`` for inputs like ``x`` (its dtype and device): made
    once per weights, and replaced, not added to, when they change (a training loop's changing
    weights must not pile up copies).

    Args:
        model: the user's model (left as it is).
        x: (N, C, H, W) input on the model's device (``x[:1]`` runs through the copy once).
    Returns:
        The copy (``copy.convlens_layout``: the memory format its inputs should have).
    Raises:
        Exception: whatever copying or running the model raises.
    """
    from .layers import remembered

    stamp = _stamp(model)
    slot: dict[str, Any] = remembered(model, ("convlens.private-copy", x.dtype, x.device), dict)
    if slot.get("stamp") != stamp:
        slot.clear()
        slot.update(stamp=stamp, copy=_copy(model, x[:1]))
    return slot["copy"]


def fast_model(clf: Classifier, x: Tensor) -> Callable[[Tensor], Any]:
    """The model for forwards without gradient of inputs like ``x``: the private copy
    (:func:`private_copy`, inputs put in its memory layout) once its adapted output on ``x[:1]``
    has matched the user's model's to the device's rounding (checked once per weights, shape,
    dtype and device), else ``clf.model`` itself (the reason is logged once). A forward hook added
    to the model since the check means a new check (the copy runs without the caller's hooks).
    Call it under ``torch.no_grad()``, with the model in eval mode.

    Args:
        clf: the classifier (its model is not changed).
        x: (N, C, H, W) model-ready input.
    Returns:
        A function from an (B, C, H, W) input to the raw model output (adapt it with
        ``clf.adapt``); ``clf.model`` itself when there is no checked copy.
    """
    from .layers import remembered

    model = clf.model
    stamp = (_stamp(model), _hooks(model))
    slot: dict[str, Any] = remembered(model, ("convlens.fast-model", tuple(x.shape[1:]), x.dtype, x.device), dict)
    if slot.get("stamp") != stamp:
        slot.clear()
        slot["stamp"] = stamp
        try:
            private = private_copy(model, x)
            with torch.no_grad():
                want = clf.forward(x[:1]).float()
                got = clf.adapt(private(x[:1].contiguous(memory_format=private.convlens_layout))).float()
            rel = check_tolerance(x.device, x.dtype)
            err = float((got - want).abs().max()) / (rel * max(1.0, float(want.abs().max())))
            if got.shape != want.shape or not err <= 1.0:
                raise ValueError(f"its output differs by {err:.3g} x the tolerance ({rel:.0e} relative)")
            slot["copy"] = private
        except Exception as e:  # the user's model is always right
            log.info("forwards through the model itself: no private copy (%s: %s)", type(e).__name__, e)
    private = slot.get("copy")
    if private is None:
        return model
    layout = private.convlens_layout
    return lambda batch: private(batch.contiguous(memory_format=layout))
