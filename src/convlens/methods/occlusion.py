"""Occlusion sensitivity: hide one window of the image at a time and record how much the score drops.

For a window ``w`` and target score ``s`` (probability or logit of the target class, summed over a
:class:`convlens.Region` of a dense output, or a custom callable),
``drop[w] = s(x) - s(x with w replaced by the baseline)``. The map at a pixel is
the mean of ``drop[w]`` over the windows ``w`` that cover it. Windows start at ``0, stride,
2*stride, ...`` along each axis and, when ``(size - patch) % stride != 0``, one more window sits
flush with the far edge, so every pixel is covered (the tutorial's loop leaves the last rows and
columns uncovered).

Windows are streamed in chunks, so memory stays bounded for any image size and stride. The exact
speed-up (recomputing, on a private copy of the model, only the region a window can reach, see
``_occlusion_fast.py``) is checked against the plain model on every call and gives the same map to
float32 rounding. ``mode="approximate"`` recomputes less (the central part of that region) and
``refine=`` evaluates a coarse lattice of windows first and drills down to the full stride only
in its strongest cells, interpolating the rest: both give a close map, not the same one, and say
how much work they did in ``settings["work"]`` (and ``settings["windows_evaluated"]``).
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._batching import default_batch
from .._compat import MODEL_AND_IMAGES, renamed
from ..baselines import BASELINES, MAX_BASELINE, make_baseline  # noqa: F401 -- BASELINES: the old name
from ..baselines import gaussian_blur as _gaussian_blur  # noqa: F401 -- the old name
from ..checks import require_finite, warn_constant
from ..hooks import model_guard
from ..models import Classifier, as_classifier
from ..results import Saliency
from ..targets import ResolvedTarget, Target, index_tensor, resolve_target

__all__ = ["fit_window", "occlusion", "window_starts"]

log = logging.getLogger(__name__)

Score = Literal["probability", "logit"]
SCORES: tuple[Score, ...] = ("probability", "logit")
DEFAULT_TAU = 0.9  # share of the modelled influence the approximate mode keeps at each boundary
# share of the cells refined at each level with refine=True: the smallest that keeps Pearson r >= 0.95
# with the exact map on the five natural photos at patch 16 / stride 8, in both modes (BENCHMARKS.md)
DEFAULT_REFINE = 0.3


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: ``0, stride, ...`` up to ``size - patch``, plus a
    window flush with the far edge when the stride does not land on it, so every pixel is covered.

    Example::

        window_starts(224, 40, 20)   # [0, 20, ..., 180, 184]
    """
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def fit_window(patch: Any, stride: Any, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The windows of a driver's occlusion settings (``explain``, ``compare``) for an image of
    ``height`` x ``width``: ``(patch, stride)`` as given when the patch fits, else both scaled by
    ``min(height, width) / 224`` (the image size the defaults are chosen for; at least 1 px, the
    patch cut to the image), logged. A small model input (32 px) keeps a map instead of failing.

    Example::

        fit_window(56, 28, 32, 32)   # ((8, 8), (4, 4))
    """
    (ph, pw), (sh, sw) = _pair(patch, "patch"), _pair(stride, "stride")
    if ph <= height and pw <= width:
        return (ph, pw), (sh, sw)
    scale = min(height, width) / 224

    def fit(v: int, size: int) -> int:
        return max(1, min(size, round(v * scale)))

    fitted = (fit(ph, height), fit(pw, width)), (fit(sh, height), fit(sw, width))
    log.warning("occlusion: a %dx%d window does not fit the %dx%d image: patch %s, stride %s instead",
                ph, pw, height, width, fitted[0], fitted[1])
    return fitted


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive int or an (h, w) pair of them, not a bool")
    if isinstance(value, int):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{what} must be a positive int or an (h, w) pair of them, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{what} must be at least 1 pixel, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _coverage_matrix(size: int, patch: int, starts: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size, windows) 0/1 matrix: pixel ``i`` lies in window ``j``."""
    pix = torch.arange(size, device=device)[:, None]
    s = torch.tensor(starts, device=device)[None, :]
    return ((pix >= s) & (pix < s + patch)).to(dtype)


def blur_sigma_for(patch: tuple[int, int], blur_sigma: float | None) -> float:
    """Occlusion's ``"blur"`` sigma: ``blur_sigma`` when given, else ``max(patch) / 4`` px (detail
    inside the window is gone, colours stay; 10 px for the default 40 px window)."""
    return max(patch) / 4 if blur_sigma is None else blur_sigma  # checked by make_baseline


def _baseline(baseline: Any, x: Tensor, patch: tuple[int, int], blur_sigma: float | None = None) -> Tensor:
    """The replacement values, broadcastable to ``x`` (N, C, H, W) (:func:`blur_sigma_for`)."""
    return make_baseline(baseline, x, sigma=blur_sigma_for(patch, blur_sigma))


#: Windows per forward on a CPU (:func:`convlens._batching.default_batch` caps them by memory; on
#: CUDA the free memory decides). The crop path: its stages run on small crops and its last layers
#: on the full map, where a batch uses the cores far better (ResNet-50 at patch 16 / stride 8, 2
#: threads, 6.4x single forwards at 16, 4.1x at 8, 3.0x at 4; since each batch's crops are as long
#: as its own windows need, 32 takes 9% less time than 16 on ResNet-50 approximate + refine, 14%
#: approximate, the same exact, and 19-22% less on the default model). Full forwards through the
#: private copy (channels-last, batch norms folded): 4 (ResNet-50 1.5x, EfficientNet-Lite0 2.6x
#: the model's own forwards one at a time). The user's own model: 1.
CROP_BATCH, COPY_BATCH = 32, 4

#: the device types where the crop path is tried. On a GPU, full forwards through the private copy
#: with as many windows per batch as half the free memory holds (and the windows of every image in
#: the same batches) win: measured on an H200, one image at 40/20, the crop path ran 0.79x brute
#: force on ResNet-50 and 0.06x on the default model (its first call set up many crop shapes),
#: captum's plain batches 8.2x and 7.5x. There an approximate map is computed exactly.
CROP_DEVICES = ("cpu",)


class _Scorer:
    """The (B,) scores of a model output whose rows belong to the images ``rows`` (the chosen
    class's probability or logit, over a Region too, or the callable's value), through
    :meth:`ResolvedTarget.score`."""

    def __init__(self, score: str, resolved: ResolvedTarget, adapt: Callable[[Any], Tensor]) -> None:
        self.probability, self.resolved, self.adapt = score == "probability", resolved, adapt

    def __call__(self, out: Any, rows: list[int]) -> Tensor:
        out = self.adapt(out)  # the raw model output -> the tensor to explain (tuple, dict, .logits, output=)
        return self.resolved.select(rows).score(out, self.probability).float()


class _PlainEvaluator:
    """One full forward per window: the occluded images are built chunk by chunk. A job is
    ``(image, row index, column index)`` into the window starts."""

    name = "plain"

    def __init__(self, model: nn.Module, starts: tuple[list[int], list[int]], patch: tuple[int, int]) -> None:
        self.model, self.starts, self.patch = model, starts, patch
        self.work = 0.0  # full forwards run

    def prepare(self, x: Tensor) -> None:
        pass

    def order(self, jobs: list[tuple[int, int, int]], batch: int) -> list[tuple[int, int, int]]:
        """The order to run ``jobs`` in, ``batch`` at a time: any order does."""
        return jobs

    def __call__(self, x: Tensor, base: Tensor, jobs: list[tuple[int, int, int]]) -> Tensor:
        self.work += len(jobs)
        ph, pw = self.patch
        batch = x[index_tensor([j[0] for j in jobs], x.device)]
        for k, (img, iy, ix) in enumerate(jobs):
            y, xx = self.starts[0][iy], self.starts[1][ix]
            batch[k, :, y : y + ph, xx : xx + pw] = base[img, :, y : y + ph, xx : xx + pw]
        return self.model(batch)


MODES = ("exact", "approximate")


def _share(refine: Any) -> float | None:
    """``refine=`` as a share in (0, 1] (True: :data:`DEFAULT_REFINE`) or None (off)."""
    if refine is None or refine is False:
        return None
    if refine is True:
        return DEFAULT_REFINE
    if not isinstance(refine, (int, float)) or not 0 < refine <= 1:  # NaN fails the comparison too
        raise ValueError(f"refine must be a share in (0, 1], True (the default, {DEFAULT_REFINE}) or None, "
                         f"got {refine!r}")
    return float(refine)


def _run_jobs(evaluator: Any, x: Tensor, base: Tensor, jobs: list[tuple[int, int, int]], bs: int,
              scorer: _Scorer, clean: Tensor, drops: Tensor, offset: int, bar: Any) -> None:
    """drops[offset + image, iy, ix] = clean score - occluded score, ``bs`` windows at a time (in
    the evaluator's order)."""
    jobs = evaluator.order(jobs, bs)
    for k in range(0, len(jobs), bs):
        chunk = jobs[k : k + bs]
        rows = [j[0] for j in chunk]
        scores = scorer(evaluator(x, base, chunk), [offset + r for r in rows])
        img, iy, ix = index_tensor(chunk, drops.device).T  # one copy per batch, without waiting
        drops[offset + img, iy, ix] = clean[offset + img] - scores
        bar.update(len(chunk))


def _lattice(n: int, step: int) -> list[int]:
    """Every ``step``-th window index along an axis, and the last one (the window flush with the
    far edge), so the lattice spans the whole axis."""
    idx = list(range(0, n, step))
    return idx if idx[-1] == n - 1 else idx + [n - 1]


def _brackets(n: int, lattice: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per window index ``i`` along an axis: the lattice indices at or around it (``lo <= i <=
    hi``, equal when ``i`` is on the lattice) and the linear weight of ``hi``."""
    lo, hi, w = [], [], []
    for i in range(n):
        k = bisect.bisect_right(lattice, i) - 1
        k2 = k if lattice[k] == i else k + 1
        lo.append(lattice[k])
        hi.append(lattice[k2])
        w.append(0.0 if k2 == k else (i - lattice[k]) / (lattice[k2] - lattice[k]))
    weights = torch.tensor(w, dtype=torch.float64, device="cpu")  # the refinement's plan is kept on the host
    return torch.tensor(lo, device="cpu"), torch.tensor(hi, device="cpu"), weights


def _fill(vals: Tensor, known: Tensor, lat_y: list[int], lat_x: list[int]) -> None:
    """Bilinear interpolation on the window grid, in place: each unknown window of ``vals`` (N, ny,
    nx) whose lattice cell has four known corners gets their bilinear mix."""
    y0, y1, wy = _brackets(vals.shape[1], lat_y)
    x0, x1, wx = _brackets(vals.shape[2], lat_x)
    y0, y1, wy, x0, x1, wx = y0[:, None], y1[:, None], wy[:, None], x0[None, :], x1[None, :], wx[None, :]
    ok = known[:, y0, x0] & known[:, y0, x1] & known[:, y1, x0] & known[:, y1, x1] & ~known
    mix = ((1 - wy) * (1 - wx) * vals[:, y0, x0] + (1 - wy) * wx * vals[:, y0, x1]
           + wy * (1 - wx) * vals[:, y1, x0] + wy * wx * vals[:, y1, x1])
    vals[ok] = mix[ok]


def _cells(lattice: list[int]) -> tuple[Tensor, Tensor]:
    """The lattice's cells along one axis: consecutive lattice indices (one degenerate cell when
    the lattice is a single index)."""
    if len(lattice) == 1:
        return torch.tensor(lattice, device="cpu"), torch.tensor(lattice, device="cpu")
    return torch.tensor(lattice[:-1], device="cpu"), torch.tensor(lattice[1:], device="cpu")


def _inside(lo: Tensor, hi: Tensor, lattice: list[int]) -> Tensor:
    """(cells, len(lattice)) float: lattice index ``j`` lies in the closed cell ``[lo, hi]``."""
    pos = torch.tensor(lattice, device="cpu")[None, :]
    return ((pos >= lo[:, None]) & (pos <= hi[:, None])).double()


# lattice steps of the refinement levels, coarse to fine. Measured on the five natural photos (default
# model, exact windows): every 2nd window first and then the full stride sits on the best frontier of r vs
# windows evaluated; a first level at every 4th window is worse for the same windows, also where those
# windows tile the image (patch 32 / stride 8: r >= 0.87 at 32% of the windows vs 0.97 at 45%)
_STEPS = (2, 1)


def _refined(run: Callable[[list[tuple[int, int, int]]], None], drops: Tensor, share: float, bar: Any) -> int:
    """Adaptive refinement (Krypton's drill-down, on lattices of the window grid), in place on
    ``drops`` (N, ny, nx). Level 0 evaluates every ``_STEPS[0]``-th window per axis (and the last);
    at each next level, the cells of the current lattice whose mean corner |drop| is in the top
    ``share`` of the cells with four evaluated corners are evaluated at the next step (only windows
    not evaluated yet). Windows never evaluated are interpolated bilinearly on the window grid from
    the finest lattice cell around them with four evaluated corners. ``run(jobs)`` writes
    ``drops[image, iy, ix]`` for each job. Returns the number of windows evaluated."""
    n, ny, nx = drops.shape
    known = torch.zeros(n, ny, nx, dtype=torch.bool, device="cpu")  # the plan is kept on the host
    vals = torch.zeros(n, ny, nx, dtype=torch.float64, device="cpu")
    lat_y, lat_x = _lattice(ny, _STEPS[0]), _lattice(nx, _STEPS[0])
    todo = torch.zeros_like(known)
    todo[:, torch.tensor(lat_y, device="cpu")[:, None], torch.tensor(lat_x, device="cpu")[None, :]] = True
    done = 0
    for level, step in enumerate(_STEPS):
        jobs = [tuple(j) for j in todo.nonzero().tolist()]
        if step == _STEPS[-1] and bar.total:
            bar.total -= n * ny * nx - done - len(jobs)  # the windows left to interpolation
        run(jobs)  # type: ignore[arg-type]
        done += len(jobs)
        known |= todo
        vals[todo] = drops.detach()[todo.to(drops.device)].to("cpu", torch.float64)
        _fill(vals, known, lat_y, lat_x)
        if step == _STEPS[-1]:
            break
        # rank the cells with four evaluated corners by their mean |drop|; refine the top share
        (cy0, cy1), (cx0, cx1) = _cells(lat_y), _cells(lat_x)
        corners = [(a[:, None], b[None, :]) for a in (cy0, cy1) for b in (cx0, cx1)]
        ready = torch.stack([known[:, a, b] for a, b in corners]).all(0)  # (N, cells y, cells x)
        score = torch.stack([vals[:, a, b].abs() for a, b in corners]).mean(0).masked_fill(~ready, -1.0)
        chosen = torch.zeros_like(ready)
        for i in range(n):
            k = math.ceil(share * int(ready[i].sum()))
            chosen[i].view(-1)[score[i].flatten().topk(k).indices] = True
        next_y, next_x = _lattice(ny, _STEPS[level + 1]), _lattice(nx, _STEPS[level + 1])
        mark = torch.einsum("ya,nyx,xb->nab", _inside(cy0, cy1, next_y), chosen.double(), _inside(cx0, cx1, next_x)) > 0
        todo = torch.zeros_like(known)
        todo[:, torch.tensor(next_y, device="cpu")[:, None], torch.tensor(next_x, device="cpu")[None, :]] = mark
        todo &= ~known
        lat_y, lat_x = next_y, next_x
    drops[~known.to(drops.device)] = vals[~known].to(drops.device, drops.dtype)
    return done


@renamed(**MODEL_AND_IMAGES)
def occlusion(
    model: nn.Module | Classifier,
    images: Tensor | Any,
    *,
    target: Target = None,
    patch: int | tuple[int, int] = 40,
    stride: int | tuple[int, int] = 20,
    baseline: float | str | Tensor = 0.0,
    blur_sigma: float | None = None,
    batch_size: int | None = None,
    score: Score = "probability",
    progress: bool = False,
    fast: bool = True,
    mode: Literal["exact", "approximate"] = "exact",
    tau: float = DEFAULT_TAU,
    refine: float | bool | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Saliency:
    """Occlusion sensitivity of each image in ``images``: ``maps[n, i, j]`` is the mean, over the windows
    that cover pixel ``(i, j)``, of ``s(x) - s(x with the window set to the baseline)``.

    ``patch``/``stride``: int or (h, w). Windows start at ``0, stride, ...`` and one extra window
    is flush with the far edge when needed (see :func:`window_starts`), so no pixel is left out.
    ``baseline``: a number in the model's normalised space (0 is the mean colour), ``"mean"`` (each
    image's channel means), ``"blur"`` (Gaussian blur with ``blur_sigma`` px, default
    ``max(patch) / 4``: 10 px at the default 40 px window) or a tensor broadcastable to the images.
    ``target``: as in :func:`convlens.targets.resolve_target`, per image; with a callable
    the drop is in its value (it receives the logits); a :class:`convlens.Region` scores a class over
    a region of a dense output. ``score``: ``"probability"`` (:meth:`Classifier.probabilities`:
    softmax, or sigmoids for a multi-label model; a Region's mean over its mask) or ``"logit"``.
    ``batch_size``: windows per forward (default per device and path, see :data:`CROP_BATCH`).
    ``fast=False`` runs one full forward of the unmodified model per window (the reference).
    ``mode="exact"`` (default) equals one full forward per window to float rounding;
    ``mode="approximate"`` recomputes, at every boundary of the crop path, only the central cells
    that carry a share ``tau`` of the window's modelled influence and takes the rest from the clean
    image (Krypton's projective-field thresholding). ``refine``: adaptive refinement (Krypton's
    drill-down) in either mode, a share in (0, 1] or True (:data:`DEFAULT_REFINE`, 0.3). It
    evaluates every second window per axis plus the far-edge one first, ranks the cells of that
    lattice (four evaluated corner windows) by their mean |drop| and evaluates every window of the
    top ``refine`` share of the cells. The other windows get the bilinear interpolation (on the
    window grid) of the corners of their cell: the map is assumed smooth where the coarse drops are
    small. No window is evaluated twice; ``refine=1`` evaluates
    every window and gives the unrefined map. At patch 16 / stride 8 on the default model about
    half the windows are evaluated (0.3), with Pearson r >= 0.95 to the exact map on natural photos.
    ``raw`` holds the drop per window on the (rows, cols) window grid (interpolated ones included);
    ``settings["work"]`` the estimated share of the multiply-adds of one full forward per window
    that the call did (per batch of windows, the estimated cost of the crops it ran on, or 1 per
    window for full forwards), and
    ``settings["windows_evaluated"]`` how many windows it evaluated.
    ``callback``, if given, is called as ``callback(windows_done, windows_total)`` after each batch
    of windows (an exception it raises stops the call, e.g. to cancel).

    Example::

        res = occlusion(clf, clf.preprocess("cat.jpg"), patch=32, stride=16)
        res.save("out")  # out/occlusion.png, .npy, .json

    It is long because every argument is checked before the first forward pass and every setting is
    recorded on the result here; choosing the evaluator and averaging the windows are helpers.
    """
    clf = as_classifier(model)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, not {score!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"tau must be a share in (0, 1], got {tau!r}")
    refine = _share(refine)
    x = clf.batch(images)
    n, _, height, width = x.shape
    ph, pw = _pair(patch, "patch")
    sh, sw = _pair(stride, "stride")
    if ph > height or pw > width:
        side = max(1, min(height, width) // 4)
        raise ValueError(f"patch {(ph, pw)} is larger than the image ({height}, {width}); choose a smaller patch and "
                         f"stride (e.g. patch {side}, stride {max(1, side // 2)})")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    base = _baseline(baseline, x, (ph, pw), blur_sigma).expand_as(x)
    starts_y, starts_x = window_starts(height, ph, sh), window_starts(width, pw, sw)
    grid = (len(starts_y), len(starts_x))
    n_windows = grid[0] * grid[1]

    model = clf.model
    reasons: list[str] = []
    with model_guard(model), torch.no_grad():
        out = model(x)  # the raw output: the scorer adapts it, as it does the evaluators' outputs
        logits = require_finite(clf.adapt(out), "the model's output")
        resolved = resolve_target(clf, target, n, logits)  # checks that a class target has (N, classes) logits
        scorer = _Scorer(score, resolved, clf.adapt)
        clean = scorer(out, list(range(n)))
        evaluator, cpu_batch = _choose_evaluator(clf, x, base, (ph, pw), (starts_y, starts_x), fast=fast, mode=mode,
                                                 tau=tau, reasons=reasons)
        bs = batch_size or default_batch(model, x, n_windows, cpu=cpu_batch)
        # CPU: one image at a time (its clean activations); CUDA: windows of all images share batches
        group = n if x.device.type == "cuda" else 1
        log.info("occlusion: %d windows per image (%d x %d), batches of %d, %s path%s",
                 n_windows, *grid, bs, evaluator.name, ", refined" if refine else "")
        drops = torch.empty(n, *grid, device=x.device, dtype=torch.float32)
        bar = _progress(progress, n * n_windows)
        if callback is not None:
            bar = _Reporting(bar, callback)
        evaluated = 0
        work = evaluator.work  # the fast path's check ran some windows already
        try:
            for g in range(0, n, group):
                xg, bg = x[g : g + group], base[g : g + group]
                evaluator.prepare(xg)
                run = functools.partial(_run_jobs, evaluator, xg, bg, bs=bs, scorer=scorer, clean=clean,
                                        drops=drops, offset=g, bar=bar)
                if refine is None:
                    jobs = [(i, iy, ix) for i in range(xg.shape[0]) for iy in range(grid[0]) for ix in range(grid[1])]
                    run(jobs)
                    evaluated += len(jobs)
                else:
                    evaluated += _refined(run, drops[g : g + group], refine, bar)
            work = evaluator.work - work
        finally:
            bar.close()
            if hasattr(evaluator, "close"):
                evaluator.close()

    raw = require_finite(drops, "the occlusion drops")
    warn_constant(raw, "occlusion", "hiding any window changes nothing; try a larger patch or another baseline")
    maps = _window_means(raw, (height, width), (ph, pw), (starts_y, starts_x))
    approximate = evaluator.name == "crop" and mode == "approximate"
    return Saliency(
        maps=maps,
        raw=raw,
        target=list(resolved.indices),
        method="occlusion",
        layer=None,
        images=clf.denormalise(x),
        labels=list(resolved.labels),
        settings={
            "patch": (ph, pw),
            "stride": (sh, sw),
            "baseline": baseline if isinstance(baseline, (int, float, str)) else "tensor",
            "blur_sigma": blur_sigma_for((ph, pw), blur_sigma) if baseline == "blur" else None,
            "score": "custom" if resolved.fn is not None else score,
            "batch_size": bs,
            "windows": grid,
            "starts": (starts_y, starts_x),
            "path": evaluator.name,
            "boundaries": list(getattr(evaluator, "split_names", [])),
            "mode": "approximate" if approximate else "exact",
            "tau": tau if approximate else None,
            "refine": refine,
            "windows_evaluated": evaluated,
            # estimated share of the multiply-adds of one full forward per window
            "work": float(work) / (n * n_windows),
            "fallback": "; ".join(reasons) or None,
        },
    )


class _Reporting:
    """A progress bar that also calls ``callback(done, total)`` after each ``update``."""

    def __init__(self, bar: Any, callback: Callable[[int, int], None]) -> None:
        self.bar, self.callback, self.done = bar, callback, 0

    @property
    def total(self) -> int:
        return self.bar.total

    @total.setter
    def total(self, value: int) -> None:
        self.bar.total = value

    def update(self, k: int) -> None:
        self.bar.update(k)
        self.done += k
        self.callback(self.done, self.total)

    def close(self) -> None:
        self.bar.close()


def _progress(enabled: bool, total: int) -> Any:
    # tqdm.auto only when a bar is wanted: in a Jupyter kernel without ipywidgets importing it warns
    if enabled:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="window", desc="occlusion", leave=False)


def _choose_evaluator(clf: Any, x: Tensor, base: Tensor, patch: tuple[int, int], starts: tuple[list[int], list[int]],
                      *, fast: bool, mode: str, tau: float, reasons: list[str]) -> tuple[Any, int]:
    """The evaluator of :func:`occlusion`'s windows and its CPU batch size: the crop evaluator where
    ``fast`` and the model allow it, else full forwards through the checked private copy where
    there is one, else full forwards of the user's model; why a faster path was not taken goes to
    ``reasons``."""
    model = clf.model
    starts_y, starts_x = starts
    evaluator: Any = _PlainEvaluator(model, (starts_y, starts_x), patch)
    cpu_batch = 1  # full forwards of the user's model: 1 on a CPU (larger batches measured slower)
    if fast:
        from .._inference import fast_model
        from ._occlusion_fast import build_fast_evaluator

        crops = None
        if x.device.type in CROP_DEVICES:
            crops = build_fast_evaluator(
                model, x, base, patch, starts_y, starts_x,
                reference=evaluator, tau=tau if mode == "approximate" else None, reasons=reasons,
                output=clf.adapt,
            )
        else:
            reasons.append(f"on {x.device.type} full batches of windows are faster than crops"
                           + ("; the map is exact" if mode == "approximate" else ""))
        if crops is not None:
            evaluator, cpu_batch = crops, CROP_BATCH
        else:  # full forwards, through the checked private copy where there is one
            private = fast_model(clf, x)
            if private is not model:
                evaluator, cpu_batch = _PlainEvaluator(private, (starts_y, starts_x), patch), COPY_BATCH
    elif mode == "approximate":
        reasons.append("fast=False asks for full forwards")
    return evaluator, cpu_batch


def _window_means(raw: Tensor, size: tuple[int, int], patch: tuple[int, int],
                  starts: tuple[list[int], list[int]]) -> Tensor:
    """Per pixel, the mean of the (N, gy, gx) window drops ``raw`` over the windows that cover it."""
    acc = torch.float64 if raw.device.type in ("cpu", "cuda") else torch.float32
    ay = _coverage_matrix(size[0], patch[0], starts[0], acc, raw.device)
    ax = _coverage_matrix(size[1], patch[1], starts[1], acc, raw.device)
    sums = ay @ raw.to(acc) @ ax.T
    counts = ay.sum(1)[:, None] * ax.sum(1)[None, :]
    return (sums / counts).float()
