"""Occlusion: brute force vs the tutorial's loop vs captum vs our exact and approximate paths.

Per model (ResNet-50 with random weights, the default EfficientNet-Lite0) and patch / stride
(40/20, 16/8, 8/4), rows measured side by side with ``measure`` (one repeat: the long rows take
minutes):
- ``brute force``: one forward of the model per window of ours, as that many single (batch 1)
  forwards of the clean image. At 8/4 (2809 windows) it is timed on every 8th window and scaled.
- ``spec loop``: the tutorial's ``occlusion_sensitivity`` (clone, grey patch, one forward per
  window, windows only on the stride grid). Not at 8/4.
- ``captum``: ``captum.attr.Occlusion`` on softmax(model) at several ``perturbations_per_eval``
  at 40/20; the best one is marked and used at 16/8. Not at 8/4.
- ``exact, old crop path``: the crop path as it was before issue 16 (``occlusion_v0.py``: batches
  of 4, blocks as boundaries).
- ``exact``: ``convlens.occlusion(mode="exact")`` (the default): since issue 16's second round a
  channels-last private copy with batch norm folded into the convolutions, TF-same padding read
  exactly, crops gathered and pasted for a whole batch at once.
- ``exact, batch 16``: the same with ``batch_size=16``, shown only where the default batch differs.
- ``approximate``: ``mode="approximate"`` (tau 0.9).
- ``exact + refine``, ``approximate + refine``: with ``refine=True`` (the default share, 0.3:
  a coarse lattice of windows, then the full stride only in the top share of its cells).

Columns: seconds, x brute force (the brute force's seconds over the row's: a speed-up), Pearson r
of the map with the exact map, the share of work: the estimated multiply-adds done over those of
one full forward per window (``settings["work"]``), the share of the windows evaluated
(``settings["windows_evaluated"]`` over the windows; the rest are interpolated), and for the exact
row (not at 8/4) the largest difference of its drops from those of ``fast=False`` (one full
forward per window, run untimed) over the largest drop: float32 rounding, not a choice.
A second table: the approximate and refined maps' r against the exact map on the five natural
photos, with their share of work and of windows and their speed-up over the exact map.

Just the rows of issue 16's speed target (both models, brute force, exact, approximate, approximate +
refine, one process; a few minutes): ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_occlusion.py
[--patch 16 --stride 8 --repeats 1 --photos]`` (:func:`side_by_side`; prints the load average too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

try:
    from .common import Row, compare_maps, measure
except ImportError:  # run as a script from benchmarks/
    from common import Row, compare_maps, measure  # type: ignore[no-redef]

REFINE = True  # the default share, convlens.methods.occlusion.DEFAULT_REFINE


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


def _table(name, model, x, patch, stride, device, quick, best_ppe, peers=True):
    """One table; ``peers=False`` leaves out the spec loop, captum and the old crop path (they do
    not change with convlens; a shorter run for the refinement rows)."""
    from convlens.methods.occlusion import occlusion, window_starts

    try:
        from . import occlusion_v0
    except ImportError:
        import occlusion_v0  # type: ignore[no-redef]

    h, w = x.shape[-2:]
    n_ours = len(window_starts(h, patch, stride)) * len(window_starts(w, patch, stride))
    n_spec = len(range(0, h - patch + 1, stride)) * len(range(0, w - patch + 1, stride))
    with torch.no_grad():
        target = int(model(x).argmax(1))
    results: dict[str, object] = {}
    big = n_ours > 1000
    every = 8 if big else 1

    def keep(key, fn):
        def run():
            results[key] = fn()

        return run

    def floor():
        with torch.no_grad():
            for _ in range(0, n_ours, every):
                model(x)

    floor_key = f"brute force: {n_ours} single forwards" + (f" (timed on every {every}th, scaled)" if big else "")
    cases = {floor_key: floor}
    if not big and peers:
        cases["spec loop"] = keep("spec", lambda: spec_occlusion(model, x, target, patch, stride))
        try:
            from captum.attr import Occlusion

            def softmax_model(z):
                return torch.softmax(model(z), 1)

            ppes = [best_ppe] if best_ppe else ([4] if quick else [4, 16])
            if device != "cpu":
                ppes = [64, 256]
            for ppe in ppes:
                def run_captum(ppe=ppe):
                    with torch.no_grad():
                        return Occlusion(softmax_model).attribute(
                            x, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride),
                            target=target, baselines=0.0, perturbations_per_eval=ppe,
                        )[0, 0]

                cases[f"captum ppe={ppe}" + (" (best at 40/20)" if best_ppe else "")] = keep(f"captum{ppe}", run_captum)
        except ImportError:
            pass
    if peers and device == "cpu":  # the frozen old path was written for the CPU only
        cases["exact, old crop path"] = keep("old", lambda: occlusion_v0.occlusion_map(model, x, target, patch, stride))
    cases["exact"] = keep("exact", lambda: occlusion(model, x, target=target, patch=patch, stride=stride))
    cases["approximate"] = keep("approx", lambda: occlusion(model, x, target=target, patch=patch, stride=stride,
                                                            mode="approximate"))
    for mode in ("exact", "approximate"):
        cases[f"{mode} + refine"] = keep(f"{mode} refine", lambda mode=mode: occlusion(
            model, x, target=target, patch=patch, stride=stride, mode=mode, refine=REFINE))
    times = measure(cases, repeats=1, warmup=0, device=device)
    times[floor_key] *= every
    plain = None if big else occlusion(model, x, target=target, patch=patch, stride=stride, fast=False)

    exact = results["exact"]
    floor_s = times[floor_key]
    captum_times = {k: t for k, t in times.items() if k.startswith("captum")}
    best = min(captum_times, key=captum_times.get) if captum_times else None
    rows = []
    for key, t in times.items():
        short = {"spec loop": "spec", "exact, old crop path": "old", "exact": "exact", "approximate": "approx",
                 "exact + refine": "exact refine", "approximate + refine": "approximate refine"}.get(key)
        if key.startswith("captum"):
            short = "captum" + key.split("=")[1].split()[0]
        res = results.get(short) if short else None
        m, work, windows = None, None, 1.0
        if isinstance(res, tuple):  # the old path: (map, estimate)
            m, work = res
        elif res is not None and hasattr(res, "maps"):
            m, work = res.maps[0], res.settings["work"]
            windows = res.settings["windows_evaluated"] / n_ours
        elif res is not None:
            m = res
        grid_only = key == "spec loop" or key.startswith("captum")
        extra = {
            "x brute force": floor_s / t,
            "windows": n_spec if grid_only else n_ours,
            "r vs exact": None if m is None else compare_maps(m, exact.maps[0])[1],
            "work share": 1.0 if key == floor_key or grid_only else work,
            "windows evaluated": windows,
            "max |drop diff| / max |drop|": (
                float((exact.raw - plain.raw).abs().max() / plain.raw.abs().max())
                if key == "exact" and plain is not None else None
            ),
        }
        label = key + (" (best)" if key == best and not best_ppe else "")
        rows.append(Row(label, name, 1, t, t / floor_s, extra=extra))
    best_ppe = best_ppe or (int(best.split("=")[1]) if best else None)
    return rows, best_ppe


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
    """Approximate and refined vs exact on the five natural photos, default model, patch 16 / stride 8."""
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
        for key, kw in (("approximate", {"mode": "approximate"}), ("exact + refine", {"refine": REFINE}),
                        ("approximate + refine", {"mode": "approximate", "refine": REFINE})):
            t0 = time.perf_counter()
            res = occlusion(clf, x, patch=16, stride=8, target=exact.target, **kw)
            t = time.perf_counter() - t0
            extra[f"r {key}"] = compare_maps(res.maps, exact.maps)[1]
            extra[f"work {key}"] = res.settings["work"]
            extra[f"windows {key}"] = res.settings["windows_evaluated"] / math.prod(res.settings["windows"])
            extra[f"x exact {key}"] = t_exact / t
        rows.append(Row(f"photo: {name}", "efficientnet_lite0 (default)", 1, t_exact, None, extra=extra))
    return rows


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """Occlusion tables: each model at 40/20, and (not quick) 16/8 and 8/4; then the photos."""
    out = []
    configs = [(40, 20)] if quick else [(40, 20), (16, 8), (8, 4)]
    for name, model, x in _models(device):
        best_ppe = None
        for patch, stride in configs:
            rows, best_ppe = _table(name, model, x, patch, stride, device, quick, best_ppe)
            out.append((f"Occlusion, {name}, patch {patch} / stride {stride}, 224 px, {device}", rows))
    if not quick:
        out.append((f"Occlusion, approximate and refined vs exact on five natural photos, patch 16 / stride 8, "
                    f"{device} (median s = the exact map's seconds)", _photo_table(device)))
    return out


def side_by_side(patch: int = 16, stride: int = 8, repeats: int = 1, photos: bool = False,
                 device: str = "cpu") -> list[tuple[str, list[Row]]]:
    """The rows issue 16's speed target reads, for both models in one process, cases interleaved:
    brute force, exact, approximate, approximate + refine at one patch / stride (and, with
    ``photos``, the approximate + refine map's r vs the exact one on the five natural photos).
    Much shorter than :func:`tables` (no peers, no plain-path reference run)."""
    from convlens.methods.occlusion import occlusion, window_starts

    models = _models(device)
    results: dict[str, object] = {}
    cases = {}
    for name, model, x in models:
        h, w = x.shape[-2:]
        n_windows = len(window_starts(h, patch, stride)) * len(window_starts(w, patch, stride))
        with torch.no_grad():
            target = int(model(x).argmax(1))

        def floor(model=model, x=x, n=n_windows):
            with torch.no_grad():
                for _ in range(n):
                    model(x)

        cases[f"{name}|brute force: {n_windows} single forwards"] = floor
        for label, kw in (("exact", {}), ("approximate", {"mode": "approximate"}),
                          ("approximate + refine", {"mode": "approximate", "refine": REFINE})):
            def run(key=f"{name}|{label}", model=model, x=x, target=target, kw=kw):
                results[key] = occlusion(model, x, target=target, patch=patch, stride=stride, **kw)

            cases[f"{name}|{label}"] = run
    times = measure(cases, repeats=repeats, warmup=0, device=device)
    out = []
    for name, _, _ in models:
        keys = [k for k in times if k.startswith(name + "|")]
        floor_s = times[keys[0]]
        rows = []
        for key in keys:
            res = results.get(key)
            exact = results[f"{name}|exact"]
            extra = {
                "x brute force": floor_s / times[key],
                "work share": res.settings["work"] if res is not None else 1.0,
                "windows evaluated": res.settings["windows_evaluated"] / math.prod(res.settings["windows"])
                if res is not None else 1.0,
                "r vs exact": compare_maps(res.maps[0], exact.maps[0])[1] if res is not None else None,
                "last boundary": res.settings["boundaries"][-1] if res is not None and res.settings["boundaries"]
                else None,
            }
            rows.append(Row(key.split("|", 1)[1], name, 1, times[key], times[key] / floor_s, extra=extra))
        out.append((f"Occlusion, {name}, patch {patch} / stride {stride}, 224 px, {device}, side by side", rows))
    if photos:
        title = "Approximate + refine vs exact, five natural photos, default model"
        out.append((title, _photo_r(device, patch, stride)))
    return out


def _photo_r(device: str, patch: int, stride: int) -> list[Row]:
    """The approximate + refine map's r vs the exact map on the five natural photos (default
    model); seconds: the approximate + refine call's (one run)."""
    import time

    import convlens
    from convlens.methods.occlusion import occlusion

    clf = convlens.load_model(device=device)
    rows = []
    for name, img in _photos().items():
        x = clf.preprocess(img)
        t0 = time.perf_counter()
        exact = occlusion(clf, x, patch=patch, stride=stride)
        t1 = time.perf_counter()
        res = occlusion(clf, x, patch=patch, stride=stride, target=exact.target, mode="approximate", refine=REFINE)
        t2 = time.perf_counter()
        rows.append(Row(f"photo: {name}", "efficientnet_lite0 (default)", 1, t2 - t1, extra={
            "r approximate + refine": compare_maps(res.maps, exact.maps)[1], "work": res.settings["work"],
            "windows evaluated": res.settings["windows_evaluated"] / math.prod(res.settings["windows"]),
            "x exact": (t1 - t0) / (t2 - t1)}))
    return rows


if __name__ == "__main__":
    import argparse
    import os

    from common import markdown_table  # type: ignore[no-redef]

    parser = argparse.ArgumentParser(description=side_by_side.__doc__)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--photos", action="store_true")
    args = parser.parse_args()
    print("load average before:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    for title, rows in side_by_side(args.patch, args.stride, args.repeats, args.photos):
        print(markdown_table(title, rows))
    print("load average after:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
