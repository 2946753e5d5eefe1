"""End-to-end ``convlens.explain`` on one 224 px image: every technique, figures and files included.

Rows: the floor (one bare forward pass of the model), ``explain`` + ``save`` at the default
settings, and with ``fast=True``; the extra columns give each technique's share (median over the
repeats) and whether one image stays under the 60 s target. Run::

    python -m benchmarks --only explain [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from .common import Row, measure

TECHS = ("activations", "gradcam", "occlusion", "trust", "filters")


def _explain_case(clf: Any, image: Any, fast: bool, sink: list[dict[str, float]]) -> Callable[[], None]:
    import convlens

    def run() -> None:
        c0 = time.process_time()
        with tempfile.TemporaryDirectory() as d:
            report = convlens.explain(image, clf, fast=fast)
            t0 = time.perf_counter()
            report.save(d)  # drawing the figures happens here
            save_s = time.perf_counter() - t0
        im = report.images[0]
        if im.errors:
            raise RuntimeError(f"explain failed: {im.errors}")
        sink.append({**im.timings, "save_s": save_s, "cpu_s": time.process_time() - c0})

    return run


def _table(name: str, clf: Any, image: Any, quick: bool, device: str, default: bool = True) -> list[Row]:
    x = clf.preprocess(image)

    def floor() -> None:
        with torch.no_grad():
            clf.model(x)

    sinks: dict[str, list[dict[str, float]]] = {"default": [], "fast": []}
    cases = {"forward (floor)": floor}
    labels = {"default": "explain + save, default", "fast": "explain + save, --fast"}
    if not default:
        del labels["default"]
    for key, label in labels.items():
        cases[label] = _explain_case(clf, image, key == "fast", sinks[key])
    clf.model.eval()
    times = measure(cases, repeats=1 if quick else 3, warmup=1, device=device)
    base = times["forward (floor)"]
    rows = [Row("forward (floor)", name, 1, base, 1.0)]
    for key, label in labels.items():
        timings = sinks[key][1:]  # after the warm-up
        extra: dict[str, Any] = {
            f"{t} s": statistics.median(s[f"{t}_s"] for s in timings) for t in ("prepare", *TECHS, "save")
        }
        # CPU seconds of this process: robust to other processes sharing the cores; on an idle
        # 2-core machine the wall time is at most about this (torch uses both cores)
        extra["cpu s"] = statistics.median(s["cpu_s"] for s in timings)
        extra["< 60 s"] = "yes" if times[label] < 60 else "NO"
        rows.append(Row(label, name, 1, times[label], times[label] / base, extra=extra))
    return rows


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """End-to-end explain on the default model (and ResNet-50, random init, unless ``quick``;
    on a CPU only with ``--fast`` settings there)."""
    import convlens

    image = convlens.sample_image_path()
    out = [("explain: one image, every technique, default model",
            _table("efficientnet_lite0", convlens.load_model(device=device), image, quick, device))]
    if not quick:
        import torchvision

        torch.manual_seed(0)
        net = torchvision.models.resnet50().to(device)
        clf = convlens.Classifier(net, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  labels=convlens.imagenet_labels(), name="resnet50 (random init)")
        # the default settings' feature visualisation through ResNet-50 takes minutes on a CPU
        out.append(("explain --fast: one image, every technique, ResNet-50",
                    _table("resnet50", clf, image, quick, device, default=device != "cpu")))
    return out
