"""A model with its own preprocessing and labels: :class:`Classifier`, what it predicts
(:class:`Prediction`, :func:`top_predictions`), how its raw outputs become logits
(:func:`model_output`), and :func:`as_classifier` for any ``nn.Module``. Loading a model by name or
from a checkpoint is :mod:`convlens.models`, which re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._compat import IMAGES, renamed
from .hooks import model_guard
from .images import ImageSource, load_image

Interpolation = Literal["nearest", "bilinear", "bicubic"]
Resize = Literal["square", "shorter"]
_INTERPOLATIONS = {"nearest", "bilinear", "bicubic"}


class ModelError(ValueError):
    """An unknown model name, missing weights, or a checkpoint that does not fit."""


#: Maps whatever a model's forward returns to the tensor the techniques explain.
OutputAdapter = Callable[[Any], Tensor]


def model_output(out: Any) -> Tensor:
    """The tensor to explain in a model's raw output, the default output adapter.

    A tensor is taken as is; a mapping with a ``"logits"`` key (Hugging Face ``ModelOutput``) or an
    object with a ``logits`` tensor attribute gives that; a tuple or list gives its first tensor
    (auxiliary heads, ``(logits, features)``). Anything else raises :class:`ModelError`, asking for
    ``output=``: a callable ``raw -> (N, classes) tensor`` on :class:`Classifier`,
    :func:`load_model` or :func:`as_classifier`.

    Args:
        out: what ``model(x)`` returned.
    Returns:
        The output tensor, on the model's device, in the model's dtype.
    Raises:
        ModelError: when no tensor can be found.

    Example::

        model_output((logits, aux)) is logits                 # True
        model_output({"logits": logits, "hidden": h}) is logits
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        found = out.get("logits")
        if isinstance(found, Tensor):
            return found
    found = getattr(out, "logits", None)
    if isinstance(found, Tensor):
        return found
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, Tensor):
                return item
    raise ModelError(
        f"the model returned {type(out).__name__}, in which convlens finds no logits tensor; "
        "pass output=callable(raw_output) -> (N, classes) tensor to Classifier/load_model/as_classifier"
    )


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k list: its ``label``, class ``index`` and ``probability`` (softmax, or the
    class's own sigmoid for a multi-label model: :meth:`Classifier.probabilities`)."""

    label: str
    index: int
    probability: float

    def __str__(self) -> str:
        return f"{self.label} ({self.probability:.1%})"


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names (from torchvision's metadata; no download).

    Returns:
        A list of 1000 names, index ``i`` the name of class ``i``.
    """
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


class Classifier:
    """An image classifier with the preprocessing and labels that belong to it.

    ``preprocess`` resizes, scales to [0, 1] and normalises with the model's ``mean``/``std``.
    Nothing is cropped, so every explanation covers the whole photo. ``resize="square"`` (the
    default, as the models' own evaluation and the tutorial do) gives ``size`` x ``size``;
    ``"shorter"`` scales the shorter side to ``size`` and keeps the aspect ratio; ``size=None``
    keeps the image's own size.

    Example::

        clf = Classifier(my_net, mean=(0.5,) * 3, std=(0.5,) * 3, size=224, labels=names)
        best = clf.predict(clf.preprocess("cat.jpg"))[0][0]  # .label, .index, .probability

    ``output``: how to get the tensor to explain from what the model returns (default
    :func:`model_output`: a tensor, the first tensor of a tuple/list, or ``.logits`` /
    ``["logits"]``); every technique goes through it. Inputs follow the model: ``preprocess`` and
    ``batch`` return tensors on the model's device in its floating dtype (float16, bfloat16 and
    float64 models work; the methods compute their maps in float32 or wider).

    Args:
        model: the network (an ``nn.Module``; kept, never copied; its device is the classifier's).
        mean: three channel means of the model's input normalisation, for RGB in [0, 1].
        std: three channel standard deviations (> 0).
        size: the side of the square input (``resize="square"``), the shorter side
            (``"shorter"``), or None for the image's own size; at least 8.
        interpolation: Pillow's resampling filter for resizing.
        labels: the class names, index ``i`` naming class ``i``: one per output (a count that
            differs from the model's outputs is a ``ValueError`` at the first forward).
        name: a display name (default: the model's class name).
        weights: where the weights came from, for reports.
        resize: ``"square"`` or ``"shorter"`` (see above).
        output: ``raw_output -> tensor`` (default :func:`model_output`).
        layout: how every layer's output lies on the image, when it cannot be inferred:
            ``"nchw"``, ``"nhwc"`` or ``"tokens"`` (:mod:`convlens.layout`); a technique's own
            ``layout=`` wins.
        reshape: a callable ``tensor -> (N, C, h, w)`` for every layer's output (as
            pytorch-grad-cam's ``reshape_transform``); wins over ``layout``.
        multi_label: the outputs are independent sigmoid logits (one yes/no per class), not one
            softmax over the classes (see :meth:`probabilities`); ``output`` still gives logits.

    ``size=(H, W)`` gives a fixed non-square input. One-channel models take ``mean=(m,)``,
    ``std=(s,)``: images are converted to grayscale (results still show them as RGB).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``output``/``reshape`` is not callable.
        ValueError: bad ``mean``/``std``, ``interpolation``, ``resize``, ``size`` or ``layout``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        size: int | tuple[int, int] | None = 224,
        interpolation: Interpolation = "bilinear",
        labels: Sequence[str] | None = None,
        name: str | None = None,
        weights: str | None = None,
        resize: Resize = "square",
        output: OutputAdapter | None = None,
        layout: str | None = None,
        reshape: Callable[[Tensor], Tensor] | None = None,
        multi_label: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Classifier wraps an nn.Module, not {type(model).__name__}")
        sized = all(hasattr(v, "__len__") and not isinstance(v, str) for v in (mean, std))
        if not sized or len(mean) not in (1, 3) or len(std) != len(mean) or any(s <= 0 for s in std):
            raise ValueError("mean and std need three values each (RGB), e.g. mean=(0.5, 0.5, 0.5), or one each "
                             f"(grayscale), e.g. mean=(0.5,), std > 0; got mean={mean!r}, std={std!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if resize not in ("square", "shorter"):
            raise ValueError("resize must be 'square' or 'shorter'")
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or resize != "square":
                raise ValueError("size=(H, W) takes two sides and resize='square'")
            size = (int(size[0]), int(size[1]))
        if size is not None and min(size if isinstance(size, tuple) else (size,)) < 8:
            raise ValueError("size must be at least 8 pixels")
        if layout is not None and layout not in ("nchw", "nhwc", "tokens"):
            raise ValueError(f"layout must be 'nchw', 'nhwc' or 'tokens', not {layout!r}")
        if reshape is not None and not callable(reshape):
            raise TypeError(f"reshape must be a callable tensor -> (N, C, h, w), not {type(reshape).__name__}")
        if output is not None and not callable(output):
            raise TypeError(f"output must be a callable raw_output -> tensor, not {type(output).__name__}")
        self.model = model
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.size = size
        self.interpolation = interpolation
        self.resize = resize
        self.labels = list(labels) if labels is not None else None
        self.name = name or type(model).__name__
        self.weights = weights
        self.output = output
        self.layout = layout
        self.reshape = reshape
        self.multi_label = bool(multi_label)

    def __repr__(self) -> str:
        return (
            f"Classifier({self.name}, size={self.size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r}, device={self.device}"
            f"{', multi_label=True' if self.multi_label else ''})"
        )

    def with_model(self, model: nn.Module, **changes: Any) -> Classifier:
        """A copy of this classifier around ``model`` (a private copy of the network, say) that keeps
        every other attribute: preprocessing, labels, the output adapter, ``multi_label`` and
        whatever else a Classifier holds; ``changes`` set some of them anew. The one way convlens
        makes a classifier from another, so none of them is lost on the way.

        Args:
            model: the network of the copy.
            changes: attributes to change (``name=...``, ``output=...``); each must exist.
        Returns:
            A new :class:`Classifier` (a shallow copy: ``labels`` is copied, the rest shared).
        Raises:
            TypeError: ``model`` is not an ``nn.Module``, or an unknown attribute is given.

        Example::

            private = clf.with_model(copy.deepcopy(clf.model), name="randomised copy")
        """
        import copy

        if not isinstance(model, nn.Module):
            raise TypeError(f"Classifier wraps an nn.Module, not {type(model).__name__}")
        clf = copy.copy(self)
        clf.model = model
        clf.labels = None if self.labels is None else list(self.labels)
        for key, value in changes.items():
            if not hasattr(self, key) or key == "model":
                raise TypeError(f"a Classifier has no attribute {key!r} to change")
            setattr(clf, key, value)
        return clf

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities from the model's output, in float32: ``softmax`` over the classes
        (dim 1), or for a ``multi_label`` model each class's own ``sigmoid`` (they need not sum to
        1). Every probability convlens shows or scores (predictions, occlusion and deletion /
        insertion with ``score="probability"``, compare, the report, the explorer) comes from here.

        Args:
            logits: (N, classes) or dense (N, classes, H, W) output, any device and dtype.
        Returns:
            The same shape, float32, on ``logits``' device.

        Example::

            clf.probabilities(clf.logits(x))[0, 281]
        """
        logits = logits.float()  # float32 for half models
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=1)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter or buffer (CPU for a stateless model)."""
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's first floating parameter or buffer (float32 if none)."""
        for t in self.model.parameters():
            if t.is_floating_point():
                return t.dtype
        for t in self.model.buffers():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def adapt(self, raw: Any) -> Tensor:
        """The tensor to explain in a raw model output: ``output(raw)`` when an ``output=`` callable
        was given, else :func:`model_output`.

        Args:
            raw: what ``model(x)`` returned.
        Returns:
            The tensor (on the model's device, in its dtype).
        Raises:
            ModelError: none is found, ``output=`` returned something other than a tensor, or
                the number of outputs (dim 1) is not the number of ``labels`` (a ``ValueError``).

        Example::

            logits = clf.adapt(clf.model(x))
        """
        out = (self.output or model_output)(raw)
        if not isinstance(out, Tensor):
            raise ModelError(f"output= returned {type(out).__name__}, not a tensor")
        if self.labels is not None and out.dim() >= 2 and out.shape[1] != len(self.labels):
            raise ModelError(
                f"the model gives {out.shape[1]} outputs per image but {len(self.labels)} labels were given; "
                "give one name per output (or a model whose head has that many classes)"
            )
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``adapt(model(x))`` as is: no guard, no grad-mode change (for use inside a method).

        Args:
            x: (N, C, H, W) model-ready tensor on the model's device, in its dtype.
        Returns:
            The adapted output, usually (N, classes) logits, on the model's device.
        Raises:
            ModelError: as :meth:`adapt`.

        Example::

            with torch.no_grad():
                logits = clf.forward(x)
        """
        return self.adapt(self.model(x))

    def to(self, device: str | torch.device) -> Classifier:
        """Move the model to ``device`` (``"cpu"``, ``"cuda"``, ``torch.device``...); returns ``self``."""
        self.model.to(device)
        return self

    def label(self, index: int) -> str:
        """The class name of ``index``, or ``"class N"`` when the model has no labels (or the index
        is out of their range)."""
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def class_index(self, target: int | str) -> int:
        """A class index from an index or a class name (exact, then case-insensitive).

        Args:
            target: an int, a string of digits (``"285"``) or a class name.
        Returns:
            The class index.
        Raises:
            ValueError: a bool, an index out of range, a name when the model has no labels, an
                unknown name (with close matches), a name of several classes, or another type.
        """
        if isinstance(target, bool):
            raise ValueError("a target is a class index or name, not a bool")
        if isinstance(target, int):
            n = len(self.labels) if self.labels is not None else None
            if target < 0 or (n is not None and target >= n):
                raise ValueError(f"class index {target} is out of range (0..{(n or 1) - 1})")
            return target
        if isinstance(target, str):
            if target.strip().lstrip("-").isdigit():
                return self.class_index(int(target))
            if self.labels is None:
                raise ValueError(f"the model has no class names; give {target!r} as an index")
            for same in (str.__str__, str.lower):  # exact, then case-insensitive
                found = [i for i, label in enumerate(self.labels) if same(label) == same(target)]
                if len(found) > 1:  # ImageNet's 'Cardigan' (a dog) and 'cardigan' (a sweater) for "CARDIGAN"
                    names = ", ".join(f"{i} {self.labels[i]!r}" for i in found)
                    raise ValueError(f"class name {target!r} is ambiguous ({names}); give the index")
                if found:
                    return found[0]
            import difflib

            close = difflib.get_close_matches(target, self.labels, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown class {target!r}{hint}")
        raise ValueError(f"a target is a class index or name, not {type(target).__name__}")

    # -- preprocessing -----------------------------------------------------------------
    @property
    def channels(self) -> int:
        """The model's input channels: 3 (RGB) or 1 (grayscale), from ``mean``."""
        return len(self.mean)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``mean`` and ``std`` as (1, C, 1, 1) tensors on ``x``'s device in its dtype: made on the
        CPU and copied without waiting (``torch.tensor(..., device="cuda")`` waits for the device,
        and this runs in Grad-CAM's every call and feature visualisation's every step)."""
        mean, std = (torch.tensor(v, dtype=x.dtype, device="cpu").view(1, -1, 1, 1).to(x.device, non_blocking=True)
                     for v in (self.mean, self.std))
        return mean, std

    def _normalise(self, x: Tensor) -> Tensor:
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalise(self, x: Tensor) -> Tensor:
        """Undo the normalisation: model input -> RGB in [0, 1] (clamped; a grayscale input is
        repeated over the three channels, for display).

        Args:
            x: (N, C, H, W) model input (C = 3, or 1 for a grayscale model), any device and
                floating dtype.
        Returns:
            (N, 3, H, W) float32 on ``x``'s device.
        """
        x = x.float()
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after resizing an image of ``height`` x ``width`` (the input size
        the model gets)."""
        if self.size is None:
            return height, width
        if isinstance(self.size, tuple):
            return self.size
        if self.resize == "square":
            return self.size, self.size
        scale = self.size / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def preprocess(self, images: ImageSource | Sequence[ImageSource]) -> Tensor:
        """Image(s) -> normalised tensor, resized as the model expects (:meth:`target_size`).

        Images of different shapes in one call are each resized to the first one's size.

        Args:
            images: one image or a list/tuple of them: a path, bytes, a PIL image or a numpy
                array (anything :func:`convlens.load_image` reads).
        Returns:
            (N, 3, H, W) tensor on the model's device, in its dtype (normalised in float32, then
            cast).
        Raises:
            ValueError: an empty list.
            ImageError: an image that cannot be read.
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no images given")
        import numpy as np
        from PIL import Image

        resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
        batch = []
        size: tuple[int, int] | None = None
        for item in items:
            img = load_image(item)
            if self.channels == 1:  # ITU-R 601 luma, as Pillow's "L" mode
                img = img.convert("L")
            size = size or self.target_size(img.height, img.width)
            if (img.height, img.width) != size:
                # Pillow's filters antialias when shrinking, as the models' own pipelines do
                img = img.resize((size[1], size[0]), resample[self.interpolation])
            arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
            batch.append(arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1))
        return self._normalise(torch.stack(batch).to(self.device)).to(self.dtype)

    @renamed(x=IMAGES)
    def batch(self, images: Tensor | ImageSource | Sequence[ImageSource]) -> Tensor:
        """A model-ready batch: float tensors pass through (a 3-D tensor gains the batch axis),
        images are preprocessed, and so is an integer tensor: raw pixels, such as the uint8
        (C, H, W) of ``torchvision.io.read_image``, never a normalised batch.

        Args:
            images: an (N, C, H, W) or (C, H, W) float tensor, already normalised, on any device;
                or an integer one of pixels in [0, 255]; or what :meth:`preprocess` takes. This is
                the one resolver every technique uses.
        Returns:
            (N, C, H, W) tensor on the model's device, in its dtype.
        Raises:
            ValueError: a tensor of another rank, or an empty list.
            ImageError: an image that cannot be read.
        """
        x = images
        if isinstance(x, Tensor):
            if x.dim() == 3:
                x = x[None]
            if x.dim() != 4:
                raise ValueError(f"expected a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
            if not x.is_floating_point():  # pixels: read as images, not taken as normalised values
                return self.preprocess([t.permute(1, 2, 0).cpu().numpy() for t in x])
            return x.to(self.device, self.dtype)
        return self.preprocess(x)

    # -- prediction --------------------------------------------------------------------
    @renamed(x=IMAGES)
    def logits(self, images: Tensor | ImageSource | Sequence[ImageSource]) -> Tensor:
        """Logits for a batch, without gradients, in eval mode, through the output adapter; the
        model is left as it was.

        Args:
            images: what :meth:`batch` takes.
        Returns:
            (N, classes) tensor on the model's device, in its dtype.
        Raises:
            ModelError: the adapted output is not (N, classes).
            ValueError, ImageError: as :meth:`batch`.
        """
        return require_logits(self.outputs(images))

    @renamed(x=IMAGES)
    def outputs(self, images: Tensor | ImageSource | Sequence[ImageSource]) -> Tensor:
        """The adapted output for a batch as :meth:`logits` gives it, without the (N, classes)
        check: dense outputs such as a segmenter's (N, classes, H, W) too.

        Args:
            images: what :meth:`batch` takes.
        Returns:
            The adapted output on the model's device, in its dtype.
        Raises:
            ModelError, ValueError, ImageError: as :meth:`adapt` and :meth:`batch`.
        """
        with model_guard(self.model), torch.no_grad():
            return self.forward(self.batch(images))

    @renamed(x=IMAGES)
    def predict(self, images: Tensor | ImageSource | Sequence[ImageSource], top: int = 5) -> list[list[Prediction]]:
        """Top-``top`` predictions per image, most probable first (:meth:`probabilities`: softmax of
        the logits, or independent sigmoids for a ``multi_label`` model; float32).

        Args:
            images: what :meth:`batch` takes.
            top: how many classes per image (clamped to 1 .. the number of classes).
        Returns:
            One list of :class:`Prediction` per image.
        Raises:
            ModelError, ValueError, ImageError: as :meth:`logits`.
        """
        probs = self.probabilities(self.logits(images))
        return top_predictions(probs, top, self.label)


def top_predictions(probs: Tensor, top: int, label: Callable[[int], str]) -> list[list[Prediction]]:
    """The ``top`` most probable classes per row of ``probs`` (N, classes), most probable first:
    the one top-k of :meth:`Classifier.predict`, ``explain`` and the explorer. ``top`` is clamped to
    1 .. the number of classes; ``label(index)`` names a class."""
    k = max(1, min(int(top), probs.shape[1]))
    values, indices = probs.topk(k, dim=1)
    return [
        [Prediction(label(int(i)), int(i), float(p)) for p, i in zip(vals, idxs)]
        for vals, idxs in zip(values.cpu(), indices.cpu())
    ]


def require_logits(out: Tensor) -> Tensor:
    """``out`` when it is (N, classes) logits (a 2-D tensor).

    Raises:
        ModelError: anything else (a ``ValueError``).
    """
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        dense = isinstance(out, Tensor) and out.dim() == 4
        raise ModelError(
            f"the model's output is {shape}, not (N, classes) logits; "
            + ("for a dense output (a segmenter's) give target=convlens.Region(class, mask)"
               if dense else "pass output= to pick them (or a callable target that scores the output)")
        )
    return out


def as_classifier(model: nn.Module | Classifier, *, output: OutputAdapter | None = None) -> Classifier:
    """A :class:`Classifier` as is, or a bare module wrapped with identity normalisation
    (its inputs are then taken to be already preprocessed tensors). ``output``: the output
    adapter for a bare module (see :class:`Classifier`); a Classifier keeps its own unless one is
    given, in which case a copy with that adapter is returned.

    Args:
        model: an ``nn.Module`` or a :class:`Classifier`.
        output: the output adapter.
    Returns:
        A :class:`Classifier` (the given one, a shallow copy, or a new wrapper of the module).
    Raises:
        TypeError: anything else.

    Example::

        clf = as_classifier(hf_model)                          # .logits found automatically
        clf = as_classifier(net, output=lambda out: out["scores"])
    """
    if isinstance(model, Classifier):
        return model if output is None else model.with_model(model.model, output=output)
    if isinstance(model, nn.Module):
        return Classifier(model, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), size=None, output=output)
    raise TypeError(f"expected an nn.Module or a convlens.Classifier, not {type(model).__name__}")
