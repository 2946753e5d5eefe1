"""Map metrics: deletion + insertion per image against the floor and the peers, and the issue's
numbers (deletion / insertion AUC, class sensitivity, sanity check per method) reproduced.

Speed table (default model, Grad-CAM map of the sample photo, 16 steps = 34 forwards):
- ``floor: 34 forwards in one batch``: the same number of forwards as one batch, the bound the
  issue names; ``floor: 34 single forwards``: the same as batch-1 forwards (faster on a CPU).
- ``ours``: ``convlens.deletion`` + ``convlens.insertion`` (blur baseline) as shipped, and with
  every step image in one batch (``batch_size=17``).
- ``pytorch-grad-cam ROADCombined``: ROAD (Rong et al. 2022) at its default 9 percentiles, most-
  and least-relevant first (18 forwards plus its noisy linear imputation per percentile).
- ``quantus PixelFlipping``: Quantus 0.6's pixel flipping (black baseline, its default) when Quantus
  is installed (optional peer; skipped with a note otherwise). Its step must divide H*W but it flips
  (C, H, W) values in the map's order, so H*W/16 values per step makes 48 steps (48 forwards).
  Quantus's MPRT is not timed: it randomises the model layer by layer (hundreds of layers here).

Reproduction table (not with ``--quick``; once, in the primary worker: its numbers do not depend
on threads): every method of ``convlens.compare`` on five photos that
ship with scikit-image and matplotlib (no download), mean over the photos; class sensitivity also
against the issue's fixed other class, "tench".
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import torch

from . import common
from .common import Row, table_rows

log = logging.getLogger(__name__)


def _photos(clf, quick: bool):
    import convlens

    images = [("chelsea (sample)", convlens.sample_image())]
    if not quick:
        import skimage.data
        from matplotlib import cbook

        for name in ("coffee", "astronaut", "rocket"):
            images.append((name, getattr(skimage.data, name)()))
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            from PIL import Image

            images.append(("grace_hopper", Image.open(f).convert("RGB")))
    return images


def _speed_table(clf, x, quick: bool, device: str) -> list[Row]:
    import convlens

    model = clf.model
    cam = convlens.grad_cam(clf, x)
    target = cam.target[0]
    batch = x.expand(34, -1, -1, -1).contiguous()
    results: dict[str, object] = {}

    def floor_batch() -> None:
        with torch.no_grad():
            model(batch)

    def floor_single() -> None:
        with torch.no_grad():
            for i in range(34):
                model(batch[i : i + 1])

    def ours() -> None:
        results["ours"] = (convlens.deletion(clf, x, cam), convlens.insertion(clf, x, cam))

    def ours_batched() -> None:
        results["batched"] = (convlens.deletion(clf, x, cam, batch_size=17),
                              convlens.insertion(clf, x, cam, batch_size=17))

    cases = {
        "floor: 34 forwards in one batch": floor_batch,
        "floor: 34 single forwards": floor_single,
        "ours: deletion + insertion (16 steps)": ours,
        "ours, batch_size=17 (one batch per curve)": ours_batched,
    }
    extra: dict[str, dict[str, object]] = {k: {"forwards": 34} for k in cases}
    try:
        from pytorch_grad_cam.metrics.road import ROADCombined
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

        cams = cam.maps.detach().cpu().numpy()

        def road() -> None:
            with torch.no_grad():
                results["road"] = ROADCombined()(x, cams, [ClassifierOutputSoftmaxTarget(target)], model)

        cases["pytorch-grad-cam ROADCombined (9 percentiles)"] = road
        extra["pytorch-grad-cam ROADCombined (9 percentiles)"] = {"forwards": 18 + 1}
    except ImportError as e:
        log.info("pytorch-grad-cam not available: %s", e)
    try:
        import quantus

        a = cam.maps.detach().cpu().numpy()[:, None]
        xs = x.detach().cpu().numpy()
        # Quantus wants the step to divide H*W, but flips (C, H, W) values one by one in the map's
        # order, broadcast over the channels: H*W/16 per step is 48 steps of a third of a pixel block
        step = x.shape[-1] * x.shape[-2] // 16

        def pixel_flipping() -> None:
            # Quantus prints a line per call about the softmax it appends to (a wrapper of) the model
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                metric = quantus.PixelFlipping(features_in_step=step, disable_warnings=True)
                results["quantus"] = metric(model=model, x_batch=xs, y_batch=np.array([target]), a_batch=a,
                                            device=device, softmax=True, batch_size=64)

        cases["quantus PixelFlipping (48 steps)"] = pixel_flipping
        extra["quantus PixelFlipping (48 steps)"] = {"forwards": 48}
    except ImportError as e:
        log.info("quantus not available: %s", e)
    rows = table_rows(cases, model="efficientnet_lite0", batch=1, device=device, repeats=1 if quick else 3,
                      warmup=1, memory=not quick, extra=extra, floor="floor: 34 forwards in one batch")
    for r in rows:
        if r.method.startswith("ours"):
            d, i = results["ours" if "batch_size" not in r.method else "batched"]
            r.extra.update({"deletion AUC": float(d.auc[0]), "insertion AUC": float(i.auc[0])})
        elif r.method.startswith("pytorch-grad-cam") and "road" in results:
            r.extra["ROAD combined"] = float(np.asarray(results["road"]).ravel()[0])
        elif r.method.startswith("quantus") and "quantus" in results:
            curve = np.asarray(results["quantus"][0], dtype=float)
            r.extra["deletion AUC"] = float(np.trapezoid(curve) / max(1, len(curve) - 1))
    return rows


def _reproduction(clf, photos, device: str) -> list[Row]:
    import time

    import convlens
    from convlens.metrics.compare import ALL_METHODS, compare, merge

    methods = [m for m in ALL_METHODS if m != "scorecam"]
    parts, tench = [], {m: [] for m in methods}
    t0 = time.perf_counter()
    for name, img in photos:
        x = clf.preprocess(img)
        parts.append(compare(clf, x, methods, names=[name]))
        for m in methods:
            opts = {"patch": 56, "stride": 28} if m == "occlusion" else {}
            tench[m].append(float(convlens.class_sensitivity(clf, x, m, other="tench", options=opts).spearman[0]))
    total = time.perf_counter() - t0
    cmp = merge(parts)
    rows = []
    for s in cmp.summary():
        rho_t = tench.get(s["method"])
        rows.append(Row(s["method"] + (" (reference)" if s["reference"] else ""), "efficientnet_lite0", len(photos),
                        s["seconds"] or 0.0, floor="gradcam", extra={
                            "deletion AUC": s["deletion_auc"], "insertion AUC": s["insertion_auc"],
                            "class rho (least likely)": s["class_sensitivity"],
                            "class rho (tench)": None if rho_t is None else float(np.mean(rho_t)),
                            "sanity rho (classifier)": s["sanity_rho"],
                            "sanity pass": None if s["sanity_passed"] is None else f"{s['sanity_passed']:.0%}",
                        }))
    rows.append(Row(f"whole comparison, {len(photos)} photos (+ tench maps)", "efficientnet_lite0", len(photos),
                    total, floor=common.NO_FLOOR))
    return rows


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """The speed table (one image) and, unless ``quick``, the reproduction of the issue's numbers."""
    import convlens

    clf = convlens.load_model(device=device)
    photos = _photos(clf, quick)
    x = clf.preprocess(photos[0][1])
    out = [(f"Deletion + insertion, one 224 px image, Grad-CAM map, {device}", _speed_table(clf, x, quick, device))]
    if not quick and common.PRIMARY:
        rows = _reproduction(clf, photos, device)
        out.append((f"Which map to believe: every method on {len(photos)} photos, mean (issue 12's numbers), "
                    f"{device}; `median s` = seconds per map, `x floor` = / Grad-CAM's", rows))
    return out
