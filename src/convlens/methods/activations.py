"""Intermediate activations: what each layer sees, from one forward pass that stops early.

The requested layers' outputs are captured with forward hooks (``LayerCapture``); the pass ends
as soon as the deepest of them has run, so asking for ``layer1`` of a ResNet costs a fraction
of a full forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

from torch import Tensor, nn

from .._compat import MODEL_AND_IMAGES, renamed
from ..checks import check_maps
from ..hooks import LayerCapture, model_guard
from ..layers import LayerError, LayerSpec, call_counts, find_stages, forget, missing_layer, remembered, resolve_layers
from ..layout import LayoutName, Reshape, channels_last_model, layout_for
from ..models import Classifier, as_classifier
from ..results import Activations

__all__ = ["activations"]

log = logging.getLogger(__name__)


@renamed(**MODEL_AND_IMAGES)
def activations(
    model: nn.Module | Classifier,
    images: Tensor | object,
    layers: Literal["stages"] | LayerSpec | Iterable[LayerSpec] = "stages",
    *,
    layout: LayoutName | None = None,
    reshape: Reshape | None = None,
) -> Activations:
    """The outputs of ``layers`` for ``images``, each (N, C, h, w), in execution order.

    ``layers``: dotted names, modules, glob patterns (``"layer*"``) or ``"stages"``, the model's
    stage outputs found automatically (:func:`convlens.layers.find_stages`: ResNet's ``relu,
    layer1..4``, EfficientNet's ``blocks.N``, VGG's maps before each pooling). A module that runs
    several times is captured at its last call, ``"name#k"`` at its k-th. ``images``: a tensor or
    image(s) preprocessed by the classifier (cast to the model's dtype). Maps are float32 on the
    model's device. The model is left as it was. Each output is read through its layout
    (:mod:`convlens.layout`): a token layer (N, T, C) comes back as (N, C, gh, gw) on the patch
    grid without its prefix tokens (``settings["layouts"]`` names them), a channels-last one
    permuted; ``layout``/``reshape`` override the inference (default: the classifier's).

    Args:
        model: an ``nn.Module`` (its inputs taken as preprocessed) or a
            :class:`convlens.Classifier`.
        images: (N, C, H, W) float tensor (moved to the model's device and dtype), or image(s) that
            :meth:`Classifier.batch` accepts (path, PIL image, array, list of them).
        layers: ``"stages"``, or names, ``name#k`` calls, glob patterns or modules.
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"`` for every layer, overriding the inference.
        reshape: a callable ``tensor -> (N, C, h, w)`` for every layer, overriding ``layout``.
    Returns:
        :class:`convlens.Activations`: ``maps`` name -> (N, C, h, w) float32 on the model's
        device, in execution order; ``images`` (N, 3, H, W) float32 RGB in [0, 1].
    Raises:
        LayerError: an unknown name, a pattern that matches nothing, no stages found, a layer
            that did not run (or ran fewer times than ``#k``) or whose output's layout cannot be
            inferred.
        NonFiniteError: NaN or infinity in a captured map (a ``ValueError``).
        ValueError, ImageError: bad ``images`` (see :meth:`Classifier.batch`).

    Example::

        acts = activations(load_model(), sample_image(), "stages")
        acts.plot().savefig("activations.png")
    """
    clf = as_classifier(model)
    x = clf.batch(images)
    model = clf.model
    if isinstance(layers, str) and layers == "stages":
        key = ("stages", tuple(x.shape[1:]))
        try:
            chosen = resolve_layers(model, remembered(model, key, lambda: find_stages(model, x[:1])))
        except LayerError:  # the model was changed since the stages were found: find them again
            forget(model)
            chosen = resolve_layers(model, remembered(model, key, lambda: find_stages(model, x[:1])))
    else:
        chosen = resolve_layers(model, layers)
    counts = call_counts(model, x[:1])  # remembered: the pass can stop at a module's last call
    with model_guard(model), LayerCapture(chosen, stop_early=True, calls=counts) as cap:
        cap.run(model, x)
        outputs = dict(cap.outputs)
    missing = [n for n in chosen if n not in outputs]
    if missing:
        raise missing_layer(missing[0], cap.counts)
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    cl = channels_last_model(model)  # once, not per layer: it looks at every module
    lays = {n: layout_for(clf, n, chosen[n], tuple(t.shape), hw, layout=layout, reshape=reshape, batch=len(x),
                          channels_last=cl) for n, t in outputs.items()}
    # hooks fire in execution order: the dict keeps the order in which the network computed them
    maps = {n: lays[n].apply(t.detach()).float().contiguous() for n, t in outputs.items()}
    check_maps(maps, "the output of {name}", "activations of {name}", "every channel holds one value")
    log.info("activations of %s", ", ".join(f"{n} {tuple(t.shape[1:])}" for n, t in maps.items()))
    return Activations(
        maps=maps,
        images=clf.denormalise(x.detach()),
        settings={
            "layers": list(maps),
            "stages": isinstance(layers, str) and layers == "stages",
            **({"layouts": {n: lay.settings() for n, lay in lays.items()}}
               if any(lay.kind != "nchw" for lay in lays.values()) else {}),
        },
    )
