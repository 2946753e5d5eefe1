"""Occlusion sensitivity: hide one window of the image at a time and record how much the score drops.

For a window ``w`` and target score ``s`` (softmax probability or logit of the target class, or a
custom callable), ``drop[w] = s(x) - s(x with w replaced by the baseline)``. The map at a pixel is
the mean of ``drop[w]`` over the windows ``w`` that cover it. Windows start at ``0, stride,
2*stride, ...`` along each axis and, when ``(size - patch) % stride != 0``, one more window sits
flush with the far edge, so every pixel is covered (the tutorial's loop leaves the last rows and
columns uncovered).

Windows are streamed in chunks, so memory stays bounded for any image size and stride. The speed-ups
(a private copy of the model with batch norm folded into the convolutions, and recomputing only
the region a window can reach, see ``_occlusion_fast.py``) are checked against the plain model on
every call and give the same map to float32 rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

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


# rough bytes of activations alive at once per image in a forward, per input element: ResNet-50's
# largest activation is 5.3x its input and a few of them are alive at a time
_ACTIVATION_FACTOR = 64 * 4


def _cpu_budget() -> int:
    """A quarter of the available RAM, at most 2 GiB."""
    avail = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return min(avail // 4, 2 << 30)


def _default_batch(model: nn.Module, x: Tensor, n_windows: int, crop: bool) -> int:
    """Windows per forward pass, within a memory budget. CPU: 1 for full forwards (measured on 2
    cores: batching ResNet-50 is slower, 6.2 s for 101 single forwards vs 7.4 s in chunks of 16),
    4 for the crop path (its early stages run on small crops, where a few at once use the cores
    better: ResNet-50, 121 windows, 19.2 s at 4 vs 24.6 s at 1 and 23.0 s at 16), fewer when a
    quarter of the free RAM (at most 2 GiB) would not hold them (large images). GPU: as many as
    half the free memory allows, from the measured peak of a single full forward, capped at 256."""
    if x.device.type != "cuda":
        per_image = _ACTIVATION_FACTOR * x[0].numel()
        return int(max(1, min(4 if crop else 1, _cpu_budget() // per_image)))
    per_sample = max(1, _forward_peak(model, x[:1]))
    free, _ = torch.cuda.mem_get_info(x.device)
    return int(max(1, min(256, n_windows, (free // 2) // per_sample)))


def _forward_peak(model: nn.Module, x: Tensor) -> int:
    """Bytes a forward of ``x`` allocates above what was allocated before, on CUDA: the largest
    ``memory_allocated`` seen after any module finished. Read through forward hooks instead of
    ``reset_peak_memory_stats``, which would wipe the caller's own peak statistics."""
    base = torch.cuda.memory_allocated(x.device)
    peak = [base]

    def hook(module: nn.Module, args: object, out: object) -> None:
        peak[0] = max(peak[0], torch.cuda.memory_allocated(x.device))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return peak[0] - base


class _Scorer:
    """The (B,) scores of a model output for one image's target (the chosen class's probability or
    logit, or the callable's value), through :meth:`ResolvedTarget.score`."""

    def __init__(self, score: str, index: int, fn: Any) -> None:
        self.score, self.index, self.fn = score, index, fn

    def __call__(self, out: Tensor) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ValueError("the model must return logits of shape (N, classes)")
        b = out.shape[0]
        if self.fn is None and self.score == "probability":
            out = torch.softmax(out.float(), dim=1)
        return ResolvedTarget([self.index] * b, [""] * b, self.fn).score(out).float()


def _chunks(starts_y: list[int], starts_x: list[int], size: int) -> Iterator[list[tuple[int, int, int]]]:
    """(flat index, y, x) of the windows in row-major order, ``size`` at a time."""
    chunk: list[tuple[int, int, int]] = []
    for i, y in enumerate(starts_y):
        for j, x in enumerate(starts_x):
            chunk.append((i * len(starts_x) + j, y, x))
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


class _PlainEvaluator:
    """One full forward per window: the occluded images are built chunk by chunk."""

    name = "plain"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: Tensor, base: Tensor, windows: list[tuple[int, int, int]], patch: tuple[int, int]) -> Tensor:
        ph, pw = patch
        batch = x.expand(len(windows), *x.shape[1:]).clone()
        for k, (_, y, xx) in enumerate(windows):
            batch[k, :, y : y + ph, xx : xx + pw] = base[0, :, y : y + ph, xx : xx + pw]
        return self.model(batch)


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
    ``raw`` holds the drop per window on the (rows, cols) window grid. ``callback``, if given, is
    called as ``callback(windows_done, windows_total)`` after each batch of windows (an exception
    it raises stops the call, e.g. to cancel).

    Example::

        res = occlusion(clf, clf.preprocess("cat.jpg"), patch=32, stride=16)
        res.save("occlusion")
    """
    clf = as_classifier(model_or_classifier)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, not {score!r}")
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
    n_windows = len(starts_y) * len(starts_x)

    model = clf.model
    with model_guard(model), torch.no_grad():
        logits = require_logits(clf.forward(x))
        require_finite(logits, "the model's output")
        resolved = resolve_target(clf, target, n, logits)
        scorers = [_Scorer(score, resolved.indices[i], resolved.fn) for i in range(n)]
        clean = torch.stack([scorers[i](logits[i : i + 1])[0] for i in range(n)])
        evaluator: Any = _PlainEvaluator(model)
        if fast:
            from ._occlusion_fast import build_fast_evaluator

            evaluator = (
                build_fast_evaluator(model, x, base, (ph, pw), starts_y, starts_x, output=clf.adapt) or evaluator
            )
        bs = batch_size or _default_batch(model, x, n_windows, evaluator.name == "crop")
        log.info("occlusion: %d windows per image (%d x %d), batches of %d, %s path",
                 n_windows, len(starts_y), len(starts_x), bs, evaluator.name)
        drops = torch.empty(n, n_windows, device=x.device, dtype=torch.float32)
        bar = _progress(progress, n * n_windows)
        if callback is not None:
            bar = _Reporting(bar, callback)
        try:
            for i in range(n):
                xi, bi = x[i : i + 1], base[i : i + 1]
                for chunk in _chunks(starts_y, starts_x, bs):
                    scores = scorers[i](clf.adapt(evaluator(xi, bi, chunk, (ph, pw))))
                    idx = torch.tensor([c[0] for c in chunk], device=x.device)
                    drops[i, idx] = clean[i] - scores
                    bar.update(len(chunk))
        finally:
            bar.close()
            if hasattr(evaluator, "close"):
                evaluator.close()

    raw = require_finite(drops.view(n, len(starts_y), len(starts_x)), "the occlusion drops")
    warn_constant(raw, "occlusion", "hiding any window changes nothing; try a larger patch or another baseline")
    acc = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
    ay = _coverage_matrix(height, ph, starts_y, acc, x.device)
    ax = _coverage_matrix(width, pw, starts_x, acc, x.device)
    sums = ay @ raw.to(acc) @ ax.T
    counts = ay.sum(1)[:, None] * ax.sum(1)[None, :]
    maps = (sums / counts).float()
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
            "windows": (len(starts_y), len(starts_x)),
            "starts": (starts_y, starts_x),
            "path": evaluator.name,
            "boundaries": list(getattr(evaluator, "split_names", [])),
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
