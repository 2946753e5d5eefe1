"""Occlusion: ours vs the tutorial's loop vs captum vs the floor (one forward per window).

Rows per table (all measured side by side with ``measure``):
- ``floor``: one forward of the model per window of ours, as that many single (batch 1) forwards
  on the clean image: what any one-forward-per-window method costs at least.
- ``spec loop``: the tutorial's ``occlusion_sensitivity`` (written here from the spec: clone, grey
  patch, one forward per window, windows only on the stride grid, so the last rows/columns stay
  uncovered when ``(224 - patch) % stride != 0``).
- ``captum ppe=K``: ``captum.attr.Occlusion`` with forward = softmax of the model, at several
  ``perturbations_per_eval``; the best one is marked.
- ``ours (plain path)``: ``convlens.occlusion(..., fast=False)``: one full forward per window.
- ``ours``: ``convlens.occlusion`` as shipped (the crop path when the model allows it).

Extra columns: windows evaluated, pixels left uncovered, max |difference| to captum's map on the
pixels where both use the same windows (all of them when the placements coincide).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

try:
    from .common import Row, measure
except ImportError:  # run as a script from benchmarks/
    from common import Row, measure  # type: ignore[no-redef]


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


def _models(device: str):
    import torchvision

    import convlens

    torch.manual_seed(0)
    r50 = torchvision.models.resnet50().eval().to(device)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    out = [("resnet50 (random init)", r50, x)]
    clf = convlens.load_model(device=device)
    out.append(("efficientnet_lite0 (default)", clf.model, clf.preprocess(convlens.sample_image())))
    return out


def _table(name, model, x, patch, stride, device, quick):
    from convlens.methods.occlusion import occlusion, window_starts

    h, w = x.shape[-2:]
    n_ours = len(window_starts(h, patch, stride)) * len(window_starts(w, patch, stride))
    n_spec = len(range(0, h - patch + 1, stride)) * len(range(0, w - patch + 1, stride))
    with torch.no_grad():
        target = int(model(x).argmax(1))
    results: dict[str, object] = {}

    def keep(key, fn):
        def run():
            results[key] = fn()

        return run

    def floor():
        with torch.no_grad():
            for _ in range(n_ours):
                model(x)

    cases = {f"floor: {n_ours} single forwards": floor}
    cases["spec loop"] = keep("spec", lambda: spec_occlusion(model, x, target, patch, stride))
    ppes = [1, 4] if quick else [1, 4, 16]
    if device != "cpu":
        ppes = [16, 64, 256]
    try:
        from captum.attr import Occlusion

        def softmax_model(z):
            return torch.softmax(model(z), 1)

        for ppe in ppes:
            def run_captum(ppe=ppe):
                with torch.no_grad():
                    return Occlusion(softmax_model).attribute(
                        x, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride),
                        target=target, baselines=0.0, perturbations_per_eval=ppe,
                    )[0, 0]

            cases[f"captum ppe={ppe}"] = keep(f"captum{ppe}", run_captum)
    except ImportError:
        pass
    cases["ours (plain path)"] = keep("plain", lambda: occlusion(model, x, target=target, patch=patch, stride=stride,
                                                                 fast=False).maps[0])
    cases["ours"] = keep("ours", lambda: occlusion(model, x, target=target, patch=patch, stride=stride).maps[0])
    times = measure(cases, repeats=1 if quick else 2, warmup=0, device=device)

    ref = next((results[k] for k in results if k.startswith("captum")), None)
    last = window_starts(h, patch, stride)[-1]
    shared = slice(0, last) if last != range(0, h - patch + 1, stride)[-1] else slice(None)

    def diff(key):
        if ref is None or key not in results:
            return None
        m = torch.as_tensor(results[key]).float().cpu()
        return float((m[shared, shared] - ref.float().cpu()[shared, shared]).abs().max())

    floor_s = times[next(iter(cases))]
    best_captum = min((t for k, t in times.items() if k.startswith("captum")), default=None)
    spec_cover = (range(0, h - patch + 1, stride)[-1] + patch) * (range(0, w - patch + 1, stride)[-1] + patch)
    rows = []
    for key, t in times.items():
        short = {"spec loop": "spec", "ours (plain path)": "plain", "ours": "ours"}.get(key)
        grid_only = key == "spec loop" or key.startswith("captum")
        extra = {
            "windows": n_spec if grid_only else n_ours,
            "uncovered px": h * w - spec_cover if grid_only else 0,
            "max|diff| vs captum": diff(short) if short else None,
        }
        if key.startswith("floor"):
            extra = {"windows": n_ours}
        label = key + (" (best)" if key.startswith("captum") and t == best_captum else "")
        rows.append(Row(label, name, 1, t, t / floor_s, extra=extra))
    return rows


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """Occlusion tables: each model at patch 40 / stride 20 and (not quick) patch 16 / stride 8."""
    out = []
    configs = [(40, 20)] if quick else [(40, 20), (16, 8)]
    for name, model, x in _models(device):
        for patch, stride in configs:
            rows = _table(name, model, x, patch, stride, device, quick)
            out.append((f"Occlusion, {name}, patch {patch} / stride {stride}, 224 px, {device}", rows))
    return out
