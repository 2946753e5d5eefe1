"""Feature visualisation: optimise an image until one unit of the network responds strongly.

The idea of the lucid/lucent line of work (Olah et al., "Feature Visualization", Distill 2017):
pixel-space gradient ascent finds high-frequency patterns that excite a unit without looking like
anything, so the image is parameterised instead as a colour-decorrelated Fourier spectrum scaled
by 1/f (natural images have that spectrum), squashed into [0, 1] with a sigmoid and normalised
with the model's own mean/std; small random transforms (pad, jitter, scale, rotate) at every step
make the optimum robust instead of adversarial.

Speed: N units are optimised as one batch of N images, the forward pass stops at the target layer
(:class:`~convlens.hooks.LayerCapture` with ``stop_early``), and autograd differentiates only the
image parameters (the model's parameters stop requiring grad inside :func:`model_guard`, which
restores them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import MODEL, renamed
from .._scaling import minmax
from ..hooks import LayerCapture, model_guard
from ..layers import call_counts, missing_layer, resolve_layer
from ..layout import LayoutName, Reshape, layout_for, required_input_size
from ..models import Classifier, as_classifier
from ..results import FeatureImages, Objective
from ..targets import index_tensor
from .transforms import (  # the names featureviz.py held before the split
    Transform,
    jitter,  # noqa: F401
    pad,  # noqa: F401
    random_rotate,  # noqa: F401
    random_scale,  # noqa: F401
    standard_transforms,
)

__all__ = [
    "FeatureImages",
    "cached_channels",
    "feature_visualization",
    "standard_transforms",
    "pad",
    "jitter",
    "random_scale",
    "random_rotate",
    "OBJECTIVES",
    "Objective",
]

log = logging.getLogger(__name__)


Param = Literal["fourier", "pixel"]
OBJECTIVES: tuple[Objective, ...] = ("channel", "neuron", "layer", "class")
PARAMS: tuple[Param, ...] = ("fourier", "pixel")

#: Bump when the optimisation changes what it returns for the same settings: part of the cache key.
FV_VERSION = 2


# Square root of the colour covariance of ImageNet photos (lucid's SVD), columns scaled to norm
# <= 1: three decorrelated channels mixed by it give natural colour statistics.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], device="cpu")


_COLOR = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


#: the largest image side: a 1024 px Fourier image already takes seconds per step on a CPU, and a
#: side of 100000 would ask for tens of gigabytes
MAX_SIZE = 1024


# -- image parameterisations ------------------------------------------------------------------
def _seed_for(seed: int, unit: int, k: int, stream: int = 0) -> int:
    """One well-mixed seed per (call seed, unit, k-th image of that unit, stream): a unit's image
    does not depend on which other units share the batch. Stream 0 seeds the initial image,
    stream 1 the robustness transforms."""
    entropy = [seed & 0xFFFFFFFF, unit + 2, k] + ([stream] if stream else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class _Fourier:
    """rfft spectrum (N, 3, S, S//2+1) -> scaled by 1/max(f, 1/S) -> inverse FFT -> colour mixing
    -> sigmoid: an RGB image in [0, 1] whose initial noise has a natural 1/f spectrum."""

    def __init__(
        self, gens: list[torch.Generator], hw: tuple[int, int], device: torch.device, channels: int = 3
    ) -> None:
        h, w = hw
        fy = torch.fft.fftfreq(h, device="cpu")[:, None]
        fx = torch.fft.rfftfreq(w, device="cpu")[None, :]
        freq = torch.sqrt(fx * fx + fy * fy)
        # 1/f amplitude; the mean (f = 0) is treated as f = 1/S so it stays finite
        self.scale = (1.0 / freq.clamp(min=1.0 / max(h, w))).to(device)
        self.hw = hw
        shape = (channels, h, w // 2 + 1, 2)
        self.param = torch.stack([torch.randn(shape, generator=g, device="cpu") * 0.01 for g in gens]).to(device)
        self.param.requires_grad_(True)
        self.color = _COLOR.to(device) if channels == 3 else None  # one channel: nothing to decorrelate
        self.opt: torch.optim.Optimizer | None = None

    def image(self) -> Tensor:
        spec = torch.view_as_complex(self.param) * self.scale
        x = torch.fft.irfftn(spec, s=self.hw, norm="ortho") / 4
        if self.color is not None:
            x = torch.einsum("dc,nchw->ndhw", self.color, x)
        return torch.sigmoid(x)

    def step(self, grad: Tensor, lr: float) -> None:
        if self.opt is None:
            self.opt = torch.optim.Adam([self.param], lr=lr)
        self.param.grad = -grad  # Adam minimises; we ascend
        self.opt.step()
        self.param.grad = None

    @staticmethod
    def display(image: Tensor) -> Tensor:
        return image


class _Pixel:
    """The spec's method: the model input itself, from N(0, 0.1^2) noise, stepped along the gradient
    divided by its standard deviation (per image); shown min-max scaled to [0, 1]. (The tutorial
    adds the gradient of ``-activation``, so it lowers the activation; here the step ascends.)"""

    def __init__(
        self, gens: list[torch.Generator], hw: tuple[int, int], device: torch.device, channels: int = 3
    ) -> None:
        noise = [torch.randn((channels, *hw), generator=g, device="cpu") * 0.1 for g in gens]  # seeded on the host
        self.param = torch.stack(noise).to(device)
        self.param.requires_grad_(True)

    def image(self) -> Tensor:
        return self.param

    def step(self, grad: Tensor, lr: float) -> None:
        std = grad.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        with torch.no_grad():
            self.param += lr * grad / (std + 1e-8)

    @staticmethod
    def display(image: Tensor) -> Tensor:
        return minmax(image, (1, 2, 3))


# -- objectives -----------------------------------------------------------------------------------
def _unit_scores(act: Tensor, kind: str | Callable[[Tensor], Tensor], units: Tensor) -> Tensor:
    """(N,) scores: channel mean, centre neuron, mean square of the whole layer, or a class logit."""
    if callable(kind):
        out = kind(act)
        if not isinstance(out, Tensor) or out.shape != (act.shape[0],):
            raise ValueError("a callable objective must return one score per image, shape (N,)")
        return out
    idx = torch.arange(act.shape[0], device=act.device)
    if kind == "layer":
        return act.pow(2).flatten(1).mean(1)
    picked = act[idx, units]  # (N,) for logits/vectors, (N, H, W) for feature maps
    if kind == "neuron" and picked.dim() == 3:
        return picked[:, picked.shape[1] // 2, picked.shape[2] // 2]
    return picked.flatten(1).mean(1) if picked.dim() > 1 else picked


def _diversity(act: Tensor, groups: list[Tensor]) -> Tensor:
    """Lucid's diversity: for each group of images of the same unit, the summed cosine similarity
    of the Gram matrices G_i = A_i A_i^T (A_i: channels x positions) of every pair, / group size."""
    total = act.new_zeros(())
    for g in groups:
        if len(g) < 2:
            continue
        f = act[g].flatten(2)  # (n, C, HW); a vector layer gives HW = 1
        gram = (f @ f.transpose(1, 2)).flatten(1)
        gram = gram / gram.norm(dim=1, keepdim=True).clamp_min(1e-10)
        sim = gram @ gram.T
        total = total + (sim.sum() - sim.diagonal().sum()) / len(g)
    return total


# -- the method ---------------------------------------------------------------------------------
def _units(clf: Classifier, channels: Any, kind: Any) -> list[int | None]:
    if kind == "layer":
        if channels is None:
            return [None]
        n = channels if isinstance(channels, int) and not isinstance(channels, bool) else len(list(channels))
        if n < 1:
            raise ValueError("objective='layer' needs at least one image")
        return [None] * n
    if channels is None:
        raise ValueError("give the channels (or classes) to visualise")
    items = [channels] if isinstance(channels, (int, str)) else list(channels)
    if not items:
        raise ValueError("no channels given")
    out: list[int | None] = []
    for c in items:
        if kind == "class":
            out.append(clf.class_index(c))
        elif isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"channels are non-negative integers, not {c!r}")
        else:
            out.append(int(c))
    return out


def _transforms(transforms: Any, size: int) -> list[Transform]:
    if isinstance(transforms, str):
        if transforms != "standard":
            raise ValueError("transforms is 'standard', () for none, or a sequence of callables")
        return standard_transforms(size)
    if transforms is None:
        return []
    items = list(transforms)
    if not all(callable(t) for t in items):
        raise ValueError("every transform must be a callable (x, generator) -> x")
    return items


@renamed(classifier_or_model=MODEL)
def feature_visualization(
    model: Classifier | nn.Module,
    layer: str | nn.Module | None,
    channels: int | str | Sequence[int | str] | None,
    *,
    objective: Objective | Callable[[Tensor], Tensor] = "channel",
    steps: int = 128,
    size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    param: Param = "fourier",
    transforms: str | Sequence[Transform] | None = "standard",
    diversity: float = 0.0,
    progress: bool = False,
    callback: Callable[[int, int], None] | None = None,
    cache: bool | str | os.PathLike[str] | None = False,
    layout: LayoutName | None = None,
    reshape: Reshape | None = None,
) -> FeatureImages:
    """Images that maximise units of ``layer``, one per entry of ``channels``, optimised as one batch.

    Each image i ascends ``s_i - diversity * D``. ``s_i`` by ``objective``: ``"channel"`` the
    mean of channel c_i over positions; ``"neuron"`` channel c_i at the centre position;
    ``"layer"`` mean(A^2) over the whole layer (DeepDream; ``channels`` is then None or the number
    of images); ``"class"`` the logit of class c_i (``layer`` ignored, the full network runs); or a
    callable A -> (N,) scores. D is lucid's Gram-matrix similarity between images of the same unit
    (repeat a channel for several different images of it; 10-100 suits the default model's middle
    layers, lucid uses 1e2). ``param="fourier"``: decorrelated 1/f Fourier image through a
    sigmoid, Adam with ``lr``; ``"pixel"``: the spec's normalised-gradient steps on the raw input.
    ``transforms``: "standard", () or callables ``(x, generator) -> x``. Deterministic for
    ``seed``; a unit's image does not depend on the other units in the batch (with the built-in
    transforms and no diversity; up to float rounding, which can differ with the batch size).
    ``cache``: False (default: a library call writes nothing to disk), True (the user cache
    folder, ``$CONVLENS_CACHE`` overrides) or a folder: each unit's result is stored there and a
    later call with the same model weights, layer, unit, objective, settings and seed reads it back
    bit for bit instead of optimising it (only units missing from the cache are optimised; see
    :mod:`convlens.cache`). Units that never get a gradient are reported as dead. A linear first
    conv's channel mean is maximised by a flat colour: use ``"neuron"`` there. ``layer`` may be
    ``name#k`` (the k-th call of a module that runs several times; a plain name is its last call).
    The image and the optimiser live in float32 whatever the model's dtype; the input is cast to
    the model's dtype and the scores are computed in float32. Works inside ``torch.no_grad()`` and
    ``torch.inference_mode()``. ``callback``, if given, is called as ``callback(step, steps)`` after
    each optimisation step (an exception it raises stops the call, e.g. to cancel).
    A token or channels-last layer is read through its layout (:mod:`convlens.layout`; ``layout``/
    ``reshape`` override it): a channel of a ViT block is its mean over the patch grid. A model
    that takes one input size only (timm ViT/DeiT/EVA/Swin: ``patch_embed.img_size``) is rendered
    at that size whatever ``size`` says (``settings["size"]``); a grayscale model in one channel.

    Example::

        res = feature_visualization(load_model(), "blocks.4", [0, 8, 16])
        res.save("out", "blocks4")
    """
    # inference mode forbids autograd and makes every new tensor an inference tensor: leave it
    with torch.inference_mode(False):
        return _feature_visualization(
            model, layer, channels, objective=objective, steps=steps, size=size, lr=lr, seed=seed,
            param=param, transforms=transforms, diversity=diversity, progress=progress, callback=callback,
            cache=cache, layout=layout, reshape=reshape,
        )


def _feature_visualization(
    classifier_or_model: Classifier | nn.Module,
    layer: str | nn.Module | None,
    channels: int | str | Sequence[int | str] | None,
    *,
    objective: Objective | Callable[[Tensor], Tensor],
    steps: int,
    size: int,
    lr: float,
    seed: int,
    param: Param,
    transforms: str | Sequence[Transform] | None,
    diversity: float,
    progress: bool,
    callback: Callable[[int, int], None] | None,
    cache: bool | str | os.PathLike[str] | None,
    layout: LayoutName | None = None,
    reshape: Reshape | None = None,
) -> FeatureImages:
    """The work of :func:`feature_visualization`: check the arguments, read finished units from the cache,
    optimise the rest in one batch and build the result. It is long because each step reads what the one
    before checked; split further it would pass a dozen values along."""
    clf = as_classifier(classifier_or_model)
    model = clf.model
    if not (callable(objective) or objective in OBJECTIVES):
        raise ValueError(f"objective must be one of {OBJECTIVES} or a callable")
    if param not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError("steps must be a positive integer")
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer from 16 to {MAX_SIZE} pixels, not {size!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError("lr must be positive")
    if not diversity >= 0:
        raise ValueError("diversity must be >= 0")
    kind = objective
    if kind == "class":
        name, module = "logits", None
    else:
        if layer is None:
            raise ValueError("give a layer (see `convlens layers`)")
        name, module = resolve_layer(model, layer)
    units = _units(clf, channels, kind)
    need = required_input_size(model)
    if need is not None and need != (size, size):
        log.info("feature visualisation at %dx%d px: the model takes no other input size", *need)
        size = need[0] if need[0] == need[1] else list(need)  # type: ignore[assignment]
    tfs = _transforms(transforms, min(_hw(size)))
    n = len(units)
    device = clf.device
    seen: dict[int | None, int] = {}
    ks = []  # k: this image is the k-th of its unit in the call (repeats get their own seeds)
    for u in units:
        ks.append(seen.setdefault(u, -1) + 1)
        seen[u] = ks[-1]
    opts = {"steps": steps, "size": size, "lr": lr, "seed": seed, "param": param, "diversity": diversity}
    if layout is not None or reshape is not None:
        opts["layout"] = (layout, reshape)

    store, keys = _cache_keys(clf, cache, kind, name, units, ks, transforms, opts)
    found = [_entry_ok(store.get(k), steps, size, clf.channels) for k in keys] if store is not None else [None] * n
    todo = [i for i in range(n) if found[i] is None]
    if todo:
        run = _optimise(clf, name, module, kind, [units[i] for i in todo], [ks[i] for i in todo], tfs, opts, progress,
                        callback)
        for j, i in enumerate(todo):
            found[i] = {key: value[j] for key, value in run.items()}
            if store is not None:
                store.put(keys[i], found[i])
        if store is not None:
            store.prune()
    rows = {key: torch.from_numpy(np.stack([f[key] for f in found])) for key in ("image", "objective", "dead")}
    img = rows["image"].to(device)
    history = torch.from_numpy(np.stack([f["history"] for f in found], axis=1)).to(device)  # with the rest
    dead = [bool(d) for d in rows["dead"]]
    if any(dead):
        which = [units[i] for i in range(n) if dead[i]]
        msg = (f"{sum(dead)} unit(s) of {name} never responded (no activation, no gradient): "
               f"{which}; their images are the initial noise")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    labels = [
        clf.label(u) if kind == "class" and u is not None else (name if u is None else f"{name} c{u}")
        for u in units
    ]
    settings = {
        "steps": steps, "size": size, "lr": lr, "seed": seed, "param": param,
        "transforms": transforms if isinstance(transforms, str) else len(tfs),
        "diversity": diversity, "model": clf.name,
    }
    if store is not None:
        settings["cache"] = {"folder": str(store.folder), "hits": n - len(todo), "misses": len(todo)}
    return FeatureImages(
        images=_display(param, img).float(),
        objective=rows["objective"].to(device).float(),
        layer=name,
        channels=units,
        kind=kind if isinstance(kind, str) else getattr(kind, "__name__", "callable"),
        dead=dead,
        history=history,
        inputs=_to_input(clf, param, img).float(),
        labels=labels,
        settings=settings,
    )


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    """The rendered image's (H, W): a side, or a fixed-size model's (H, W)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _entry_ok(entry: dict[str, np.ndarray] | None, steps: int, size: int | Sequence[int], channels: int = 3
              ) -> dict[str, np.ndarray] | None:
    """A cache entry when it holds what this call needs, else None (recomputed and rewritten)."""
    if entry is None:
        return None
    shapes = {"image": (channels, *_hw(size)), "objective": (), "history": (steps,), "dead": ()}
    if any(k not in entry or entry[k].shape != s for k, s in shapes.items()):
        return None
    return entry


def _to_input(clf: Classifier, param: str, img: Tensor) -> Tensor:
    """The model-ready tensor of an image: the model's normalisation of the [0, 1] Fourier image;
    the pixel parameterisation is the input itself."""
    return img if param != "fourier" else clf._normalise(img)


def _display(param: str, img: Tensor) -> Tensor:
    """The image as shown, in [0, 1]: the Fourier image as it is, the pixel one min-max scaled per
    image; a grayscale model's one channel repeated as RGB."""
    return (_Fourier if param == "fourier" else _Pixel).display(img).expand(-1, 3, -1, -1)


@renamed(classifier_or_model=MODEL)
def cached_channels(
    model: Classifier | nn.Module,
    layer: str | nn.Module,
    channels: Sequence[int],
    *,
    cache: bool | str | os.PathLike[str] | None,
    steps: int = 128,
    size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    param: Param = "fourier",
    transforms: str | None = "standard",
) -> list[bool]:
    """Which of ``channels`` (objective ``"channel"``) a :func:`feature_visualization` call with
    the same settings and ``cache`` would read back from the cache instead of optimising.

    Example::

        cached_channels(clf, "bn2", [3, 7], cache=True)   # [True, False]
    """
    clf = as_classifier(model)
    name, _ = resolve_layer(clf.model, layer)
    units = [int(c) for c in channels]
    ks = [units[:i].count(u) for i, u in enumerate(units)]  # a repeated unit's k-th image, as there
    opts = {"steps": steps, "size": size, "lr": lr, "seed": seed, "param": param, "diversity": 0.0}
    store, keys = _cache_keys(clf, cache, "channel", name, units, ks, transforms, opts)
    if store is None:
        return [False] * len(units)
    return [store.path(k).is_file() and _entry_ok(store.get(k), steps, size, clf.channels) is not None
            for k in keys]


def _cache_keys(
    clf: Classifier, cache: Any, kind: Any, name: str, units: list[int | None], ks: list[int],
    transforms: Any, opts: dict[str, Any],
) -> tuple[Any, list[str]]:
    """The cache (None when off or when the result is not cacheable) and one key per image.

    Cacheable: a named objective, no diversity (it couples the images of a call), and the standard
    or no transforms (a custom callable cannot be named in a key)."""
    from ..cache import model_digest, open_cache

    store = open_cache(cache)
    if store is None:
        return None, []
    std = transforms == "standard" if isinstance(transforms, str) else transforms is None or len(list(transforms)) == 0
    layout, reshape = opts.get("layout") or (getattr(clf, "layout", None), getattr(clf, "reshape", None))
    if not isinstance(kind, str) or opts["diversity"] != 0 or not std or reshape is not None:
        log.info("feature visualisation not cached: a callable objective, transform or reshape, or diversity > 0")
        return None, []
    opts = {k: v for k, v in opts.items() if k != "layout"}
    if layout is not None:
        opts["layout"] = layout
    from .._version import __version__

    common = {
        "fv": FV_VERSION, "convlens": __version__, "torch": torch.__version__, "device": clf.device.type,
        "model": model_digest(clf.model), "mean": list(clf.mean), "std": list(clf.std), "layer": name,
        "objective": kind, "transforms": transforms if isinstance(transforms, str) else "none", **opts,
    }
    return store, [store.key({**common, "unit": u, "k": k}) for u, k in zip(units, ks)]  # an entry keeps its fields


def _optimise(
    clf: Classifier, name: str, module: nn.Module | None, kind: Any, units: list[int | None], ks: list[int],
    tfs: list[Transform], opts: dict[str, Any], progress: bool, callback: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Optimise one image per unit as one batch; per image (dim 0, numpy, float32): ``image`` (the
    raw parameterised image before display), ``objective``, ``history`` (steps,) and ``dead``.

    It is long because the optimisation loop, its hooks and each image's randomness share one model
    guard, which restores the parameters, flags and grad mode on the way out.
    """
    model = clf.model
    device = clf.device
    steps, size, lr, seed, param, diversity = (opts[k] for k in ("steps", "size", "lr", "seed", "param", "diversity"))
    n = len(units)
    gens, tf_gens = [], []
    groups: dict[int | None, list[int]] = {}
    for i, (u, k) in enumerate(zip(units, ks)):
        gens.append(torch.Generator().manual_seed(_seed_for(seed, -1 if u is None else u, k)))
        tf_gens.append(torch.Generator().manual_seed(_seed_for(seed, -1 if u is None else u, k, stream=1)))
        groups.setdefault(u, []).append(i)
    # index tensors made once: a list index copies to the device and waits, every step
    group_list = [index_tensor(g, device) for g in groups.values() if len(g) > 1]
    # the built-in transforms draw each image's randomness from its own generator; a custom one
    # gets one generator for the batch
    tf_rng: Any = tf_gens if all(getattr(t, "per_image", False) for t in tfs) else \
        torch.Generator().manual_seed(_seed_for(seed, -2, 0))
    hw = _hw(size)
    image_param = (_Fourier if param == "fourier" else _Pixel)(gens, hw, device, clf.channels)
    fixed = required_input_size(model) is not None  # transforms change the size: resized back
    lay_opts = opts.get("layout") or (None, None)
    unit_t = torch.tensor([-1 if u is None else u for u in units], device=device)
    dtype = clf.dtype  # the image is float32; a half-precision model gets its own dtype (a differentiable cast)

    history = torch.zeros(steps, n, device=device)
    grad_seen = torch.zeros(n, dtype=torch.bool, device=device)
    layers = {} if module is None else {name: module}
    # the parameters stop requiring grad for the call, so autograd skips every weight gradient;
    # the guard restores them, the flags and the caller's grad mode
    with model_guard(model, freeze=True), contextlib.ExitStack() as stack:
        counts = None
        if layers:  # how often each module runs, so the pass can stop at the layer's last (or k-th) call
            try:
                counts = call_counts(model, torch.zeros(1, clf.channels, *hw, device=device, dtype=dtype))
            except RuntimeError:  # too small for the model: the first step says so clearly
                counts = None
        cap = stack.enter_context(LayerCapture(layers, stop_early=True, calls=counts))
        torch.set_grad_enabled(True)  # also under a caller's no_grad; the guard restores the mode

        def forward(x: Tensor, record: bool) -> Tensor:
            try:
                out = cap.run(model, x, input_grad=record)
            except RuntimeError as e:  # e.g. Inception's valid convolutions at 64 px
                if not any(k in str(e) for k in ("Kernel size can't be greater", "Output size is too small")):
                    raise
                raise ValueError(
                    f"size={size} px is too small for this model to reach {name}; pass a larger size="
                ) from e
            if module is not None and name not in cap.outputs:
                raise missing_layer(name, cap.counts)
            act = cap[name] if module is not None else clf.adapt(out)
            if not isinstance(act, Tensor) or act.dim() < 2:
                raise ValueError(f"{name} does not give (N, C, ...) outputs; choose another layer")
            if module is not None and act.dim() in (3, 4):  # a map, read through its layout
                act = layout_for(clf, name, module, tuple(act.shape), tuple(x.shape[-2:]), layout=lay_opts[0],
                                 reshape=lay_opts[1], batch=len(x)).apply(act)
            top = max((u for u in units if u is not None), default=-1)
            if isinstance(kind, str) and kind != "layer" and top >= act.shape[1]:
                raise ValueError(f"{name} has {act.shape[1]} channels; asked for {top}")
            return act.float()  # scores and diversity in float32 for half-precision models

        bar = _progress(steps, progress, name)
        for step in bar:
            img = image_param.image()
            x = img
            for t in tfs:
                x = t(x, tf_rng)
            if fixed and tuple(x.shape[-2:]) != hw:
                x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
            act = forward(_to_input(clf, param, x).to(dtype), True)
            scores = _unit_scores(act, kind, unit_t)
            total = scores.sum()
            if diversity > 0:
                total = total - diversity * _diversity(act, group_list)
            (grad,) = torch.autograd.grad(total, image_param.param)
            grad_seen |= grad.flatten(1).abs().amax(1) > 0
            image_param.step(grad, lr)
            history[step] = scores.detach()
            if callback is not None:
                callback(step + 1, steps)
        with torch.no_grad():
            img = image_param.image().detach()
            final = _unit_scores(forward(_to_input(clf, param, img).to(dtype), False), kind, unit_t).float()
    return {
        "image": img.float().cpu().numpy(),
        "objective": final.cpu().numpy(),
        "history": history.float().cpu().numpy().T.copy(),
        "dead": (~grad_seen).cpu().numpy(),
    }


def _progress(steps: int, show: bool, name: str):
    if not show:
        return range(steps)
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=f"feature visualisation {name}", leave=False)
