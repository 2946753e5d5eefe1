"""Feature visualisation timing: the spec's eight-filter figure, and seconds per channel.

Table 1: the spec's figure (ResNet-50, random init; filters 0/8/16/32 of ``conv1`` and
0/64/128/256 of ``layer3[-1].conv3``; 60 steps, 128 px): the spec's loop (written below from
the tutorial: one image at a time, full forward, ``loss.backward()`` with parameter gradients)
against ``feature_visualization(param="pixel", transforms=())`` (the same update rule, one batch
per layer, stop at the layer, image gradients only), our defaults, and lucent's ``render_vis``
when importable. 20 steps (``quick``: 10) instead of the tutorial's 60: the cost is linear in steps.
``x faster than spec`` = the spec loop's seconds / the row's, at their best thread settings.
The tutorial's loop steps along the gradient of ``-activation``, so it *lowers* the activation
(its "mean obj" column is negative); it is timed as written.
Table 2: seconds per channel at the defaults for the default model, at a shallow and a middle
layer, against the bare floor (forward, and forward + input-only backward, to blocks.4, same batch
and steps); ``x floor`` is relative to the latter, for the blocks.4 rows.

Run alone: ``python -m benchmarks --only featureviz [--quick] [--threads N]``.
"""

from __future__ import annotations

import inspect
import time

import numpy as np
import torch
from torch import nn

from benchmarks.common import NO_FLOOR, Row, measure

CONV1 = [0, 8, 16, 32]
SPEC = "spec loop (8 x full fwd + backward with param grads)"
LAYER3 = [0, 64, 128, 256]


# -- the spec's implementation (seed tutorial, technique 2), kept as written there ---------------
def spec_visualize_filter(model: nn.Module, target_layer: nn.Module, filter_idx: int, n_steps: int = 60,
                          lr: float = 0.05, size: int = 128) -> tuple[np.ndarray, torch.Tensor]:
    """The tutorial's gradient ascent; returns its uint8 image and (for scoring) the raw input."""
    device = next(model.parameters()).device
    x = torch.randn(1, 3, size, size, device=device) * 0.1
    x.requires_grad_(True)
    captured = {}

    def fwd_hook(module, inp, out):
        captured["act"] = out

    hook = target_layer.register_forward_hook(fwd_hook)
    for _ in range(n_steps):
        if x.grad is not None:
            x.grad.zero_()
        model(x)  # full forward pass
        loss = -captured["act"][0, filter_idx].mean()
        loss.backward()
        x.data += lr * x.grad / (x.grad.std() + 1e-8)
    hook.remove()
    img = x.detach().squeeze(0).permute(1, 2, 0).cpu().numpy()
    img -= img.min()
    mx = img.max()
    if mx > 0:
        img /= mx
    return (img * 255).astype(np.uint8), x.detach()


def _score(model: nn.Module, layer: nn.Module, x: torch.Tensor, channels: list[int]) -> list[float]:
    """Channel means of ``layer`` for inputs ``x`` (one per channel)."""
    from convlens import LayerCapture, model_guard

    cap = LayerCapture({"l": layer}, stop_early=True)
    with model_guard(model), cap:
        cap.run(model, x)
    return [float(cap["l"][i, c].mean()) for i, c in enumerate(channels)]


def _cpu_timed(cases: dict) -> dict[str, list[float]]:
    """Wrap each case so its process CPU time is recorded too: on a shared machine CPU seconds
    (with one thread) are steadier than wall seconds."""
    spent: dict[str, list[float]] = {name: [] for name in cases}

    def wrap(name, fn):
        def run():
            t = time.process_time()
            fn()
            spent[name].append(time.process_time() - t)

        return run

    for name in list(cases):
        cases[name] = wrap(name, cases[name])
    return spent


def _median(v: list[float]) -> float:
    return float(np.median(v)) if v else float("nan")


def _figure_table(quick: bool, device: str) -> list[Row]:
    import torchvision

    from convlens import feature_visualization

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(device)
    steps = 10 if quick else 20
    targets = [(model.conv1, CONV1, "conv1"), (model.layer3[-1].conv3, LAYER3, "layer3.5.conv3")]
    scores: dict[str, list[float]] = {}

    def floor() -> None:
        x = torch.zeros(8, 3, 128, 128, device=device)
        with torch.no_grad():
            for _ in range(steps):
                model(x)

    def spec() -> None:
        out = []
        for layer, chans, _ in targets:
            xs = torch.cat([spec_visualize_filter(model, layer, c, n_steps=steps)[1] for c in chans])
            out += _score(model, layer, xs, chans)
        scores[SPEC] = out

    def ours(name: str, **kw):
        def run() -> None:
            out = []
            for layer, chans, _ in targets:
                res = feature_visualization(model, layer, chans, steps=steps, size=128, **kw)
                out += res.objective.tolist()
            scores[name] = out

        return run

    pixel, fourier = "ours param=pixel transforms=() (batched per layer, stop early)", "ours defaults (fourier)"
    cases = {
        "floor: full forward of the 8 images (no grad) x steps": floor,
        SPEC: spec,
        pixel: ours(pixel, param="pixel", transforms=()),
        fourier: ours(fourier),
    }
    try:
        from lucent.optvis import objectives, param, render

        def lucent(key: str, fft: bool, transforms: list | None):
            def run() -> None:
                out = []
                for layer, chans, label in targets:
                    name = label.replace(".", "_")
                    for c in chans:
                        img = render.render_vis(
                            model, objectives.channel(name, c), lambda: param.image(128, fft=fft, decorrelate=fft),
                            transforms=transforms, thresholds=(steps,), progress=False, show_image=False,
                            fixed_image_size=128,
                        )[0]
                        x = torch.from_numpy(img).permute(0, 3, 1, 2).to(device)
                        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
                        std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
                        out += _score(model, layer, (x - mean) / std, [c])
                scores[key] = out

            return run

        for key, fft, tfs in [("lucent render_vis pixel (sigmoid), no transforms", False, []),
                              ("lucent render_vis fft+decorrelate, standard transforms", True, None)]:
            cases[key] = lucent(key, fft, tfs)
    except ImportError:  # lucent (torch-lucent) not installed: its rows are skipped
        pass
    cpu = _cpu_timed(cases)
    times = measure(cases, repeats=1, warmup=0, device=device)
    floor_name = next(iter(cases))
    rows = []
    for name, sec in times.items():
        extra: dict = {"steps": steps, "cpu s": _median(cpu[name])}
        if name in scores:
            extra["mean obj conv1"] = float(np.mean(scores[name][:4]))
            extra["mean obj layer3"] = float(np.mean(scores[name][4:]))
        ratios = {} if name in (floor_name, SPEC) else {"x faster than spec": SPEC}
        rows.append(Row(name, "resnet50 (random init)", 8, sec, extra=extra, floor=floor_name, ratios=ratios))
    return rows


def _per_channel_table(quick: bool, device: str) -> list[Row]:
    from convlens import LayerCapture, feature_visualization, load_model, model_guard
    from convlens.layers import resolve_layer

    clf = load_model(device=device)
    n = 2
    layers = ["blocks.4"] if quick else ["conv_stem", "blocks.4"]
    defaults = inspect.signature(feature_visualization).parameters  # through any wrapper (functools.wraps)
    steps, size = defaults["steps"].default, defaults["size"].default
    name, module = resolve_layer(clf.model, "blocks.4")

    def floor(backward: bool):
        def run() -> None:
            x = torch.zeros(n, 3, size, size, device=device, requires_grad=backward)
            with model_guard(clf.model), LayerCapture({name: module}, stop_early=True) as cap:
                for p in clf.model.parameters():
                    p.requires_grad_(False)
                for _ in range(steps):
                    cap.run(clf.model, x, input_grad=backward)
                    if backward:
                        torch.autograd.grad(cap[name][:, 0].mean(), x)

        return run

    cases = {
        f"floor: forward to blocks.4, batch {n}, x {steps} (no grad)": floor(False),
        f"floor: forward + input backward to blocks.4, batch {n}, x {steps}": floor(True),
    }
    cases.update({f"ours defaults, {layer}, {n} channels": (lambda layer=layer: feature_visualization(
        clf, layer, list(range(n)))) for layer in layers})
    cpu = _cpu_timed(cases)
    times = measure(cases, repeats=1, warmup=0, device=device)
    base = list(cases)[1]
    return [Row(label, clf.name, n, sec, extra={"s per channel": sec / n, "cpu s per channel": _median(cpu[label]) / n},
                floor=base if "blocks.4" in label else NO_FLOOR)
            for label, sec in times.items()]


TABLES = {
    "figure": ("Feature visualisation: the spec's eight-filter figure (ResNet-50, 128 px)", _figure_table),
    "channel": ("Feature visualisation: seconds per channel at the defaults (default model)", _per_channel_table),
}


def tables(quick: bool, device: str, only: str | None = None) -> list[tuple[str, list[Row]]]:
    """The feature-visualisation tables (see the module docstring)."""
    return [(title, fn(quick, device)) for key, (title, fn) in TABLES.items() if only in (None, key)]
