"""Intermediate activations: convlens vs the floor (bare forward), the spec's hook loop and
captum's LayerActivation, on the same layers (the stage outputs).

``max diff`` = the largest absolute difference to convlens' maps over all layers (0 expected).
The early-stop rows ask for the first stage only: the pass ends there.

Run alone: ``python -m benchmarks --only activations``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .bench_cam import _models, _repeats
from .common import Row, table_rows

log = logging.getLogger(__name__)


def spec_activations(model: nn.Module, img_tensor: Tensor, hook_layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    """The tutorial's technique 1: a forward hook per layer storing ``output.detach().cpu()``,
    a full forward pass, hooks removed afterwards (not in a ``finally``)."""
    activations: dict[str, Tensor] = {}
    hooks = []

    def make_hook(name):
        def hook(module, input, output):
            activations[name] = output.detach().cpu()

        return hook

    for name, layer in hook_layers.items():
        hooks.append(layer.register_forward_hook(make_hook(name)))
    with torch.no_grad():
        _ = model(img_tensor)
    for h in hooks:
        h.remove()
    return activations


def _diff(theirs: dict[str, Tensor] | list[Tensor], ours: dict[str, Tensor]) -> float:
    vals = theirs.values() if isinstance(theirs, dict) else theirs
    return max(float((t.detach().cpu() - o.cpu()).abs().max()) for t, o in zip(vals, ours.values()))


def activation_table(name: str, model: nn.Module, x: Tensor, *, quick: bool, device: str) -> list[Row]:
    import convlens

    ours = convlens.activations(model, x, "stages")
    stages = ours.layers
    mods = {n: dict(model.named_modules())[n] for n in stages}
    first = stages[:1]

    def forward() -> Any:
        with torch.no_grad():
            return model(x)

    all_stages = f"convlens activations, {len(stages)} stages"
    one = f"convlens activations, first stage only ({first[0]})"
    cases: dict[str, Callable[[], Any]] = {
        "bare forward (floor)": forward,
        all_stages: lambda: convlens.activations(model, x, stages),
        one: lambda: convlens.activations(model, x, first),
        SPEC: lambda: spec_activations(model, x, mods),
    }
    extra: dict[str, dict[str, Any]] = {
        SPEC: {"max diff": _diff(spec_activations(model, x, mods), ours.maps)},
    }
    try:
        from captum.attr import LayerActivation

        la = LayerActivation(model, list(mods.values()))
        cases["captum LayerActivation"] = lambda: la.attribute(x)
        extra["captum LayerActivation"] = {"max diff": _diff(la.attribute(x), ours.maps)}
        la1 = LayerActivation(model, mods[first[0]])
        cases["captum LayerActivation, first stage only"] = lambda: la1.attribute(x)
    except ImportError:
        log.warning("captum not installed: row skipped")

    rows = table_rows(
        cases, model=name, batch=x.shape[0], device=device, repeats=_repeats(forward, quick),
        floor="bare forward (floor)", extra=extra,
    )
    ratios = {all_stages: {"captum / this": "captum LayerActivation", "spec / this": SPEC},
              one: {"captum / this": "captum LayerActivation, first stage only"}}
    for r in rows:  # declared here, filled by the harness between best settings
        r.ratios = ratios.get(r.method, {})
    return rows


SPEC = "spec hook loop (.detach().cpu())"


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """One table per model: the stage outputs of one 224 px image."""
    out = []
    for name, model, x in _models(quick, device):
        out.append((f"Activations of the stage outputs, one {x.shape[-1]} px image, {name}",
                    activation_table(name, model, x, quick=quick, device=device)))
    return out
