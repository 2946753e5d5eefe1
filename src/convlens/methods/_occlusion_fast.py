"""Exact speed-up for occlusion: recompute only what a window can reach.

An occluded image differs from the clean one only inside the window. Through the first, purely
local layers of a CNN (convolutions, batch norm, pointwise activations, max/avg pooling) that
difference spreads only as far as the receptive field: output cell ``j`` of a layer with total
stride ``S`` depends on input rows ``[S*j - L, S*j + R]``. So, for a *split* module ``M`` on the
network's main path:

1. the clean output of ``M`` is computed once per image;
2. for each window, only a crop of the occluded image is run up to ``M``: the crop holds the
   receptive fields of every cell of ``M`` the window can reach, starts at a multiple of ``S``
   (so its grid lines up with the full image's) and keeps the image's size modulo ``S`` (so
   "same" padding that depends on the size pads alike); where it touches the image border, the
   layers' own padding is the true padding;
3. a forward hook on ``M`` pastes the reachable cells into a copy of the clean output and the
   rest of the network runs on that, unchanged.

Cells outside the reachable set equal the clean ones exactly, and the pasted ones are computed
from the same inputs, so the result equals a full forward up to float rounding (a convolution
over a smaller tensor may sum in another order). ``L`` and ``R`` are bounded from above by
adding every local layer's reach (parallel branches included), which only enlarges the crop.

The structure is found with forward hooks on a private copy of the model (the user's model is
never touched), the split is chosen with a FLOP estimate, and the whole path is checked on
the first, middle and last window against full forwards of the user's model before it is used;
any doubt (an unknown layer type, a module run twice, a mismatch) means the plain path is used.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

_POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout2d,
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
# below this fraction of the plain cost saved, the plain path is kept
MIN_GAIN = 0.1


@dataclass
class _Call:
    module: nn.Module
    name: str
    start: int
    end: int = -1
    calls: int = 0
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()


def _record(model: nn.Module, x: Tensor) -> list[_Call]:
    """Every module's first call on ``x``: start/end order and input/output shapes."""
    calls: dict[nn.Module, _Call] = {}
    counter = [0]
    handles = []

    def pre(name):
        def hook(m, args):
            counter[0] += 1
            if m in calls:
                calls[m].calls += 1
                return
            shape = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else ()
            calls[m] = _Call(m, name, counter[0], calls=1, in_shape=shape)

        return hook

    def post(m, args, out):
        counter[0] += 1
        c = calls.get(m)
        if c is not None and c.end < 0:
            c.end = counter[0]
            c.out_shape = tuple(out.shape) if isinstance(out, Tensor) else ()

    try:
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sorted(calls.values(), key=lambda c: c.start)


def _spatial(shape: tuple[int, ...]) -> tuple[int, int] | None:
    return (shape[2], shape[3]) if len(shape) == 4 else None


def _reach(c: _Call) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """Per axis (left reach, right reach) in the module's input cells, and its stride; ``None`` when
    the module is not a known local layer."""
    m = c.module
    if isinstance(m, _POINTWISE) or (isinstance(m, nn.BatchNorm2d) and not m.training):
        return (0, 0), (0, 0), (1, 1)
    if not isinstance(m, (nn.Conv2d, *_POOLS)):
        return None
    pair = nn.modules.utils._pair
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    d = pair(getattr(m, "dilation", 1))
    pad = m.padding
    if isinstance(pad, str):
        pad = (0, 0) if pad == "valid" else tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
    pad = pair(pad)
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        return None  # circular / reflect padding reaches across the image
    ceil = getattr(m, "ceil_mode", False)
    reach = []
    for ax in range(2):
        span = d[ax] * (k[ax] - 1)
        size = c.in_shape[2 + ax] + 2 * pad[ax] - span - 1
        expected = (math.ceil if ceil else math.floor)(size / s[ax]) + 1
        if expected != c.out_shape[2 + ax]:
            reach.append((span, span))  # padding decided at run time (TF "same"): bound both sides
        else:
            reach.append((pad[ax], max(span - pad[ax], 0)))
    return reach[0], reach[1], s


@dataclass
class _Split:
    call: _Call
    stride: tuple[int, int]
    left: tuple[int, int]
    right: tuple[int, int]
    prefix_cost: float
    cost: float


def _candidates(model: nn.Module, calls: list[_Call], size: tuple[int, int]) -> tuple[list[_Split], float]:
    """Split modules on the main path whose prefix is purely local, with receptive-field bounds and
    cost estimates; and the cost of a full forward."""
    spine = {model}
    for m in model.modules():  # parents come before children in modules()
        if m in spine and (m is model or isinstance(m, nn.Sequential)):
            spine.update(m.children())
    costs = []
    for c in calls:
        out = math.prod(c.out_shape) if c.out_shape else 0
        if isinstance(c.module, nn.Conv2d) and c.in_shape:
            out *= (c.in_shape[1] // c.module.groups) * math.prod(nn.modules.utils._pair(c.module.kernel_size))
        costs.append(out if not list(c.module.children()) else 0)
    total = float(sum(costs)) or 1.0
    splits: list[_Split] = []
    s_max = 1
    barrier = None  # the first call that is not local ends the prefix
    for i, c in enumerate(calls):
        if list(c.module.children()):
            if c.calls != 1:
                barrier = c.start
                break
            continue
        sp = _spatial(c.in_shape)
        r = _reach(c) if sp is not None and _spatial(c.out_shape) is not None and c.calls == 1 else None
        if r is None:
            barrier = c.start
            break
        s_in = [size[ax] / sp[ax] for ax in range(2)]
        if max(s_in) > s_max * 1.01:  # the resolution jumped: a global reduction happened (e.g. SE)
            barrier = c.start
            break
        out_sp = _spatial(c.out_shape)
        s_max = max(s_max, round(size[0] / out_sp[0]), round(size[1] / out_sp[1]))
    for c in calls:
        if c.module not in spine or c.module is model or c.calls != 1 or _spatial(c.out_shape) is None:
            continue
        if barrier is not None and c.end > barrier:
            break
        sp = _spatial(c.out_shape)
        stride = (round(size[0] / sp[0]), round(size[1] / sp[1]))
        # reach of everything that ran up to the end of c
        lr = [[0, 0], [0, 0]]
        for cc in calls:
            if cc.start > c.end or list(cc.module.children()):
                continue
            r = _reach(cc)
            s_in = [size[ax] / _spatial(cc.in_shape)[ax] for ax in range(2)]
            for ax in range(2):
                lr[0][ax] += math.ceil(s_in[ax] * r[ax][0])
                lr[1][ax] += math.ceil(s_in[ax] * r[ax][1])
        prefix = float(sum(cost for cc, cost in zip(calls, costs) if cc.end <= c.end))
        splits.append(_Split(c, stride, tuple(lr[0]), tuple(lr[1]), prefix, total))
    return splits, total


@dataclass
class _Axis:
    """Crop geometry along one axis for every window start."""

    crop: int  # crop length in input pixels
    a: list[int]  # crop start per window start
    j0: list[int]  # first reachable output cell
    j1: list[int]  # last reachable output cell (inclusive)


def _axis(size: int, out: int, patch: int, starts: list[int], s: int, left: int, right: int) -> _Axis:
    lo_hi = []
    for y in starts:
        j0 = max(0, -((right - y) // s))  # ceil((y - right) / s)
        j1 = min(out - 1, (y + patch - 1 + left) // s)
        lo = max(0, s * j0 - left)
        hi = min(size - 1, s * j1 + right)
        lo_hi.append((j0, j1, lo, hi))
    need = max(hi + 1 - (lo // s) * s for _, _, lo, hi in lo_hi)
    crop = need + (size - need) % s  # same size modulo s as the image
    crop = min(crop, size)
    a = [min((lo // s) * s, size - crop) for _, _, lo, _ in lo_hi]
    return _Axis(crop, a, [v[0] for v in lo_hi], [v[1] for v in lo_hi])


class CropEvaluator:
    """Runs a private copy of the model on occluded crops and splices the split module's output."""

    name = "crop"

    def __init__(self, private: nn.Module, split: _Split, ay: _Axis, ax: _Axis,
                 starts: tuple[list[int], list[int]]) -> None:
        self.model = private
        self.split = split
        self.ay, self.ax = ay, ax
        self.index_y = {y: i for i, y in enumerate(starts[0])}
        self.index_x = {x: i for i, x in enumerate(starts[1])}
        self.clean: Tensor | None = None
        self._clean_of: Tensor | None = None
        self._paste: list[tuple[int, int, int, int, int, int]] | None = None
        self._handle = split.call.module.register_forward_hook(self._hook)
        self.split_name = split.call.name
        self.estimate = 1.0

    def close(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: object, out: Tensor) -> Tensor | None:
        paste = self._paste
        if paste is None:  # the clean pass
            self.clean = out.clone()
            return None
        full = self.clean.expand(out.shape[0], *self.clean.shape[1:]).clone()
        for k, (j0, j1, i0, i1, c0, c1) in enumerate(paste):
            full[k, :, j0 : j1 + 1, i0 : i1 + 1] = out[k, :, c0 : c0 + j1 - j0 + 1, c1 : c1 + i1 - i0 + 1]
        return full

    def _prepare(self, x: Tensor) -> None:
        if self._clean_of is not x:
            self._paste = None
            with torch.no_grad():
                self.model(x)
            self._clean_of = x

    def __call__(self, x: Tensor, base: Tensor, windows: list[tuple[int, int, int]], patch: tuple[int, int]) -> Tensor:
        self._prepare(x)
        ph, pw = patch
        sy, sx = self.split.stride
        cy, cx = self.ay.crop, self.ax.crop
        crops = x.new_empty(len(windows), x.shape[1], cy, cx)
        paste = []
        for k, (_, y, xx) in enumerate(windows):
            iy, ix = self.index_y[y], self.index_x[xx]
            a, b = self.ay.a[iy], self.ax.a[ix]
            crops[k] = x[0, :, a : a + cy, b : b + cx]
            crops[k, :, y - a : y - a + ph, xx - b : xx - b + pw] = base[0, :, y : y + ph, xx : xx + pw]
            j0, j1, i0, i1 = self.ay.j0[iy], self.ay.j1[iy], self.ax.j0[ix], self.ax.j1[ix]
            paste.append((j0, j1, i0, i1, j0 - a // sy, i0 - b // sx))
        self._paste = paste
        try:
            return self.model(crops)
        finally:
            self._paste = None


def build_fast_evaluator(
    model: nn.Module,
    x: Tensor,
    base: Tensor,
    patch: tuple[int, int],
    starts_y: list[int],
    starts_x: list[int],
) -> CropEvaluator | None:
    """A :class:`CropEvaluator` for ``model`` on images shaped like ``x``, or ``None`` when the
    model's structure is not understood or the crop path would not save enough work."""
    from .occlusion import _PlainEvaluator

    height, width = x.shape[-2:]
    try:
        private = copy.deepcopy(model).eval()
        calls = _record(private, x[:1])
        splits, total = _candidates(private, calls, (height, width))
    except Exception as e:  # a structure we cannot record: the plain path is always right
        log.info("occlusion: no crop path (%s)", e)
        return None
    best = None
    for sp in splits:
        h, w = _spatial(sp.call.out_shape)
        ay = _axis(height, h, patch[0], starts_y, sp.stride[0], sp.left[0], sp.right[0])
        ax = _axis(width, w, patch[1], starts_x, sp.stride[1], sp.left[1], sp.right[1])
        frac = (ay.crop * ax.crop) / (height * width)
        paste = 2 * math.prod(sp.call.out_shape[1:])  # copy of the clean output + paste
        cost = total - sp.prefix_cost * (1 - frac) + paste
        if best is None or cost < best[0]:
            best = (cost, sp, ay, ax)
    if best is None or best[0] > (1 - MIN_GAIN) * total:
        log.info("occlusion: the crop path would not pay here; one full forward per window")
        return None
    cost, sp, ay, ax = best
    ev = CropEvaluator(private, sp, ay, ax, (starts_y, starts_x))
    # check on the first, a middle and the last window against the user's model
    n = len(starts_y) * len(starts_x)
    picks = sorted({0, n // 2 + len(starts_x) // 2, n - 1})
    windows = [(i, starts_y[i // len(starts_x)], starts_x[i % len(starts_x)]) for i in picks]
    try:
        with torch.no_grad():
            fast = ev(x[:1], base[:1], windows, patch)
            ref = _PlainEvaluator(model)(x[:1], base[:1], windows, patch)
        err = float((fast - ref).abs().max())
        tol = 1e-5 * max(1.0, float(ref.abs().max()))
    except Exception as e:
        ev.close()
        log.info("occlusion: crop path failed its check (%s); one full forward per window", e)
        return None
    if not err <= tol:
        ev.close()
        log.info("occlusion: crop path differs by %.3g from full forwards; one full forward per window", err)
        return None
    log.info(
        "occlusion: crop path split at %s (stride %s, reach %s/%s), crop %dx%d, estimated %.0f%% of the work",
        sp.call.name, sp.stride, sp.left, sp.right, ay.crop, ax.crop, 100 * cost / total,
    )
    ev.split_name = sp.call.name
    ev.estimate = cost / total
    return ev
