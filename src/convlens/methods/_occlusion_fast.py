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
Reading the network and planning the crops is :mod:`convlens.methods._occlusion_plan`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._inference import check_tolerance, private_copy
from ._occlusion_plan import (
    MIN_GAIN,
    _approx_regions,
    _exact_regions,
    _Node,
    _nodes,
    _plan,
    _record,
    _Stage,
    _stage_axis,
    _stage_cost,
    _tail_cost,
)

log = logging.getLogger(__name__)


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
