"""Occlusion: brute force vs the tutorial's loop vs captum vs our exact and approximate paths.

Tables (rows measured side by side with ``measure``, one repeat: the long rows take minutes):

- the default EfficientNet-Lite0 at patch 40 / stride 20 with every contender, and at 16 / 8 with
  brute force, captum (``perturbations_per_eval`` 16) and our paths; ResNet-50 (random init) at
  16 / 8 with brute force and our paths (``--quick``: the 40 / 20 table only);
- ``brute force``: one forward of the model per window of ours, as that many single (batch 1)
  forwards of the clean image; at 16 / 8 (729 windows) timed on every 8th window and scaled.
- ``spec loop``: the tutorial's ``occlusion_sensitivity`` (clone, grey patch, one forward per
  window, windows only on the stride grid); at 40 / 20 only.
- ``captum ppe=N``: ``captum.attr.Occlusion`` on softmax(model), N windows per forward.
- ``exact``: ``convlens.occlusion(mode="exact")`` (the default); ``approximate``: ``mode="approximate"``;
  ``+ refine``: ``refine=True`` (a coarse lattice of windows, then the full stride only in the top
  share of its cells).

Columns: ``x brute force`` and ``x exact`` (the named row's seconds over this row's: a speed-up,
filled by the harness between best thread settings), ``r vs exact`` (Pearson r of the map with our
exact map), ``work share`` (estimated multiply-adds over those of one full forward per window,
``settings["work"]``), ``windows evaluated`` (the share of windows computed; refinement interpolates
the rest), and for the exact row the largest difference of its drops from those of ``fast=False``
(one full forward per window, run untimed, once) over the largest drop: float32 rounding, not a choice.
A last table (once, not per thread setting): the approximate and refined maps' r against the exact map
on the five natural photos, with their share of work and of windows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import common
from .common import NO_FLOOR, Row, compare_maps, measure

REFINE = True  # the default share, convlens.methods.occlusion.DEFAULT_REFINE
R50_CONFIGS = [(16, 8, False, ["exact", "approximate", "approximate + refine"])]
MODES = {"exact": {}, "approximate": {"mode": "approximate"}, "exact + refine": {"refine": REFINE},
         "approximate + refine": {"mode": "approximate", "refine": REFINE}}


def spec_occlusion(model, img_tensor, target_class, patch=40, stride=20):
    """The tutorial's loop (seed-tutorial.txt, technique 4), as written there."""
    _, _, H, W = img_tensor.shape
    with torch.no_grad():
        base_prob = F.softmax(model(img_tensor), dim=1)[0, target_class].item()
    sensitivity = np.zeros((H, W), dtype=np.float32)
    counts = np.zeros((H, W), dtype=np.float32)
    for y in range(0, H - patch + 1, stride):
        for x in range(0, W - patch + 1, stride):
            occluded = img_tensor.clone()
            occluded[:, :, y : y + patch, x : x + patch] = 0.0
            with torch.no_grad():
                prob = F.softmax(model(occluded), dim=1)[0, target_class].item()
            drop = base_prob - prob
            sensitivity[y : y + patch, x : x + patch] += drop
            counts[y : y + patch, x : x + patch] += 1.0
    counts = np.where(counts == 0, 1, counts)
    return sensitivity / counts


def _models(device: str, quick: bool):
    """(name, model, input, [(patch, stride, peers, modes), ...]) per model."""
    import torchvision

    import convlens

    clf = convlens.load_model(device=device)
    default = [(40, 20, True, list(MODES))] + ([] if quick else [(16, 8, True, list(MODES))])
    out = [("efficientnet_lite0 (default)", clf.model, clf.preprocess(convlens.sample_image()), default)]
    if not quick:
        torch.manual_seed(0)
        r50 = torchvision.models.resnet50().eval().to(device)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
        out.append(("resnet50 (random init)", r50, x, R50_CONFIGS))
    return out


def _table(name, model, x, patch, stride, device, peers, modes):
    """One table: brute force, (``peers``) the spec loop at 40 / 20 and captum, and our ``modes``."""
    from convlens.methods.occlusion import occlusion, window_starts

    h, w = x.shape[-2:]
    n_ours = len(window_starts(h, patch, stride)) * len(window_starts(w, patch, stride))
    n_spec = len(range(0, h - patch + 1, stride)) * len(range(0, w - patch + 1, stride))
    with torch.no_grad():
        target = int(model(x).argmax(1))
    results: dict[str, object] = {}
    every = 8 if n_ours > 500 else 1

    def keep(key, fn):
        def run():
            results[key] = fn()

        return run

    def floor():
        with torch.no_grad():
            for _ in range(0, n_ours, every):
                model(x)

    brute = f"brute force: {n_ours} single forwards" + (f" (timed on every {every}th, scaled)" if every > 1 else "")
    cases = {brute: floor}
    if peers and every == 1:
        cases["spec loop"] = keep("spec loop", lambda: spec_occlusion(model, x, target, patch, stride))
    if peers:
        cases.update(_captum_cases(model, x, target, patch, stride, device, keep, [4, 16] if every == 1 else [16]))
    for mode in modes:
        cases[mode] = keep(mode, lambda kw=MODES[mode]: occlusion(model, x, target=target, patch=patch,
                                                                  stride=stride, **kw))
    times = measure(cases, repeats=1, warmup=0, device=device)
    times[brute] *= every
    plain = occlusion(model, x, target=target, patch=patch, stride=stride, fast=False) if common.PRIMARY else None
    exact = results["exact"]
    rows = []
    for key, t in times.items():
        res = results.get(key)
        ours = res is not None and hasattr(res, "maps")
        grid_only = key == "spec loop" or key.startswith("captum")
        m = res.maps[0] if ours else res
        extra = {
            "windows": n_spec if grid_only else n_ours,
            "r vs exact": None if m is None else compare_maps(m, exact.maps[0])[1],
            "work share": res.settings["work"] if ours else 1.0,
            "windows evaluated": res.settings["windows_evaluated"] / n_ours if ours else 1.0,
            "max |drop diff| / max |drop|": (
                float((exact.raw - plain.raw).abs().max() / plain.raw.abs().max())
                if key == "exact" and plain is not None else None
            ),
        }
        ratios = {} if key == brute else {"x brute force": brute}
        if key in MODES and key != "exact":
            ratios["x exact"] = "exact"
        rows.append(Row(key, name, 1, t, extra=extra, floor=NO_FLOOR, ratios=ratios))
    return rows


def _captum_cases(model, x, target, patch, stride, device, keep, ppes):
    """captum's Occlusion at each ``perturbations_per_eval`` (none when captum is not installed)."""
    try:
        from captum.attr import Occlusion
    except ImportError:
        return {}

    def softmax_model(z):
        return torch.softmax(model(z), 1)

    cases = {}
    for ppe in [64, 256] if device != "cpu" else ppes:
        def run_captum(ppe=ppe):
            with torch.no_grad():
                return Occlusion(softmax_model).attribute(
                    x, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride),
                    target=target, baselines=0.0, perturbations_per_eval=ppe,
                )[0, 0]

        cases[f"captum ppe={ppe}"] = keep(f"captum ppe={ppe}", run_captum)
    return cases


def _photos() -> dict:
    """The five natural photos (PIL images): skimage's four and matplotlib's Grace Hopper."""
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    photos = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
              "rocket": data.rocket()}
    out = {name: Image.fromarray(arr) for name, arr in photos.items()}
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        out["grace_hopper"] = Image.open(f).convert("RGB")
    return out


def _photo_table(device: str) -> list[Row]:
    """Approximate and refined vs exact on the five natural photos, default model, patch 16 / stride 8
    (seconds: the exact map's, one run; the speed-ups are in the 16 / 8 table)."""
    import time

    import convlens
    from convlens.methods.occlusion import occlusion

    clf = convlens.load_model(device=device)
    rows = []
    for name, img in _photos().items():
        x = clf.preprocess(img)
        t0 = time.perf_counter()
        exact = occlusion(clf, x, patch=16, stride=8)
        t_exact = time.perf_counter() - t0
        extra = {"label": exact.labels[0]}
        for key in ("approximate", "exact + refine", "approximate + refine"):
            res = occlusion(clf, x, patch=16, stride=8, target=exact.target, **MODES[key])
            extra[f"r {key}"] = compare_maps(res.maps, exact.maps)[1]
            extra[f"work {key}"] = res.settings["work"]
            extra[f"windows {key}"] = res.settings["windows_evaluated"] / math.prod(res.settings["windows"])
        rows.append(Row(f"photo: {name}", "efficientnet_lite0 (default)", 1, t_exact, floor=NO_FLOOR, extra=extra))
    return rows


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """The occlusion tables (see the module docstring); the photo table in the primary worker only."""
    out = []
    for name, model, x, configs in _models(device, quick):
        for patch, stride, peers, modes in configs:
            rows = _table(name, model, x, patch, stride, device, peers, modes)
            out.append((f"Occlusion, {name}, patch {patch} / stride {stride}, 224 px, {device}", rows))
    if not quick and common.PRIMARY:
        out.append((f"Occlusion, approximate and refined vs exact on five natural photos, patch 16 / stride 8, "
                    f"{device} (median s = the exact map's seconds)", _photo_table(device)))
    return out
