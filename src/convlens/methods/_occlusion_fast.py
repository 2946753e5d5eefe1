"""Exact speed-up for occlusion: recompute only what a window can reach.

An occluded image differs from the clean one only inside the window. Through the purely local
layers of a CNN (convolutions, batch norm, pointwise activations, max/avg pooling) the
difference spreads only as far as the receptive field: cell ``j`` of a layer with total stride
``S`` depends on input rows ``[S*j - L, S*j + R]``, so only the cells whose field meets the window
(the *reachable* cells) change. The network's main path is cut at *boundary* modules
``M1, ..., MK`` (modules of the top-level sequence or of nested ``nn.Sequential`` s, run once):

1. one clean pass per image stores the output of every boundary;
2. per window, stage 1 runs on a crop of the occluded image that holds the receptive fields of
   the cells of ``M1`` the window reaches; stage ``k`` runs on a crop of ``Mk-1``'s output in
   which the reachable cells come from stage ``k-1`` and the rest from the clean pass (they are
   equal there); forward hooks on the boundaries swap the tensors;
3. after ``MK`` the reachable cells are pasted into the clean output and the rest of the network
   runs unchanged.

Every crop starts at a multiple of its stage's stride (its grid lines up with the full one) and
keeps the full size modulo that stride (TF-style "same" padding, decided at run time from the
size, pads alike); where a crop touches the border, the layers' own padding is the true one.
``L`` and ``R`` are bounded from above by adding every local layer's reach (parallel branches
included), which can only enlarge the crops. So the result equals one full forward per window up
to float rounding. The structure is read with forward hooks on a private deep copy (the user's
model is never touched); the boundaries are chosen with a cost estimate (multiply-adds plus
memory traffic) by dynamic programming; and the path is checked on the first, a middle and the
last window against full forwards of the user's model before it is used. Anything not understood
(an unknown layer type inside the prefix, a module run twice, a mismatch) means the plain path.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

_POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout2d,
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
MIN_GAIN = 0.1  # below this estimated saving the plain path is kept
COPY_COST = 4.0  # cost units per element copied or touched by a pointwise op (vs 1 per multiply-add)


@dataclass
class _Call:
    module: nn.Module
    name: str
    start: int
    end: int = -1
    calls: int = 0
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    leaf: bool = True


def _record(model: nn.Module, x: Tensor) -> list[_Call]:
    """Every module's first call on ``x`` with start/end order and input/output shapes."""
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
            calls[m] = _Call(m, name, counter[0], calls=1, in_shape=shape, leaf=not any(True for _ in m.children()))

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


def _reach(c: _Call) -> list[tuple[int, int, int]] | None:
    """Per axis (left reach, right reach, stride) in the layer's input cells; ``None`` when the
    layer is not a known local one."""
    m = c.module
    if _spatial(c.in_shape) is None or _spatial(c.out_shape) is None:
        return None
    if isinstance(m, _POINTWISE):  # may be shared (ResNet's one ReLU per block)
        return [(0, 0, 1), (0, 0, 1)]
    if c.calls != 1:
        return None
    if isinstance(m, nn.BatchNorm2d) and not m.training:
        return [(0, 0, 1), (0, 0, 1)]
    if not isinstance(m, (nn.Conv2d, *_POOLS)):
        return None
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        return None  # circular / reflect padding reaches across the image
    pair = nn.modules.utils._pair
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    d = pair(getattr(m, "dilation", 1))
    pad = m.padding
    if isinstance(pad, str):
        pad = (0, 0) if pad == "valid" else tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
    pad = pair(pad)
    out = []
    for ax in range(2):
        span = d[ax] * (k[ax] - 1)
        expected = (math.ceil if getattr(m, "ceil_mode", False) else math.floor)(
            (c.in_shape[2 + ax] + 2 * pad[ax] - span - 1) / s[ax]
        ) + 1
        if expected != c.out_shape[2 + ax]:  # padding decided at run time (TF "same"): bound both sides
            out.append((span, span, s[ax]))
        else:
            out.append((pad[ax], max(span - pad[ax], 0), s[ax]))
    return out


@dataclass
class _Node:
    """A possible boundary (index 0 is the input image)."""

    call: _Call | None
    size: tuple[int, int]  # its grid
    stride: tuple[int, int]  # total stride from the input
    elements: int  # C * H * W of its output
    reach_px: tuple[tuple[int, int], tuple[int, int]]  # cumulative (left, right) per axis, input pixels
    cost_before: float  # estimated cost of everything up to its end
    leaves: list[tuple[_Call, list[tuple[int, int, int]]]] = field(default_factory=list)  # local layers up to it


def _cost(c: _Call) -> float:
    out = c.calls * math.prod(c.out_shape) if c.out_shape else 0
    if isinstance(c.module, nn.Conv2d) and c.in_shape:
        macs = out * (c.in_shape[1] // c.module.groups) * math.prod(nn.modules.utils._pair(c.module.kernel_size))
        return macs + COPY_COST * out
    return COPY_COST * out


def _nodes(model: nn.Module, calls: list[_Call], size: tuple[int, int]) -> tuple[list[_Node], float]:
    """The input and every possible boundary in order, and the cost of a full forward."""
    spine = {model}
    for m in model.modules():  # parents come before their children
        if m in spine and (m is model or isinstance(m, nn.Sequential)):
            spine.update(m.children())
    total = float(sum(_cost(c) for c in calls if c.leaf)) or 1.0
    # the local prefix: leaves in start order until the first one that is not local
    local: list[tuple[_Call, list[tuple[int, int, int]]]] = []
    barrier = math.inf
    s_max = 1.0
    for c in calls:
        if not c.leaf:
            if c.calls != 1:
                barrier = c.start
                break
            continue
        r = _reach(c)
        if r is None:
            barrier = c.start
            break
        sp, out = _spatial(c.in_shape), _spatial(c.out_shape)
        s_in = max(size[0] / sp[0], size[1] / sp[1])
        if s_in > s_max * 1.01:  # the grid got coarser without a stride: a global reduction (e.g. SE)
            barrier = c.start
            break
        local.append((c, r))
        s_max = max(s_max, size[0] / out[0], size[1] / out[1])
    nodes = [_Node(None, size, (1, 1), 0, ((0, 0), (0, 0)), 0.0)]
    for c in sorted(calls, key=lambda c: c.end):
        if c.module not in spine or c.module is model or c.calls != 1 or _spatial(c.out_shape) is None:
            continue
        if c.end > barrier:
            break
        sp = _spatial(c.out_shape)
        stride = (round(size[0] / sp[0]), round(size[1] / sp[1]))
        if stride[0] % nodes[-1].stride[0] or stride[1] % nodes[-1].stride[1]:
            continue  # grids that do not nest
        leaves = [(cc, r) for cc, r in local if cc.end <= c.end]
        reach = [[0, 0], [0, 0]]
        for cc, r in leaves:
            for ax in range(2):
                s_in = size[ax] / _spatial(cc.in_shape)[ax]
                reach[ax][0] += math.ceil(s_in * r[ax][0])
                reach[ax][1] += math.ceil(s_in * r[ax][1])
        cost = float(sum(_cost(cc) for cc in calls if cc.leaf and cc.end <= c.end))
        nodes.append(_Node(c, sp, stride, math.prod(c.out_shape[1:]), tuple(map(tuple, reach)), cost, leaves))
    return nodes, total


@dataclass
class _Stage:
    """Crop geometry of one stage (from node ``i`` to node ``j``) along one axis, per window start."""

    crop: int  # crop length in cells of the stage's input grid
    a: list[int]  # crop start per window start (input grid cells)
    j0: list[int]  # first reachable cell of the output grid
    j1: list[int]  # last reachable cell (inclusive)


def _stage_axis(nodes: list[_Node], i: int, j: int, ax: int, patch: int, starts: list[int]) -> _Stage:
    src, dst = nodes[i], nodes[j]
    n_in, n_out = src.size[ax], dst.size[ax]
    s_rel = dst.stride[ax] // src.stride[ax]
    big_s = dst.stride[ax]
    left_px, right_px = dst.reach_px[ax]
    # the stage's own reach in input-grid cells
    l_rel = r_rel = 0
    for cc, r in dst.leaves:
        if src.call is not None and cc.start < src.call.end:
            continue
        s_in = src.size[ax] / _spatial(cc.in_shape)[ax]  # layer's input stride / stage's input stride
        l_rel += math.ceil(s_in * r[ax][0])
        r_rel += math.ceil(s_in * r[ax][1])
    rows = []
    for y in starts:
        j0 = max(0, -((right_px - y) // big_s))  # ceil((y - R) / S)
        j1 = min(n_out - 1, (y + patch - 1 + left_px) // big_s)
        lo = max(0, s_rel * j0 - l_rel)
        hi = min(n_in - 1, s_rel * j1 + r_rel)
        rows.append((j0, j1, lo, hi))
    need = max(hi + 1 - (lo // s_rel) * s_rel for _, _, lo, hi in rows)
    crop = min(n_in, need + (n_in - need) % s_rel)  # the input grid's size modulo s_rel
    a = [min((lo // s_rel) * s_rel, n_in - crop) for _, _, lo, _ in rows]
    return _Stage(crop, a, [r[0] for r in rows], [r[1] for r in rows])


def _plan(nodes: list[_Node], total: float, patch: tuple[int, int], starts: tuple[list[int], list[int]]):
    """Boundaries minimising the estimated cost (dynamic programming over the nodes)."""
    n = len(nodes)
    stages: dict[tuple[int, int], tuple[_Stage, _Stage, float]] = {}
    for i in range(n):
        for j in range(i + 1, n):
            sy = _stage_axis(nodes, i, j, 0, patch[0], starts[0])
            sx = _stage_axis(nodes, i, j, 1, patch[1], starts[1])
            frac = (sy.crop / nodes[i].size[0]) * (sx.crop / nodes[i].size[1])
            stages[i, j] = (sy, sx, (nodes[j].cost_before - nodes[i].cost_before) * frac)
    best: list[tuple[float, list[int]]] = [(0.0, [0])] + [(math.inf, [])] * (n - 1)
    for j in range(1, n):
        for i in range(j):
            if best[i][0] == math.inf:
                continue
            cost = best[i][0] + stages[i, j][2]
            if i > 0:  # the hook at node i builds the crop for this stage
                sy, sx, _ = stages[i, j]
                cost += COPY_COST * 2 * nodes[i].elements * (sy.crop / nodes[i].size[0]) * (sx.crop / nodes[i].size[1])
            if cost < best[j][0]:
                best[j] = (cost, best[i][1] + [j])
    options = []
    for j in range(1, n):
        if best[j][0] < math.inf:
            cost = best[j][0] + (total - nodes[j].cost_before) + COPY_COST * 2 * nodes[j].elements
            options.append((cost, best[j][1]))
    if not options:
        return None
    cost, path = min(options, key=lambda o: o[0])
    return cost, path, [stages[path[k], path[k + 1]][:2] for k in range(len(path) - 1)]


class CropEvaluator:
    """Runs a private copy of the model stage by stage on crops; hooks on the boundaries swap in
    the next stage's crop (or, after the last, the full map)."""

    name = "crop"

    def __init__(self, private: nn.Module, nodes: list[_Node], stages: list[tuple[_Stage, _Stage]],
                 starts: tuple[list[int], list[int]]) -> None:
        self.model = private
        self.nodes = nodes  # the chosen boundaries, nodes[0] the input
        self.stages = stages  # stages[k]: from nodes[k] to nodes[k + 1]
        self.index_y = {y: i for i, y in enumerate(starts[0])}
        self.index_x = {x: i for i, x in enumerate(starts[1])}
        self.clean: list[Tensor | None] = [None] * len(nodes)
        self._clean_of: Tensor | None = None
        self._windows: list[tuple[int, int]] | None = None
        self._handles = [
            node.call.module.register_forward_hook(self._hook(k)) for k, node in enumerate(nodes) if k > 0
        ]
        self.split_names = [node.call.name for node in nodes[1:]]

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, k: int):
        def hook(module: nn.Module, args: object, out: Tensor) -> Tensor | None:
            windows = self._windows
            if windows is None:  # the clean pass
                self.clean[k] = out.clone()
                return None
            sy, sx = self.stages[k - 1]
            ry = self.nodes[k].stride[0] // self.nodes[k - 1].stride[0]
            rx = self.nodes[k].stride[1] // self.nodes[k - 1].stride[1]
            clean = self.clean[k]
            last = k == len(self.nodes) - 1
            if last:
                new = clean.expand(out.shape[0], *clean.shape[1:]).clone()
            else:
                ny, nx = self.stages[k]
            for w, (iy, ix) in enumerate(windows):
                if not last:
                    ay, ax = ny.a[iy], nx.a[ix]
                    if w == 0:
                        new = out.new_empty(out.shape[0], out.shape[1], ny.crop, nx.crop)
                    new[w] = clean[0, :, ay : ay + ny.crop, ax : ax + nx.crop]
                    lo_y, hi_y = max(sy.j0[iy], ay), min(sy.j1[iy], ay + ny.crop - 1)
                    lo_x, hi_x = max(sx.j0[ix], ax), min(sx.j1[ix], ax + nx.crop - 1)
                else:
                    ay = ax = 0
                    lo_y, hi_y, lo_x, hi_x = sy.j0[iy], sy.j1[iy], sx.j0[ix], sx.j1[ix]
                if lo_y > hi_y or lo_x > hi_x:
                    continue
                oy, ox = sy.a[iy] // ry, sx.a[ix] // rx  # where this stage's output starts
                new[w, :, lo_y - ay : hi_y - ay + 1, lo_x - ax : hi_x - ax + 1] = out[
                    w, :, lo_y - oy : hi_y - oy + 1, lo_x - ox : hi_x - ox + 1
                ]
            return new

        return hook

    def __call__(self, x: Tensor, base: Tensor, windows: list[tuple[int, int, int]], patch: tuple[int, int]) -> Tensor:
        if self._clean_of is not x:
            self._windows = None
            self.model(x)
            self._clean_of = x
        ph, pw = patch
        sy, sx = self.stages[0]
        crops = x.new_empty(len(windows), x.shape[1], sy.crop, sx.crop)
        idx = []
        for w, (_, y, xx) in enumerate(windows):
            iy, ix = self.index_y[y], self.index_x[xx]
            a, b = sy.a[iy], sx.a[ix]
            crops[w] = x[0, :, a : a + sy.crop, b : b + sx.crop]
            crops[w, :, y - a : y - a + ph, xx - b : xx - b + pw] = base[0, :, y : y + ph, xx : xx + pw]
            idx.append((iy, ix))
        self._windows = idx
        try:
            return self.model(crops)
        finally:
            self._windows = None


def _structure(
    model: nn.Module, x: Tensor, patch: tuple[int, int], starts_y: list[int], starts_x: list[int]
) -> tuple[nn.Module, list[_Node], float, tuple | None]:
    """The private copy, its boundary nodes, the total cost and the plan for images shaped like
    ``x``: read once per model, weights, input shape and window grid, and remembered (a folder of
    same-sized images pays the copy and the analysis once; each call still checks its windows)."""
    from ..layers import remembered

    # the weights' in-place version counters and storage: a changed weight means a new copy
    stamp = tuple((t._version, t.data_ptr()) for t in model.state_dict(keep_vars=True).values())
    key = ("convlens.occlusion.crop-structure", tuple(x.shape[1:]), x.dtype, x.device, patch,
           tuple(starts_y), tuple(starts_x), stamp)

    def compute() -> tuple[nn.Module, list[_Node], float, tuple | None]:
        height, width = x.shape[-2:]
        private = copy.deepcopy(model).eval()
        for m in private.modules():  # the caller's hooks stay on the caller's model
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
                d = getattr(m, attr, None)
                if d:
                    d.clear()
        calls = _record(private, x[:1])
        nodes, total = _nodes(private, calls, (height, width))
        return private, nodes, total, _plan(nodes, total, patch, (starts_y, starts_x))

    return remembered(model, key, compute)


def build_fast_evaluator(
    model: nn.Module,
    x: Tensor,
    base: Tensor,
    patch: tuple[int, int],
    starts_y: list[int],
    starts_x: list[int],
) -> CropEvaluator | None:
    """A :class:`CropEvaluator` for ``model`` on images shaped like ``x``, or ``None`` when the
    model's structure is not understood, the crops would not save enough work, or the check fails."""
    from .occlusion import _PlainEvaluator

    try:
        private, nodes, total, plan = _structure(model, x, patch, starts_y, starts_x)
    except Exception as e:  # a structure we cannot read: the plain path is always right
        log.info("occlusion: no crop path (%s: %s)", type(e).__name__, e)
        return None
    if plan is None or plan[0] > (1 - MIN_GAIN) * total:
        log.info("occlusion: crops would not pay here; one full forward per window")
        return None
    cost, path, stages = plan
    ev = CropEvaluator(private, [nodes[k] for k in path], stages, (starts_y, starts_x))
    # check the first, a middle and the last window against the user's own model
    n = len(starts_y) * len(starts_x)
    picks = sorted({0, (len(starts_y) // 2) * len(starts_x) + len(starts_x) // 2, n - 1})
    windows = [(i, starts_y[i // len(starts_x)], starts_x[i % len(starts_x)]) for i in picks]
    try:
        with torch.no_grad():
            fast = ev(x[:1], base[:1], windows, patch)
            ref = _PlainEvaluator(model)(x[:1], base[:1], windows, patch)
        # logits to float32 rounding, and probabilities to 1e-6
        err = float((fast - ref).abs().max()) / (1e-5 * max(1.0, float(ref.abs().max())))
        err = max(err, float((fast.float().softmax(1) - ref.float().softmax(1)).abs().max()) / 1e-6)
    except Exception as e:
        ev.close()
        log.info("occlusion: the crop path failed its check (%s: %s); one full forward per window", type(e).__name__, e)
        return None
    if not err <= 1.0:
        ev.close()
        log.info("occlusion: the crop path differs from full forwards (%.3g x tolerance); one full forward per window",
                 err)
        return None
    log.info(
        "occlusion: crops through %s (first crop %dx%d px), estimated %.0f%% of the plain work",
        ", ".join(ev.split_names), stages[0][0].crop, stages[0][1].crop, 100 * cost / total,
    )
    ev.estimate = cost / total
    return ev
