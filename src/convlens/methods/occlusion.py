"""Occlusion sensitivity: hide one window of the image at a time and record how much the score drops.

For a window ``w`` and target score ``s`` (softmax probability or logit of the target class, or a
custom callable), ``drop[w] = s(x) - s(x with w replaced by the baseline)``. The map at a pixel is
the mean of ``drop[w]`` over the windows ``w`` that cover it. Windows start at ``0, stride,
2*stride, ...`` along each axis and, when ``(size - patch) % stride != 0``, one more window sits
flush with the far edge, so every pixel is covered (the tutorial's loop leaves the last rows and
columns uncovered).

Windows are streamed in chunks, so memory stays bounded for any image size and stride. The exact
speed-up (recomputing, on a private copy of the model, only the region a window can reach, see
``_occlusion_fast.py``) is checked against the plain model on every call and gives the same map to
float32 rounding. ``mode="approximate"`` recomputes less (the central part of that region) and
``refine=`` evaluates a coarse grid first and the fine stride only near its strongest windows:
both give a close map, not the same one, and say how much work they did in ``settings["work"]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._batching import default_batch
from ..baselines import BASELINES, MAX_BASELINE, make_baseline  # noqa: F401 -- BASELINES: the old name
from ..baselines import gaussian_blur as _gaussian_blur  # noqa: F401 -- the old name
from ..checks import require_finite, warn_constant
from ..hooks import model_guard
from ..models import Classifier, as_classifier, require_logits
from ..results import Saliency
from ..targets import ResolvedTarget, Target, resolve_target

__all__ = ["occlusion", "window_starts"]

log = logging.getLogger(__name__)

Score = Literal["probability", "logit"]
SCORES: tuple[Score, ...] = ("probability", "logit")
DEFAULT_TAU = 0.9  # share of the modelled influence the approximate mode keeps at each boundary


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


def _baseline(baseline: Any, x: Tensor, patch: tuple[int, int]) -> Tensor:
    """The replacement values, broadcastable to ``x`` (N, C, H, W); "blur" uses sigma = patch / 4:
    detail inside the window is gone, colours stay."""
    return make_baseline(baseline, x, sigma=max(patch) / 4)


def _default_batch(model: nn.Module, x: Tensor, n_windows: int, crop: bool) -> int:
    """Windows per forward pass (:func:`convlens._batching.default_batch`). CPU: 1 for full
    forwards, 16 for the crop path (its stages run on small crops and its last layers on the full
    map, where a batch uses the cores far better: ResNet-50 at patch 16 / stride 8, 2 threads, 6.4x
    single forwards at 16, 4.1x at 8, 3.0x at 4, 6.2x at 32), 4 when the model has depthwise
    convolutions (bound by memory traffic, which a larger batch does not help: the default model,
    841 windows, 23.0 s in batches of 4, 27.4 s of 16), fewer when memory would not hold them."""
    depthwise = any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())
    return default_batch(model, x, n_windows, cpu=(4 if depthwise else 16) if crop else 1)


class _Scorer:
    """The (B,) scores of a model output whose rows belong to the images ``rows`` (the chosen
    class's probability or logit, or the callable's value), through :meth:`ResolvedTarget.score`."""

    def __init__(self, score: str, indices: list[int], fn: Any, adapt: Callable[[Any], Tensor]) -> None:
        self.score, self.indices, self.fn, self.adapt = score, indices, fn, adapt

    def __call__(self, out: Any, rows: list[int]) -> Tensor:
        out = self.adapt(out)  # the raw model output -> the tensor to explain (tuple, dict, .logits, output=)
        if self.fn is None:
            require_logits(out)
        if self.fn is None and self.score == "probability":
            out = torch.softmax(out.float(), dim=1)
        idx = [self.indices[r] for r in rows]
        return ResolvedTarget(idx, [""] * len(rows), self.fn).score(out).float()


class _PlainEvaluator:
    """One full forward per window: the occluded images are built chunk by chunk. A job is
    ``(image, row index, column index)`` into the window starts."""

    name = "plain"
    estimate = 1.0

    def __init__(self, model: nn.Module, starts: tuple[list[int], list[int]], patch: tuple[int, int]) -> None:
        self.model, self.starts, self.patch = model, starts, patch

    def prepare(self, x: Tensor) -> None:
        pass

    def __call__(self, x: Tensor, base: Tensor, jobs: list[tuple[int, int, int]]) -> Tensor:
        ph, pw = self.patch
        batch = x[[j[0] for j in jobs]]
        for k, (img, iy, ix) in enumerate(jobs):
            y, xx = self.starts[0][iy], self.starts[1][ix]
            batch[k, :, y : y + ph, xx : xx + pw] = base[img, :, y : y + ph, xx : xx + pw]
        return self.model(batch)


MODES = ("exact", "approximate")


def _coarse(n: int) -> list[int]:
    """Every second window index along an axis, and the last one."""
    idx = list(range(0, n, 2))
    return idx if idx[-1] == n - 1 else idx + [n - 1]


def _brackets(n: int, coarse: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per fine index: the positions (in ``coarse``) of the coarse indices at or around it and
    the linear weight of the upper one."""
    lo, hi, w = [], [], []
    for i in range(n):
        k = max(p for p, c in enumerate(coarse) if c <= i)
        k2 = k if coarse[k] == i else k + 1
        lo.append(k)
        hi.append(k2)
        w.append(0.0 if k2 == k else (i - coarse[k]) / (coarse[k2] - coarse[k]))
    return torch.tensor(lo), torch.tensor(hi), torch.tensor(w, dtype=torch.float64)


def _run_jobs(evaluator: Any, x: Tensor, base: Tensor, jobs: list[tuple[int, int, int]], bs: int,
              scorer: _Scorer, clean: Tensor, drops: Tensor, offset: int, bar: Any) -> None:
    """drops[offset + image, iy, ix] = clean score - occluded score, ``bs`` windows at a time."""
    for k in range(0, len(jobs), bs):
        chunk = jobs[k : k + bs]
        rows = [j[0] for j in chunk]
        scores = scorer(evaluator(x, base, chunk), [offset + r for r in rows])
        img = torch.tensor(rows, device=drops.device)
        iy = torch.tensor([j[1] for j in chunk], device=drops.device)
        ix = torch.tensor([j[2] for j in chunk], device=drops.device)
        drops[offset + img, iy, ix] = clean[offset + img] - scores
        bar.update(len(chunk))


def _refined(evaluator: Any, x: Tensor, base: Tensor, grid: tuple[int, int], share: float, bs: int,
             scorer: _Scorer, clean: Tensor, drops: Tensor, offset: int, bar: Any) -> int:
    """Adaptive refinement: the coarse windows (every second one per axis, plus the last) first;
    then the fine windows next to the coarse ones whose |drop| is in the top ``share``; the other
    fine windows are interpolated (bilinear on the window grid) from the coarse ones. Returns the
    number of windows evaluated."""
    ny, nx = grid
    cy, cx = _coarse(ny), _coarse(nx)
    n = x.shape[0]
    jobs = [(i, iy, ix) for i in range(n) for iy in cy for ix in cx]
    _run_jobs(evaluator, x, base, jobs, bs, scorer, clean, drops, offset, bar)
    done = len(jobs)
    ly, hy, wy = _brackets(ny, cy)
    lx, hx, wx = _brackets(nx, cx)
    ty, tx = torch.tensor(cy), torch.tensor(cx)
    is_coarse = torch.zeros(ny, nx, dtype=torch.bool)
    is_coarse[ty[:, None], tx[None, :]] = True
    fine_jobs = []
    for i in range(n):
        d = drops[offset + i].detach().to("cpu", torch.float64)[ty[:, None], tx[None, :]]  # (cy, cx)
        k = max(1, math.ceil(share * d.numel()))
        top = torch.zeros(d.numel(), dtype=torch.bool)
        top[d.abs().flatten().topk(k).indices] = True
        top = top.view_as(d)
        near = top[ly][:, lx] | top[ly][:, hx] | top[hy][:, lx] | top[hy][:, hx]
        todo = near & ~is_coarse
        fine_jobs += [(i, int(a), int(b)) for a, b in todo.nonzero().tolist()]
        # bilinear on the window grid for the rest
        wy2, wx2 = wy[:, None], wx[None, :]
        interp = ((1 - wy2) * (1 - wx2) * d[ly][:, lx] + (1 - wy2) * wx2 * d[ly][:, hx]
                  + wy2 * (1 - wx2) * d[hy][:, lx] + wy2 * wx2 * d[hy][:, hx])
        rest = ~near & ~is_coarse
        drops[offset + i][rest.to(drops.device)] = interp[rest].to(drops.device, drops.dtype)
    if bar.total:
        bar.total -= n * ny * nx - done - len(fine_jobs)  # the interpolated windows
    _run_jobs(evaluator, x, base, fine_jobs, bs, scorer, clean, drops, offset, bar)
    return done + len(fine_jobs)


def occlusion(
    model_or_classifier: nn.Module | Classifier,
    x: Tensor | Any,
    *,
    target: Target = None,
    patch: int | tuple[int, int] = 40,
    stride: int | tuple[int, int] = 20,
    baseline: float | str | Tensor = 0.0,
    batch_size: int | None = None,
    score: Score = "probability",
    progress: bool = False,
    fast: bool = True,
    mode: Literal["exact", "approximate"] = "exact",
    tau: float = DEFAULT_TAU,
    refine: float | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Saliency:
    """Occlusion sensitivity of each image in ``x``: ``maps[n, i, j]`` is the mean, over the windows
    that cover pixel ``(i, j)``, of ``s(x) - s(x with the window set to the baseline)``.

    ``patch``/``stride``: int or (h, w). Windows start at ``0, stride, ...`` and one extra window
    is flush with the far edge when needed (see :func:`window_starts`), so no pixel is left out.
    ``baseline``: a number in the model's normalised space (0 is the mean colour), ``"mean"`` (each
    image's channel means), ``"blur"`` (Gaussian blur, sigma = patch/4) or a tensor broadcastable
    to ``x``. ``target``: as in :func:`convlens.targets.resolve_target`, per image; with a callable
    the drop is in its value (it receives the logits). ``score``: ``"probability"`` (softmax) or
    ``"logit"``. ``batch_size``: windows per forward (default per device, see ``_default_batch``).
    ``fast=False`` runs one full forward of the unmodified model per window (the reference).
    ``mode="exact"`` (default) equals one full forward per window to float rounding;
    ``mode="approximate"`` recomputes, at every boundary of the crop path, only the central cells
    that carry a share ``tau`` of the window's modelled influence and takes the rest from the clean
    image (Krypton's projective-field thresholding). ``refine``: a share in (0, 1]: evaluate every
    second window per axis first, then the full stride only next to the coarse windows whose |drop|
    is in the top ``refine`` share, and interpolate the others (approximate in any mode).
    ``raw`` holds the drop per window on the (rows, cols) window grid; ``settings["work"]`` the
    estimated share of the multiply-adds of one full forward per window that the call did.
    ``callback``, if given, is called as ``callback(windows_done, windows_total)`` after each batch
    of windows (an exception it raises stops the call, e.g. to cancel).

    Example::

        res = occlusion(clf, clf.preprocess("cat.jpg"), patch=32, stride=16)
        res.save("occlusion")
    """
    clf = as_classifier(model_or_classifier)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, not {score!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"tau must be a share in (0, 1], got {tau!r}")
    if refine is not None and (isinstance(refine, bool) or not isinstance(refine, (int, float)) or not 0 < refine <= 1):
        raise ValueError(f"refine must be a share in (0, 1] or None, got {refine!r}")
    x = clf.batch(x)
    n, _, height, width = x.shape
    ph, pw = _pair(patch, "patch")
    sh, sw = _pair(stride, "stride")
    if ph > height or pw > width:
        raise ValueError(f"patch {(ph, pw)} is larger than the image ({height}, {width})")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    base = _baseline(baseline, x, (ph, pw)).expand_as(x)
    starts_y, starts_x = window_starts(height, ph, sh), window_starts(width, pw, sw)
    grid = (len(starts_y), len(starts_x))
    n_windows = grid[0] * grid[1]

    model = clf.model
    reasons: list[str] = []
    with model_guard(model), torch.no_grad():
        out = model(x)  # the raw output: the scorer adapts it, as it does the evaluators' outputs
        logits = require_finite(require_logits(clf.adapt(out)), "the model's output")
        resolved = resolve_target(clf, target, n, logits)
        scorer = _Scorer(score, list(resolved.indices), resolved.fn, clf.adapt)
        clean = scorer(out, list(range(n)))
        evaluator: Any = _PlainEvaluator(model, (starts_y, starts_x), (ph, pw))
        if fast:
            from ._occlusion_fast import build_fast_evaluator

            evaluator = build_fast_evaluator(
                model, x, base, (ph, pw), starts_y, starts_x,
                tau=tau if mode == "approximate" else None, reasons=reasons, output=clf.adapt,
            ) or evaluator
        elif mode == "approximate":
            reasons.append("fast=False asks for full forwards")
        bs = batch_size or _default_batch(model, x, n_windows, evaluator.name == "crop")
        # CPU: one image at a time (its clean activations); CUDA: windows of all images share batches
        group = n if x.device.type == "cuda" else 1
        log.info("occlusion: %d windows per image (%d x %d), batches of %d, %s path%s",
                 n_windows, *grid, bs, evaluator.name, ", refined" if refine else "")
        drops = torch.empty(n, *grid, device=x.device, dtype=torch.float32)
        bar = _progress(progress, n * n_windows)
        if callback is not None:
            bar = _Reporting(bar, callback)
        evaluated = 0
        try:
            for g in range(0, n, group):
                xg, bg = x[g : g + group], base[g : g + group]
                evaluator.prepare(xg)
                if refine is None:
                    jobs = [(i, iy, ix) for i in range(xg.shape[0]) for iy in range(grid[0]) for ix in range(grid[1])]
                    _run_jobs(evaluator, xg, bg, jobs, bs, scorer, clean, drops, g, bar)
                    evaluated += len(jobs)
                else:
                    evaluated += _refined(evaluator, xg, bg, grid, float(refine), bs, scorer, clean, drops, g, bar)
        finally:
            bar.close()
            if hasattr(evaluator, "close"):
                evaluator.close()

    raw = require_finite(drops, "the occlusion drops")
    warn_constant(raw, "occlusion", "hiding any window changes nothing; try a larger patch or another baseline")
    acc = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
    ay = _coverage_matrix(height, ph, starts_y, acc, x.device)
    ax = _coverage_matrix(width, pw, starts_x, acc, x.device)
    sums = ay @ raw.to(acc) @ ax.T
    counts = ay.sum(1)[:, None] * ax.sum(1)[None, :]
    maps = (sums / counts).float()
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
            "work": float(evaluator.estimate) * evaluated / (n * n_windows),
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
