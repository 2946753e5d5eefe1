"""How the crop engine of :mod:`convlens.methods._occlusion_fast` reads a network and plans its
crops: the recorded module calls of one forward (:func:`_record`), the spatial reach of each
(kernel, stride, padding), the chain of nodes and their cost, the exact and approximate regions a
window touches at each boundary, and the cheapest set of boundaries (:func:`_plan`, by dynamic
programming). Nothing here runs a crop; the evaluator and its checks are in ``_occlusion_fast``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..hooks import forward_hooks

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

    with forward_hooks() as add, torch.no_grad():
        for name, m in model.named_modules():
            add(m, pre(name), pre=True)
            add(m, post)
        model(x)
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
        if expected != c.out_shape[2 + ax] and c.out_shape[2 + ax] == -(-c.in_shape[2 + ax] // s[ax]):
            # TF "same", padded at run time by ``total`` cells: either side may get the odd one
            total = max((c.out_shape[2 + ax] - 1) * s[ax] + span + 1 - c.in_shape[2 + ax], 0)
            out.append((-(-total // 2), span - total // 2, s[ax]))
        elif expected != c.out_shape[2 + ax]:  # padding decided at run time some other way: bound both sides
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


def _reach_sums(src: _Node, leaves: list[tuple[_Call, list[tuple[int, int, int]]]], ax: int) -> list[tuple[int, int]]:
    """(left, right) reach in ``src``'s cells of the local layers after ``src`` up to each of
    ``leaves`` (item ``m``: the first ``m`` layers after ``src``'s own; a node's ``leaves`` are a
    prefix of a later node's)."""
    sums = [(0, 0)]
    for cc, r in leaves[len(src.leaves):]:
        s_in = src.size[ax] / _spatial(cc.in_shape)[ax]  # layer's input stride / stage's input stride
        sums.append((sums[-1][0] + math.ceil(s_in * r[ax][0]), sums[-1][1] + math.ceil(s_in * r[ax][1])))
    return sums


def _exact_regions(node: _Node, ax: int, patch: int, starts: list[int]) -> list[tuple[int, int]]:
    """Per window start, the first and last cell of ``node`` whose field meets the window: cell
    ``j`` sees input pixels ``[S*j - L, S*j + R]``."""
    left, right = node.reach_px[ax]
    big_s, n = node.stride[ax], node.size[ax]
    return [(max(0, -((right - y) // big_s)), min(n - 1, (y + patch - 1 + left) // big_s)) for y in starts]


def _approx_regions(node: _Node, ax: int, patch: int, starts: list[int], tau: float,
                    exact: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The central part of each exact region: the window itself plus the part of the layers'
    reach that carries a share ``tau`` of the receptive-field weight.

    The receptive-field weight is modelled as a Gaussian (the effective receptive field of Luo et
    al. 2016) whose variance is the sum of the variances of the uniform footprints of the local
    layers up to the boundary and whose mean is shifted by their asymmetry (a network with uniform
    kernels). Its central share ``tau`` is ``mean +- z * sigma`` with ``z`` the ``(1 + tau) / 2``
    quantile of the normal law; the window grown by that much on both sides gives the cells kept
    (cell ``j`` at stride ``S`` sits at pixel ``S*j``). ``tau = 1`` keeps the whole exact region.
    """
    if tau >= 1:
        return list(exact)
    var = shift = 0.0
    for cc, r in node.leaves:
        s_in = node.stride[ax] * _spatial(node.call.out_shape)[ax] / _spatial(cc.in_shape)[ax]
        w = (r[ax][0] + r[ax][1]) * s_in
        var += w * (w + 2) / 12
        shift += (r[ax][0] - r[ax][1]) * s_in / 2
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + tau) / 2, dtype=torch.float64, device="cpu")))
    grow = z * math.sqrt(var)
    big_s = node.stride[ax]
    out = []
    for (a, b), y in zip(exact, starts):
        lo = math.ceil((y + shift - grow) / big_s)
        hi = math.floor((y + patch - 1 + shift + grow) / big_s)
        lo, hi = max(a, lo), min(b, hi)
        if lo > hi:  # keep at least the cell nearest to the window's centre
            c = min(max(round((y + (patch - 1) / 2 + shift) / big_s), a), b)
            lo = hi = c
        out.append((lo, hi))
    return out


@dataclass
class _Stage:
    """Crop geometry of one stage (from node ``i`` to node ``j``) along one axis, per window start.

    A batch's crops share one length: the longest ``need`` of its windows, so windows near the
    border, whose regions the border cuts, run on shorter crops when they share a batch. A crop
    starts at ``min(lo, n_in - length)``: a multiple of ``ratio`` that still holds the window's cells."""

    n_in: int  # the stage's input grid
    ratio: int  # stride ratio between the output and input grids
    lo: list[int]  # per window start, where its crop may start (a multiple of ``ratio``)
    need: list[int]  # per window start, the crop length it needs (same size as n_in modulo ratio)
    j0: list[int]  # first recomputed cell of the output grid
    j1: list[int]  # last recomputed cell (inclusive)

    @property
    def crop(self) -> int:
        """The longest crop any window needs."""
        return max(self.need)

    @property
    def mean(self) -> float:
        """The mean crop length over the window starts (the cost estimate of a batch of similar windows)."""
        return sum(self.need) / len(self.need)


def _stage_axis(src: _Node, dst: _Node, ax: int, regions: list[tuple[int, int]],
                reach: tuple[int, int] | None = None) -> _Stage:
    """The stage from ``src`` to ``dst`` recomputing ``regions`` of ``dst``; ``reach``: the
    (left, right) reach of its layers in ``src``'s cells, when already known."""
    n_in = src.size[ax]
    l_rel, r_rel = reach or _reach_sums(src, dst.leaves, ax)[-1]
    s_rel = dst.stride[ax] // src.stride[ax]
    lo, need = [], []
    for j0, j1 in regions:
        first = (max(0, s_rel * j0 - l_rel) // s_rel) * s_rel
        length = min(n_in - 1, s_rel * j1 + r_rel) + 1 - first
        lo.append(first)
        need.append(min(n_in, length + (n_in - length) % s_rel))  # the input grid's size modulo s_rel
    return _Stage(n_in, s_rel, lo, need, [r[0] for r in regions], [r[1] for r in regions])


def _stage_cost(src: _Node, dst: _Node, crop_y: float, crop_x: float, hooked: bool) -> float:
    """Estimated cost of one window's stage from ``src`` to ``dst`` on a crop of ``crop_y x
    crop_x`` cells of ``src``'s grid; ``hooked``: ``src`` is a boundary whose hook builds the crop
    (a copy of its cells)."""
    frac = (crop_y / src.size[0]) * (crop_x / src.size[1])
    return (dst.cost_before - src.cost_before + (COPY_COST * 2 * src.elements if hooked else 0.0)) * frac


def _tail_cost(last: _Node, total: float) -> float:
    """Estimated cost of one window's rest of the network after the last boundary, on the full
    map (pasted into a copy of the clean one)."""
    return total - last.cost_before + COPY_COST * 2 * last.elements


def _plan(nodes: list[_Node], total: float, regions: list[tuple[list, list]]):
    """Boundaries minimising the estimated cost (dynamic programming over the nodes), each
    stage's crops costed at the longest length any window needs: an upper bound (a batch of
    windows that need shorter crops runs on those, see :class:`CropEvaluator`). Costing them at
    their mean length would pick more, deeper boundaries (ResNet-50: through layer4.2, the default
    model: through its head convolution), measured no faster in approximate mode and 2% faster in
    exact mode on 2 CPU cores; in approximate mode every boundary also cuts the window's influence,
    and the default model's refined map lost Pearson r with the exact one (chelsea: 0.954 -> 0.943).

    ``regions[j]``: per axis, the (first, last) recomputed cell of node ``j`` per window start.
    Returns ``(cost, path, stages)`` or ``None``.
    """
    n = len(nodes)
    stages: dict[tuple[int, int], tuple[_Stage, _Stage, float]] = {}
    for i in range(n):
        sums = [_reach_sums(nodes[i], nodes[-1].leaves, ax) for ax in range(2)]
        for j in range(i + 1, n):
            m = len(nodes[j].leaves) - len(nodes[i].leaves)
            sy = _stage_axis(nodes[i], nodes[j], 0, regions[j][0], sums[0][m])
            sx = _stage_axis(nodes[i], nodes[j], 1, regions[j][1], sums[1][m])
            stages[i, j] = (sy, sx, _stage_cost(nodes[i], nodes[j], sy.crop, sx.crop, i > 0))
    best: list[tuple[float, list[int]]] = [(0.0, [0])] + [(math.inf, [])] * (n - 1)
    for j in range(1, n):
        for i in range(j):
            if best[i][0] == math.inf:
                continue
            cost = best[i][0] + stages[i, j][2]
            if cost < best[j][0]:
                best[j] = (cost, best[i][1] + [j])
    options = []
    for j in range(1, n):
        if best[j][0] < math.inf:
            options.append((best[j][0] + _tail_cost(nodes[j], total), best[j][1]))
    if not options:
        return None
    cost, path = min(options, key=lambda o: o[0])
    return cost, path, [stages[path[k], path[k + 1]][:2] for k in range(len(path) - 1)]
