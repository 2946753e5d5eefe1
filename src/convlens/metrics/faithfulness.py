"""Deletion and insertion (Petsiuk et al., "RISE", BMVC 2018): does hiding the pixels a map ranks
highest remove the evidence for the class, and does revealing them first restore it?

Definition (kept exact, so numbers compare between versions and with the literature):

- the map (N, H, W) is resized bilinearly to the input size when it is not at it;
- the pixels of each image are ordered by the map, highest first, ties by flat index
  (a stable sort of ``-map.flatten()``);
- step ``k = 0..steps`` affects the first ``min(ceil(H*W / steps) * k, H*W)`` pixels of that
  order, all channels at once. Deletion replaces them in the input by the baseline; insertion
  starts from the baseline and puts them back from the input;
- the score is the target's probability (:meth:`Classifier.probabilities`: softmax, or sigmoid
  for a multi-label model; for a :class:`Region` its mean over the mask), or its logit, or a
  callable's value;
- ``AUC = (sum_k s_k - s_0 / 2 - s_steps / 2) / steps``, the trapezoid over ``k / steps``.

Every step image goes through the model once ((steps+1) forwards per image and curve, in
batches under a memory budget; :func:`deletion_insertion` runs the clean image and the full
baseline once for all its curves), through a checked private copy of the model where one computes
the same (:func:`convlens._inference.fast_model`); the target, when not given, is resolved from
the clean image's output, which is step 0 of deletion and the last step of insertion, so no extra
forward is paid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._batching import default_batch
from .._compat import MODEL_AND_IMAGES, renamed
from .._inference import fast_model
from ..baselines import Baseline, describe_baseline, make_baseline
from ..hooks import model_guard
from ..models import Classifier, as_classifier
from ..results import Saliency
from ..targets import SCORES, Region, ResolvedTarget, Score, Target, resolve_target
from .results import CurveKind, DeletionInsertion, PerturbationCurve

__all__ = ["deletion", "insertion", "deletion_insertion", "perturbation_curve", "auc", "pixel_order", "blur_sigma"]

log = logging.getLogger(__name__)

KINDS: tuple[CurveKind, ...] = ("deletion", "insertion")


def blur_sigma(height: int, width: int) -> float:
    """The default sigma of the ``"blur"`` baseline: ``max(H, W) / 22.4`` (10 px at 224 px,
    the blur of occlusion's default 40 px window).

    Args:
        height: the input's height in pixels.
        width: the input's width in pixels.
    Returns:
        The sigma in pixels.
    """
    return max(height, width) / 22.4


def auc(scores: Tensor) -> Tensor:
    """Trapezoid area under scores over the fractions ``k / steps``:
    ``(sum(s) - s[0]/2 - s[-1]/2) / steps``.

    Args:
        scores: (..., steps+1) tensor (steps >= 1), any device and floating dtype.
    Returns:
        (...,) tensor on ``scores``' device, in its dtype.

    Example::

        auc(torch.tensor([[1.0, 0.5, 0.0]]))   # tensor([0.5])
    """
    steps = scores.shape[-1] - 1
    return (scores.sum(-1) - scores[..., 0] / 2 - scores[..., -1] / 2) / steps


def pixel_order(maps: Tensor) -> Tensor:
    """Flat pixel indices per map, highest map value first, ties by flat index (stable sort).

    Args:
        maps: (N, H, W) tensor, any device and real dtype.
    Returns:
        (N, H*W) int64 tensor on ``maps``' device.

    Example::

        pixel_order(torch.tensor([[[0.0, 2.0], [2.0, 1.0]]]))   # tensor([[1, 2, 3, 0]])
    """
    return torch.sort(-maps.flatten(1).float(), dim=1, stable=True).indices


def _maps_and_target(saliency: Saliency | Tensor, x: Tensor, target: Target) -> tuple[Tensor, Tensor, Target, str]:
    """(maps at the input size, the matching inputs, the target, the method name)."""
    method = "map"
    if isinstance(saliency, Saliency):
        maps, method = saliency.maps, saliency.method
        index = saliency.settings.get("image_index")
        if index is not None and maps.shape[0] != x.shape[0] and len(index) == maps.shape[0]:
            x = x[torch.as_tensor(index, device=x.device)]  # several classes per image (top=k)
        if target is None:
            target = list(saliency.target) if min(saliency.target) >= 0 else None
    elif isinstance(saliency, Tensor):
        maps = saliency[None] if saliency.dim() == 2 else saliency
    else:
        raise ValueError(f"saliency must be a Saliency result or an (N, H, W) tensor, not {type(saliency).__name__}")
    if maps.dim() != 3:
        raise ValueError(f"a saliency map tensor must be (N, H, W) or (H, W), got shape {tuple(maps.shape)}")
    if maps.shape[0] != x.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps for {x.shape[0]} images; give one map per image")
    maps = maps.detach().to(x.device, torch.float32)
    if not torch.isfinite(maps).all():
        raise ValueError("the saliency map has non-finite values")
    if maps.shape[-2:] != x.shape[-2:]:
        maps = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return maps, x, target, method


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _prepare(
    kind: str, model_or_classifier: nn.Module | Classifier, x: Any, score: str, steps: int, batch_size: int | None
) -> tuple[Classifier, Tensor]:
    """The arguments every curve checks, and the classifier and model-ready input."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, not {score!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    _check_batch_size(batch_size)
    clf = as_classifier(model_or_classifier)
    return clf, clf.batch(x)


class _RegionScores:
    """Per batch, a dense output reduced to the (B, classes) scores of every class over a
    :class:`Region` (:meth:`ResolvedTarget.per_class`), so the curves hold N x (steps+1) x classes
    numbers, not as many segmentation maps (a 520 px, 21-class segmenter's compare: gigabytes)."""

    def __init__(self, clf: Classifier, region: Region, n: int, probability: bool) -> None:
        self.clf, self.region, self.n, self.probability = clf, region, n, probability
        self.resolved: ResolvedTarget | None = None

    def __call__(self, out: Tensor, images: list[int]) -> Tensor:
        if self.resolved is None:  # the mask is checked against the first output's size
            self.resolved = resolve_target(self.clf, self.region, self.n, out[:1].expand(self.n, *out.shape[1:]))
        return self.resolved.select(images).per_class(out, self.probability)


def _step_outputs(
    clf: Classifier, x: Tensor, specs: list[tuple[str, Tensor]], steps: int, base: Tensor, batch_size: int | None,
    reduce: _RegionScores | None = None,
) -> tuple[list[Tensor], int, int]:
    """The model's outputs (N, steps+1, K) for each ``(kind, maps)`` in ``specs`` (maps (N, H, W) at
    the input size; each batch's outputs through ``reduce`` when given), the batch size and the
    number of forwards. The clean images and the full baseline are the same for every curve of
    ``x``: they run once."""
    n, _, h, w = x.shape
    hw = h * w
    per_step = math.ceil(hw / steps)
    counts = [min(per_step * k, hw) for k in range(steps + 1)]
    ranks = []
    for _, maps in specs:
        order = pixel_order(maps)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(hw, device=x.device).expand(n, -1))
        ranks.append(rank)

    def image(job: tuple[int, int, int]) -> Tensor:
        s, i, k = job
        if s < 0:  # -1: the clean image, -2: the full baseline
            return x[i] if s == -1 else base[i]
        hidden = (ranks[s][i] < counts[k]).view(1, h, w)  # pixels affected at step k
        if specs[s][0] == "deletion":
            return torch.where(hidden, base[i], x[i])
        return torch.where(hidden, x[i], base[i])

    jobs = [(s, i, 0) for s in (-1, -2) for i in range(n)]
    jobs += [(s, i, k) for s in range(len(specs)) for i in range(n) for k in range(1, steps)]
    model = clf.model
    outputs: list[Tensor] = []
    with model_guard(model), torch.no_grad():
        bs = batch_size
        forward = fast_model(clf, x)
        if bs is None:
            # on a CPU 4 (the private copy's channels-last forwards: 2.6x faster than one at a
            # time through the model itself for EfficientNet-Lite0, 1.5x for ResNet-50, 2 cores),
            # on a GPU what half the free memory holds, from a probe forward's peak
            bs = default_batch(model, x, len(jobs), cpu=4)
        for start in range(0, len(jobs), bs):
            chunk = jobs[start : start + bs]
            # tuple/dict/.logits outputs too; (N, classes) or dense: the target checks it
            o = clf.adapt(forward(torch.stack([image(job) for job in chunk]))).float()
            outputs.append(o if reduce is None else reduce(o, [i for _, i, _ in chunk]))
    out = torch.cat(outputs)
    clean, full, inner = out[:n], out[n : 2 * n], out[2 * n :].view(len(specs), n, steps - 1, *out.shape[1:])
    results = []
    for s, (kind, _) in enumerate(specs):
        first, last = (clean, full) if kind == "deletion" else (full, clean)
        results.append(torch.cat([first[:, None], inner[s], last[:, None]], 1))
    return results, bs, len(jobs)


def _curve(
    kind: str, clf: Classifier, out: Tensor, target: Target, method: str, score: str, settings: dict[str, Any],
    resolved: ResolvedTarget | None = None,
) -> PerturbationCurve:
    """The curve from the outputs (N, steps+1, K) of its step images (with ``resolved``: a Region's
    per-class scores already, :class:`_RegionScores`)."""
    n, steps = out.shape[0], out.shape[1] - 1
    if resolved is None:
        clean = out[:, 0] if kind == "deletion" else out[:, -1]
        resolved = resolve_target(clf, target, n, clean)
        probability = score == "probability"
        scores = torch.stack([resolved.score(out[:, k], probability) for k in range(steps + 1)], 1).float()
    else:
        idx = torch.as_tensor(resolved.indices, device=out.device)
        scores = out.gather(2, idx.view(n, 1, 1).expand(n, steps + 1, 1))[..., 0].float()
    return PerturbationCurve(
        kind=kind,
        fractions=torch.arange(steps + 1, device=out.device, dtype=torch.float32) / steps,
        scores=scores,
        auc=auc(scores),
        target=list(resolved.indices),
        method=method,
        labels=list(resolved.labels),
        settings={**settings, "score": "custom" if resolved.fn is not None else score},
    )


def _curves(
    clf: Classifier, x: Tensor, specs: list[tuple[str, Tensor, Target, str]], *, steps: int, baseline: Baseline,
    score: str, batch_size: int | None, sigma: float | None,
) -> list[PerturbationCurve]:
    """The curves of ``specs`` (kind, maps at the input size, target, method name), all of the
    images ``x``, from one :func:`_step_outputs` call."""
    sig = blur_sigma(*x.shape[-2:]) if sigma is None else float(sigma)
    base = make_baseline(baseline, x, sigma=sig).expand_as(x)
    region = specs[0][2]
    reduce = None
    if isinstance(region, Region) and all(t is region for _, _, t, _ in specs):
        reduce = _RegionScores(clf, region, x.shape[0], score == "probability")
    outs, bs, forwards = _step_outputs(clf, x, [(kind, maps) for kind, maps, _, _ in specs], steps, base, batch_size,
                                       reduce)
    log.info("%d curves: %d images x %d steps, %d forwards in batches of %d", len(specs), x.shape[0], steps + 1,
             forwards, bs)
    settings = {"steps": steps, "baseline": describe_baseline(baseline),
                "blur_sigma": sig if baseline == "blur" else None,
                "pixels_per_step": math.ceil(x.shape[-2] * x.shape[-1] / steps), "batch_size": bs, "forwards": forwards}
    resolved = None if reduce is None else reduce.resolved
    return [_curve(kind, clf, out, target, method, score, settings, resolved)
            for (kind, _, target, method), out in zip(specs, outs)]


@renamed(**MODEL_AND_IMAGES, sigma="blur_sigma")
def perturbation_curve(
    kind: CurveKind,
    model: nn.Module | Classifier,
    images: Any,
    saliency: Saliency | Tensor,
    *,
    target: Target = None,
    steps: int = 16,
    baseline: Baseline = "blur",
    score: Score = "probability",
    batch_size: int | None = None,
    blur_sigma: float | None = None,
) -> PerturbationCurve:
    """Deletion (``kind="deletion"``) or insertion curve; see :func:`deletion` and the module doc.

    Args:
        kind: ``"deletion"`` or ``"insertion"``; the other arguments as in :func:`deletion`.
    Returns:
        A :class:`PerturbationCurve` (see :func:`deletion`).
    Raises:
        ValueError: as :func:`deletion`.

    Example::

        curve = perturbation_curve("insertion", clf, x, cam)
        curve.auc
    """
    clf, x = _prepare(kind, model, images, score, steps, batch_size)
    maps, x, target, method = _maps_and_target(saliency, x, target)
    (curve,) = _curves(clf, x, [(kind, maps, target, method)], steps=steps, baseline=baseline, score=score,
                       batch_size=batch_size, sigma=blur_sigma)
    return curve


@renamed(**MODEL_AND_IMAGES, sigma="blur_sigma")
def deletion_insertion(
    model: nn.Module | Classifier,
    images: Any,
    maps: Mapping[str, Saliency | Tensor],
    *,
    target: Target = None,
    steps: int = 16,
    baseline: Baseline = "blur",
    score: Score = "probability",
    batch_size: int | None = None,
    blur_sigma: float | None = None,
) -> DeletionInsertion:
    """The deletion and insertion curves of several maps of the same images, as :func:`deletion`
    and :func:`insertion` give them one by one, with the forwards all the curves share (the clean
    images, the full baseline) run once: ``2 + 2 (steps - 1)`` forwards per image and map instead
    of ``2 (steps + 1)``.

    The other arguments are as in :func:`deletion` (``target`` applies to every map; default each
    map's own).

    Args:
        maps: name -> a :class:`Saliency` or an (N, H, W) / (H, W) tensor, as ``saliency`` there.
    Returns:
        A :class:`~convlens.metrics.results.DeletionInsertion`: name -> ``(deletion curve, insertion
        curve)`` as a read-only dict; ``settings["forwards"]`` of the result counts the forwards of the
        whole call (a curve's, those of its images).
    Raises:
        ValueError: as :func:`deletion`.

    Example::

        curves = deletion_insertion(clf, x, {"gradcam": cam, "occlusion": occ}, steps=8)
        curves["gradcam"][0].auc
    """
    clf, x = _prepare("deletion", model, images, score, steps, batch_size)
    if not maps:
        raise ValueError("no maps to judge")
    prepared = {name: _maps_and_target(sal, x, target) for name, sal in maps.items()}
    groups: dict[int, list[str]] = {}  # maps of the same images (a top=k Saliency picks its own)
    for name, (_, xs, _, _) in prepared.items():
        groups.setdefault(id(xs), []).append(name)
    out: dict[str, tuple[PerturbationCurve, PerturbationCurve]] = {}
    for names in groups.values():
        specs = [(kind, prepared[name][0], prepared[name][2], prepared[name][3]) for name in names for kind in KINDS]
        curves = _curves(clf, prepared[names[0]][1], specs, steps=steps, baseline=baseline, score=score,
                         batch_size=batch_size, sigma=blur_sigma)
        for m, name in enumerate(names):
            out[name] = (curves[2 * m], curves[2 * m + 1])
    firsts = [out[names[0]][0].settings for names in groups.values()]  # one per group of images
    settings = firsts[0].replace(forwards=sum(s["forwards"] for s in firsts))
    return DeletionInsertion({name: out[name] for name in maps}, settings=settings)


@renamed(**MODEL_AND_IMAGES, sigma="blur_sigma")
def deletion(
    model: nn.Module | Classifier,
    images: Any,
    saliency: Saliency | Tensor,
    *,
    target: Target = None,
    steps: int = 16,
    baseline: Baseline = "blur",
    score: Score = "probability",
    batch_size: int | None = None,
    blur_sigma: float | None = None,
) -> PerturbationCurve:
    """Deletion curve: the target's score as the map's most salient pixels are replaced by the
    baseline, ``ceil(H*W/steps)`` more at each of ``steps`` steps (lower AUC = the map found the
    evidence). ``s_k = score(x with the first min(ceil(HW/steps) k, HW) pixels of the map's order
    set to the baseline)``, ``AUC = (sum s - s_0/2 - s_steps/2) / steps``.

    Args:
        model: an ``nn.Module`` or a :class:`convlens.Classifier` (left as it was).
        images: (N, 3, H, W) float tensor (moved to the model's device and dtype), or image(s) that
            :meth:`Classifier.batch` accepts (path, PIL image, array, list of them).
        saliency: a :class:`Saliency` (its ``maps`` and, when ``target`` is None, its
            ``target``; a ``top=k`` result with k rows per image is matched to its images by
            ``settings["image_index"]``) or an (N, H, W) / (H, W) tensor, any device; a map not
            at the input size is resized bilinearly.
        target: as :func:`convlens.grad_cam` (default: the Saliency's targets, else the top-1
            class of the clean image).
        steps: how many steps (>= 1); ``steps + 1`` forwards per image.
        baseline: a number in the model's normalised space, ``"mean"``, ``"blur"`` (default,
            Gaussian with ``blur_sigma`` px, default ``max(H, W) / 22.4``: 10 px at 224 px) or a
            tensor broadcastable to the images.
        score: ``"probability"`` (softmax, or sigmoids for a multi-label model) or ``"logit"`` (a
            callable target scores the logits).
        batch_size: step images per forward (default: by device and memory).
        blur_sigma: the ``"blur"`` baseline's standard deviation in pixels (default
            ``max(H, W) / 22.4``; occlusion's default is ``max(patch) / 4`` instead).
    Returns:
        A :class:`PerturbationCurve` with ``scores`` (N, steps+1) and ``auc`` (N,) float32 and
        ``fractions`` (steps+1,) on the model's device, the targets and the settings.
    Raises:
        ValueError: a bad ``steps``, ``score``, ``baseline`` or ``batch_size``, a map of the
            wrong shape or count or with non-finite values, or a bad target.
        ModelError: the model's output is not (N, classes) logits.

    Example::

        cam = convlens.grad_cam(clf, x)
        convlens.deletion(clf, x, cam).auc     # (N,)
    """
    return perturbation_curve("deletion", model, images, saliency, target=target, steps=steps,
                              baseline=baseline, score=score, batch_size=batch_size, blur_sigma=blur_sigma)


@renamed(**MODEL_AND_IMAGES, sigma="blur_sigma")
def insertion(
    model: nn.Module | Classifier,
    images: Any,
    saliency: Saliency | Tensor,
    *,
    target: Target = None,
    steps: int = 16,
    baseline: Baseline = "blur",
    score: Score = "probability",
    batch_size: int | None = None,
    blur_sigma: float | None = None,
) -> PerturbationCurve:
    """Insertion curve: starting from the baseline, the map's most salient pixels are put back
    from the input, ``ceil(H*W/steps)`` more per step (higher AUC = the map found the evidence).
    ``s_k = score(baseline with the first min(ceil(HW/steps) k, HW) pixels of the map's order
    taken from x)``, ``AUC = (sum s - s_0/2 - s_steps/2) / steps``. Arguments, result and errors
    as in :func:`deletion` (default baseline ``"blur"``, as RISE uses for insertion).

    Example::

        occ = convlens.occlusion(clf, x)
        convlens.insertion(clf, x, occ).plot()
    """
    return perturbation_curve("insertion", model, images, saliency, target=target, steps=steps,
                              baseline=baseline, score=score, batch_size=batch_size, blur_sigma=blur_sigma)
