"""What a method explains: a class per image, or a score computed from the model's output."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .models import Classifier

__all__ = ["Target", "ResolvedTarget", "resolve_target", "Score", "SCORES"]

#: a class index or name for every image, one per image, a callable ``f(output) -> (N,)`` scores,
#: or None for each image's top-1 class
Target = int | str | Sequence[int | str] | Callable[[Tensor], Tensor] | None
#: what a perturbation method scores: the target's softmax probability or its logit
Score = Literal["probability", "logit"]
SCORES: tuple[Score, ...] = ("probability", "logit")


@dataclass(frozen=True)
class ResolvedTarget:
    """A target resolved for a batch: per image the class index (``-1`` for a callable target)
    and a label for titles; ``fn`` the callable, if the target was one.

    ``score(output)`` gives the (N,) scores to explain: the chosen logit per image, or the
    callable's result.
    """

    indices: list[int]
    labels: list[str]
    fn: Callable[[Tensor], Tensor] | None = None

    def score(self, output: Tensor) -> Tensor:
        """The (N,) scores of ``output`` for these targets.

        Args:
            output: (N, classes) model output (logits, or whatever the callable expects), any
                device and dtype.
        Returns:
            (N,) tensor on ``output``'s device, in its dtype (the callable's dtype for a callable).
        Raises:
            ValueError: a callable target that does not return one score per image.
        """
        if self.fn is not None:
            s = self.fn(output)
            if not isinstance(s, Tensor) or s.shape != (output.shape[0],):
                raise ValueError(f"a callable target must return one score per image, shape ({output.shape[0]},)")
            return s
        idx = torch.as_tensor(self.indices, device=output.device)
        return output.gather(1, idx[:, None])[:, 0]


def resolve_target(clf: Classifier, target: Target, n: int, logits: Tensor | None = None) -> ResolvedTarget:
    """Resolve ``target`` for a batch of ``n`` images.

    Args:
        clf: the classifier whose labels name the classes.
        target: ``None``: the top-1 class per image (needs ``logits``); an int or class name:
            that class for every image; a sequence (or 1-D tensor): one int or name per image; a
            callable ``f(output) -> (N,)``: a custom score.
        n: the number of images.
        logits: (n, classes) output of the model on the batch (any device); needed for ``None``
            and used to check that indices are in range.
    Returns:
        A :class:`ResolvedTarget` with ``n`` indices and labels (``-1`` and the callable's name
        for a callable).
    Raises:
        ValueError: an unknown class name, an out-of-range index, a list of the wrong length, a
            target of another type, or ``None`` without ``logits``.

    Example::

        t = resolve_target(clf, "tabby", n=2)    # t.indices == [281, 281]
    """
    if callable(target) and not isinstance(target, (str, int)):
        return ResolvedTarget([-1] * n, [getattr(target, "__name__", "custom score")] * n, target)
    if target is None:
        if logits is None:
            raise ValueError("the top-1 target needs the model's output")
        indices = logits.argmax(dim=1).tolist()
    elif isinstance(target, (int, str)):
        indices = [clf.class_index(target)] * n
    elif isinstance(target, Sequence) or isinstance(target, Tensor):
        items = target.tolist() if isinstance(target, Tensor) else list(target)
        if len(items) != n:
            raise ValueError(f"{len(items)} targets for {n} images; give one per image or a single one")
        indices = [clf.class_index(t) for t in items]
    else:
        raise ValueError(f"a target is an int, a class name, a list of them or a callable, not {type(target).__name__}")
    if logits is not None and max(indices) >= logits.shape[1]:
        raise ValueError(f"class index {max(indices)} is out of range: the model has {logits.shape[1]} outputs")
    return ResolvedTarget(indices, [clf.label(i) for i in indices])
