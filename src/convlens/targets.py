"""What a method explains: a class per image, a class over a region of a dense output, or a score
computed from the model's output."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .models import Classifier, require_logits

__all__ = ["Target", "Region", "ResolvedTarget", "resolve_target", "Score", "SCORES"]


@dataclass(frozen=True, eq=False)
class Region:
    """A class over a region of a dense (N, classes, H, W) output (a segmenter's): the score is
    ``sum_{h, w} output[n, cls, h, w] * mask[n, h, w]``, every pixel when ``mask`` is None, as
    pytorch-grad-cam's ``SemanticSegmentationTarget``. With ``score="probability"`` (occlusion,
    deletion / insertion) it is the mean of the class's per-pixel probability over the mask
    (:meth:`Classifier.probabilities`), in [0, 1].

    Args:
        cls: a class index or name, or one per image.
        mask: (H, W) for every image or (N, H, W), bool or float weights, at the output's size;
            None for every pixel.

    Example::

        cam = convlens.grad_cam(seg, x, target=convlens.Region("cat", mask=out.argmax(1) == 8))
    """

    cls: int | str | Sequence[int | str]
    mask: Tensor | None = None


#: a class index or name for every image, one per image, a :class:`Region` of a dense output, a
#: callable ``f(output) -> (N,)`` scores, or None for each image's top-1 class
Target = int | str | Sequence[int | str] | Region | Callable[[Tensor], Tensor] | None
#: what a perturbation method scores: the target's probability (softmax, or sigmoid for a
#: multi-label model) or its logit
Score = Literal["probability", "logit"]
SCORES: tuple[Score, ...] = ("probability", "logit")


@dataclass(frozen=True)
class ResolvedTarget:
    """A target resolved for a batch: per image the class index (``-1`` for a callable target)
    and a label for titles; ``fn`` the callable, if the target was one; ``masks`` (N, H, W) the
    region of a :class:`Region` target; ``probabilities`` the classifier's
    :meth:`Classifier.probabilities`.

    ``score(output)`` gives the (N,) scores to explain: the chosen logit per image (summed over
    the region for a Region), or the callable's result.
    """

    indices: list[int]
    labels: list[str]
    fn: Callable[[Tensor], Tensor] | None = None
    masks: Tensor | None = field(default=None, repr=False)
    probabilities: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    @property
    def scored(self) -> bool:
        """True when the score is not one logit of a 2-D output (a callable or a region): methods
        then differentiate or evaluate :meth:`score` itself."""
        return self.fn is not None or self.masks is not None

    def select(self, rows: Sequence[int]) -> ResolvedTarget:
        """The target of the images ``rows`` (repeats allowed), for an output whose rows are those
        images (occlusion's windows, Score-CAM's masked copies)."""
        masks = None if self.masks is None else self.masks[index_tensor(list(rows), self.masks.device)]
        return ResolvedTarget([self.indices[r] for r in rows], [self.labels[r] for r in rows], self.fn, masks,
                              self.probabilities)

    def per_class(self, output: Tensor, probability: bool = False) -> Tensor:
        """(N, classes) scores of every class for these images: the output (its probabilities with
        ``probability``), for a region summed over the mask (with ``probability`` its mean).

        Raises:
            ModelError: a class target on an output that is not (N, classes).
        """
        if probability and self.probabilities is None:
            raise ValueError("probabilities need the classifier's rule: resolve the target with resolve_target")
        values = self.probabilities(output) if probability else output
        if self.masks is None:
            return require_logits(values)
        m = self.masks.to(values.device, values.dtype)
        summed = (values * m[:, None]).sum((2, 3))
        return summed / m.sum((1, 2)).clamp_min(1e-12)[:, None] if probability else summed

    def score(self, output: Tensor, probability: bool = False) -> Tensor:
        """The (N,) scores of ``output`` for these targets.

        Args:
            output: (N, classes) model output ((N, classes, H, W) for a region; whatever a
                callable expects), any device and dtype.
            probability: score the class's probability (:meth:`Classifier.probabilities`)
                instead of its logit; a callable always receives the output as it is.
        Returns:
            (N,) tensor on ``output``'s device, in its dtype (float32 for probabilities; the
            callable's dtype for a callable).
        Raises:
            ValueError: a callable target that does not return one score per image.
            ModelError: a class target on an output that is not (N, classes).
        """
        if self.fn is not None:
            s = self.fn(output)
            if not isinstance(s, Tensor) or s.shape != (output.shape[0],):
                raise ValueError(f"a callable target must return one score per image, shape ({output.shape[0]},)")
            return s
        values = self.per_class(output, probability)
        return values.gather(1, index_tensor(self.indices, values.device)[:, None])[:, 0]


def index_tensor(values: Sequence[int], device: torch.device) -> Tensor:
    """``values`` as a long tensor on ``device``, copied from the host without waiting for the
    device (``torch.tensor(list, device="cuda")`` and ``t[list]`` copy synchronously: the host
    waits for all the work queued before, once per batch in a loop)."""
    return torch.tensor(values, dtype=torch.long, device="cpu").to(device, non_blocking=True)


def _region_masks(region: Region, n: int, out: Tensor | None) -> Tensor:
    """The region's (n, H, W) float mask at the size of the dense output ``out``."""
    if out is None:
        raise ValueError("a Region target needs the model's output")
    if out.dim() != 4:
        raise ValueError(
            f"a Region target needs a dense (N, classes, H, W) output; the model's is {tuple(out.shape)} "
            "(pass output= to pick it, e.g. output=lambda o: o['out'])"
        )
    h, w = out.shape[-2:]
    if region.mask is None:
        return torch.ones(n, h, w, device=out.device)
    mask = torch.as_tensor(region.mask, device=out.device)
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, n):
        raise ValueError(f"a Region's mask must be ({h}, {w}) or ({n}, {h}, {w}) like the output, "
                         f"got {tuple(mask.shape)}")
    mask = mask.to(out.device, torch.float32).expand(n, h, w)
    if not torch.isfinite(mask).all() or not (mask.flatten(1) != 0).any(1).all():
        raise ValueError("a Region's mask is empty (or not finite) for some image; it must select pixels")
    return mask


def resolve_target(clf: Classifier, target: Target, n: int, logits: Tensor | None = None) -> ResolvedTarget:
    """Resolve ``target`` for a batch of ``n`` images.

    Args:
        clf: the classifier whose labels name the classes.
        target: ``None``: the top-1 class per image (needs ``logits``); an int or class name:
            that class for every image; a sequence (or 1-D tensor): one int or name per image; a
            :class:`Region` of a dense output; a callable ``f(output) -> (N,)``: a custom score.
        n: the number of images.
        logits: (n, classes) output of the model on the batch (any device), (n, classes, H, W)
            for a Region; needed for ``None`` and a Region, and used to check that indices are in
            range.
    Returns:
        A :class:`ResolvedTarget` with ``n`` indices and labels (``-1`` and the callable's name
        for a callable).
    Raises:
        ValueError: an unknown class name, an out-of-range index, a list of the wrong length, a
            target of another type, ``None`` without ``logits``, a Region on an output that is
            not dense or with a mask that does not fit.
        ModelError: a class target on an output that is not (N, classes).

    Example::

        t = resolve_target(clf, "tabby", n=2)    # t.indices == [281, 281]
    """
    probs = clf.probabilities
    if callable(target) and not isinstance(target, (str, int)):
        return ResolvedTarget([-1] * n, [getattr(target, "__name__", "custom score")] * n, target, None, probs)
    masks = None
    if isinstance(target, Region):
        masks = _region_masks(target, n, logits)
        target = target.cls
    elif logits is not None:
        require_logits(logits)
    if target is None:
        if logits is None:
            raise ValueError("the top-1 target needs the model's output")
        if masks is not None:
            raise ValueError("a Region needs a class (an index or name)")
        indices = logits.argmax(dim=1).tolist()
    elif isinstance(target, (int, str)):
        indices = [clf.class_index(target)] * n
    elif isinstance(target, Sequence) or isinstance(target, Tensor):
        items = target.tolist() if isinstance(target, Tensor) else list(target)
        if len(items) != n:
            raise ValueError(f"{len(items)} targets for {n} images; give one per image or a single one")
        indices = [clf.class_index(t) for t in items]
    else:
        raise ValueError(f"a target is an int, a class name, a list of them, a Region or a callable, "
                         f"not {type(target).__name__}")
    if logits is not None and max(indices) >= logits.shape[1]:
        raise ValueError(f"class index {max(indices)} is out of range: the model has {logits.shape[1]} outputs")
    return ResolvedTarget(indices, [clf.label(i) for i in indices], None, masks, probs)
