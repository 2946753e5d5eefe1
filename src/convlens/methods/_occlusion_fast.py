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
last window against full forwards of the user's model before it is used, to the rounding of the
device's precision (:func:`check_tolerance`). Anything not understood (an unknown layer type
inside the prefix, a module run twice, a mismatch) means the plain path, and the reason is logged.

What makes it fast besides the crops: the private copy runs in channels-last memory (the CPU's
and cuDNN's fast layout for convolutions, depthwise ones most of all) with every batch norm that
directly follows a convolution folded into it; a batch's crops are gathered, and its recomputed
cells pasted, with index tensors for all windows at once (no Python loop over windows, which also
keeps a GPU busy); the clean pass runs once per group of images. TF "same" padding (decided at
run time, e.g. timm's ``Conv2dSame``) is read from the sizes instead of bounded by the kernel. The
crops of one batch share a length per stage, the longest its own windows need: windows whose
regions the border cuts need shorter ones, and :meth:`CropEvaluator.order` batches windows that
need alike lengths together (ResNet-50 at patch 16 / stride 8: 0.20 instead of 0.24 of the plain
work in approximate mode, 0.51 instead of 0.535 in exact mode). The boundaries are still chosen
with every window's crop at the longest length (:func:`_plan`).

Batches mix windows of several images (each job names its image); the clean pass runs once per
group of images. The approximate path (``tau``) runs the same machinery on smaller regions: at each
boundary only the window's cells plus the central share ``tau`` of their growth (a Gaussian model
of the receptive-field weight, :func:`_approx_regions`); the other cells keep their clean values.
It is checked with exact regions on the same boundaries (what it computes that is not a choice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._inference import check_tolerance, private_copy
from ..hooks import forward_hooks

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
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + tau) / 2, dtype=torch.float64)))
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


def _cells(t: Tensor, img: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``t[img[b], :, rows[b, i], cols[b, j]]`` as a contiguous (B, I, J, C) tensor (one gather for
    a whole batch of crops; ``rows = cols = None``: the whole map)."""
    nhwc = t.permute(0, 2, 3, 1)
    if rows is None or cols is None:
        return nhwc[img].contiguous()  # a copy of whole channels-last maps; NCHW ones are transposed
    return nhwc[img[:, None, None], rows[:, :, None], cols[:, None, :]].contiguous()


class CropEvaluator:
    """Runs a private copy of the model stage by stage on crops; hooks on the boundaries swap in
    the next stage's crop (or, after the last, the full map). Windows of several images can share
    a batch: each job is ``(image, row index, column index)`` into the window starts.

    Crops are gathered and pasted with index tensors for the whole batch at once (no Python loop
    over windows): every boundary builds its new tensor as the clean cells of the next crop with
    the recomputed ones (the region of each window) taken from the stage's output. A batch's crops
    at a stage are as long as the longest its windows need (windows near the border need shorter
    ones); :meth:`order` puts windows that need alike crops into the same batches. ``work`` adds up
    the estimated cost of what ran (the crops' actual sizes), in full forwards."""

    name = "crop"

    def __init__(self, private: nn.Module, nodes: list[_Node], stages: list[tuple[_Stage, _Stage]],
                 starts: tuple[list[int], list[int]], patch: tuple[int, int], device: torch.device,
                 total: float) -> None:
        self.model = private
        self.layout = private.convlens_layout  # memory format of the crops (see convlens._inference.private_copy)
        self.nodes = nodes  # the chosen boundaries, nodes[0] the input
        self.starts = starts
        self.patch = patch
        self.total = total  # estimated cost of a full forward
        self.device = device
        self.use(stages)
        # the window itself is the "region" of the input image
        self._window = [torch.tensor([s, [v + p - 1 for v in s]], device=device) for s, p in zip(starts, patch)]
        self.clean: list[Tensor | None] = [None] * len(nodes)
        self._clean_of: tuple | None = None
        self._jobs: tuple[Tensor, Tensor, Tensor] | None = None  # image, row and column index per job
        self._crops: list[list[tuple[int, Tensor]]] = []  # per stage and axis: the batch's crop length, starts
        self._handles = [
            node.call.module.register_forward_hook(self._hook(k)) for k, node in enumerate(nodes) if k > 0
        ]
        self.split_names = [node.call.name for node in nodes[1:]]
        self.estimate = 1.0
        self.work = 0.0

    def use(self, stages: list[tuple[_Stage, _Stage]]) -> None:
        """Run on these stages from now on (the same boundaries, other regions: the approximate
        path after its check with exact ones; the clean pass is kept)."""
        self.stages = stages  # stages[k]: from nodes[k] to nodes[k + 1]
        # per stage and axis, per window start: earliest crop start, first and last recomputed output cell
        self._geo = [
            [torch.tensor([st.lo, st.j0, st.j1], device=self.device) for st in stage] for stage in stages
        ]

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def order(self, jobs: list[tuple[int, int, int]], batch: int) -> list[tuple[int, int, int]]:
        """``jobs`` reordered so that batches of ``batch`` hold windows that need alike crops: the
        window starts of each axis are ranked by the cost of the crops they need, and the jobs are
        walked in bands of about ``sqrt(batch)`` row ranks, by column rank within a band."""
        def cost(ax: int, i: int) -> float:  # window start i's crops along axis ax, mean ones along the other
            total = 0.0
            for k, stage in enumerate(self.stages):
                lengths = [st.mean for st in stage]
                lengths[ax] = stage[ax].need[i]
                total += _stage_cost(self.nodes[k], self.nodes[k + 1], *lengths, k > 0)
            return total

        ranks = []
        for ax in range(2):
            n = len(self.starts[ax])
            weight = [cost(ax, i) for i in range(n)]
            rank = [0] * n
            for r, i in enumerate(sorted(range(n), key=weight.__getitem__)):
                rank[i] = r
            ranks.append(rank)
        band = max(1, math.isqrt(batch))
        return sorted(jobs, key=lambda j: (ranks[0][j[1]] // band, ranks[1][j[2]], ranks[0][j[1]], j[0]))

    @staticmethod
    def _compose(fresh: Tensor, fresh_img: Tensor, fresh_at: list[Tensor], clean: Tensor, img: Tensor,
                 rows: list[Tensor], region: list[Tensor], whole: bool = False) -> Tensor:
        """(B, C, I, J), channels-last: cells ``rows[0][b] x rows[1][b]`` (grid indices, (B, I)
        and (B, J); ``whole``: they are the whole map) of ``clean[img[b]]``, those inside
        ``region`` (per axis a (2, B) first / last cell) replaced by ``fresh[fresh_img[b]]``'s,
        whose cell 0 sits at grid cell ``fresh_at[axis][b]``. One copy of the clean cells, then
        only the region's cells are gathered and written."""
        new = _cells(clean, img, *((None, None) if whole else rows))
        inside = [(r >= reg[0][:, None]) & (r <= reg[1][:, None]) for r, reg in zip(rows, region)]
        n_i, n_j = rows[0].shape[1], rows[1].shape[1]
        at = (inside[0][:, :, None] & inside[1][:, None, :]).flatten().nonzero().squeeze(1)
        b, i, j = at // (n_i * n_j), at // n_j % n_i, at % n_j
        src = fresh.permute(0, 2, 3, 1)[fresh_img[b], rows[0][b, i] - fresh_at[0][b], rows[1][b, j] - fresh_at[1][b]]
        new.view(-1, new.shape[-1]).index_copy_(0, at, src)
        return new.permute(0, 3, 1, 2)

    def _rows(self, k: int) -> list[Tensor]:
        """Per axis, the (B, crop) grid cells of stage ``k``'s crops in this batch."""
        return [a[:, None] + torch.arange(c, device=a.device) for c, a in self._crops[k]]

    def _hook(self, k: int):
        def hook(module: nn.Module, args: object, out: Tensor) -> Tensor | None:
            if self._jobs is None:  # the clean pass
                self.clean[k] = out.clone(memory_format=self.layout)
                return None
            img, job = self._jobs[0], self._jobs[1:]
            geo = self._geo[k - 1]  # the stage that made ``out``
            # where ``out`` starts on this boundary's grid
            at = [a // st.ratio for (_, a), st in zip(self._crops[k - 1], self.stages[k - 1])]
            region = [geo[ax][1:, job[ax]] for ax in range(2)]
            clean = self.clean[k]
            whole = k == len(self.nodes) - 1  # the full map for the rest of the network
            if whole:
                rows = [torch.arange(n, device=img.device).expand(len(img), n) for n in clean.shape[2:]]
            else:
                rows = self._rows(k)
            new = self._compose(out, torch.arange(len(img), device=img.device), at, clean, img, rows, region, whole)
            return new.contiguous(memory_format=self.layout)

        return hook

    def prepare(self, x: Tensor) -> None:
        """The clean pass of the images ``x``: the boundaries' outputs are kept for the windows
        (once per images: a view of the same memory, e.g. ``x[:1]`` and ``x[0:1]``, counts as one)."""
        key = (x.data_ptr(), x.shape, x.stride(), x._version, x.device)
        if self._clean_of != key:
            self._jobs = None
            self.model(x.contiguous(memory_format=self.layout))
            self._clean_of = key

    def __call__(self, x: Tensor, base: Tensor, jobs: list[tuple[int, int, int]]) -> Tensor:
        self.prepare(x)
        img, iy, ix = torch.tensor(jobs, device=x.device).T
        # per stage and axis: the longest crop the batch's windows need (read from the jobs on
        # the host: no device sync), and where each crop starts
        self._crops = []
        cost = _tail_cost(self.nodes[-1], self.total)
        for k, stage in enumerate(self.stages):
            lengths = [max(st.need[j[1 + ax]] for j in jobs) for ax, st in enumerate(stage)]
            self._crops.append([(c, self._geo[k][ax][0][i].clamp(max=st.n_in - c))
                                for ax, (c, st, i) in enumerate(zip(lengths, stage, (iy, ix)))])
            cost += _stage_cost(self.nodes[k], self.nodes[k + 1], *lengths, k > 0)
        # the window (all of it in exact mode; an approximate crop may cut it) from the baseline
        window = [self._window[ax][:, j] for ax, j in enumerate((iy, ix))]
        crops = self._compose(base, img, [torch.zeros_like(img)] * 2, x, img, self._rows(0), window)
        crops = crops.contiguous(memory_format=self.layout)
        self._jobs = (img, iy, ix)
        try:
            out = self.model(crops)
        finally:
            self._jobs = None
        self.work += len(jobs) * cost / self.total
        return out


def _structure(model: nn.Module, x: Tensor) -> tuple[nn.Module, list[_Node], float]:
    """The private copy (:func:`convlens._inference.private_copy`), its boundary nodes and the
    total cost for images shaped like ``x``: read once per copy and input shape, and remembered (a
    folder of same-sized images pays the copy and the analysis once; each call still checks its
    windows)."""
    from ..layers import remembered

    private = private_copy(model, x[:1])
    slot: dict[str, Any] = remembered(model, ("convlens.occlusion.crop-structure", tuple(x.shape[1:]), x.dtype,
                                              x.device), dict)
    if slot.get("copy") is not private:  # a new copy (changed weights) means a new analysis
        nodes, total = _nodes(private, _record(private, x[:1]), tuple(x.shape[-2:]))
        slot.clear()
        slot.update(copy=private, structure=(private, nodes, total))
    return slot["structure"]


def build_fast_evaluator(
    model: nn.Module,
    x: Tensor,
    base: Tensor,
    patch: tuple[int, int],
    starts_y: list[int],
    starts_x: list[int],
    *,
    reference: Callable[[Tensor, Tensor, list[tuple[int, int, int]]], Any],
    tau: float | None = None,
    reasons: list[str] | None = None,
    output: Callable[[Any], Tensor] = lambda out: out,
) -> CropEvaluator | None:
    """A :class:`CropEvaluator` for ``model`` on images shaped like ``x``, or ``None`` when the
    model's structure is not understood, the crops would not save enough work, or the check fails
    (the reason is logged and appended to ``reasons``). ``tau``: ``None`` for the exact path; a
    share in (0, 1] for the approximate one, which keeps at every boundary only the central cells
    carrying that share of the window's influence (see :func:`_approx_regions`). ``reference``:
    the plain evaluator (one full forward of the user's model per window, called as
    ``reference(x, base, jobs)``) the crop path is checked against before it is used."""

    def give_up(level: int, msg: str, *args: object) -> None:
        text = msg % args
        log.log(level, "occlusion: %s; one full forward per window", text)
        if reasons is not None:
            reasons.append(text)

    try:
        private, nodes, total = _structure(model, x)
        exact = [None] + [
            (_exact_regions(nd, 0, patch[0], starts_y), _exact_regions(nd, 1, patch[1], starts_x)) for nd in nodes[1:]
        ]
        regions = exact
        if tau is not None:
            regions = [None] + [
                (_approx_regions(nd, 0, patch[0], starts_y, tau, ex[0]),
                 _approx_regions(nd, 1, patch[1], starts_x, tau, ex[1]))
                for nd, ex in zip(nodes[1:], exact[1:])
            ]
        plan = _plan(nodes, total, regions)
    except Exception as e:  # a structure we cannot read: the plain path is always right
        give_up(logging.INFO, "no crop path (%s: %s)", type(e).__name__, e)
        return None
    if plan is None or plan[0] > (1 - MIN_GAIN) * total:
        give_up(logging.INFO, "crops would not pay here")
        return None
    cost, path, stages = plan
    chosen = [nodes[k] for k in path]
    # check the first, a middle and the last window against the user's own model; the approximate
    # path is checked on its boundaries with exact regions (what it computes that is not a choice)
    if tau is not None:
        exact_stages = [
            (_stage_axis(nodes[i], nodes[j], 0, exact[j][0]), _stage_axis(nodes[i], nodes[j], 1, exact[j][1]))
            for i, j in zip(path, path[1:])
        ]
    ev = CropEvaluator(private, chosen, stages if tau is None else exact_stages, (starts_y, starts_x), patch,
                       x.device, total)
    ny, nx = len(starts_y), len(starts_x)
    picks = sorted({(0, 0), (ny // 2, nx // 2), (ny - 1, nx - 1)})
    jobs = [(0, iy, ix) for iy, ix in picks]
    rel = check_tolerance(x.device, x.dtype)
    try:
        with torch.no_grad():
            # through the classifier's output adapter (tuple, dict, .logits, output=)
            fast = output(ev(x[:1], base[:1], jobs)).float()
            ref = output(reference(x[:1], base[:1], jobs)).float()
        # logits to the device's rounding relative to their size, probabilities to it absolutely
        err = float((fast - ref).abs().max()) / (rel * max(1.0, float(ref.abs().max())))
        err = max(err, float((fast.softmax(1) - ref.softmax(1)).abs().max()) / rel)
    except Exception as e:
        ev.close()
        give_up(logging.WARNING, "the crop path failed its check (%s: %s)", type(e).__name__, e)
        return None
    if not err <= 1.0:
        ev.close()
        give_up(logging.WARNING, "the crop path differs from full forwards by %.3g x the tolerance (%.0e relative)",
                err, rel)
        return None
    if tau is not None:  # the same boundaries and clean pass, the approximate regions
        ev.use(stages)
    log.info(
        "occlusion: %s crops through %s (first crop %dx%d px), estimated %.1f%% of the plain work",
        "exact" if tau is None else f"approximate (tau {tau:g})", ", ".join(ev.split_names),
        stages[0][0].crop, stages[0][1].crop, 100 * cost / total,
    )
    ev.estimate = cost / total
    return ev
