"""Prediction: ``Classifier.predict`` against a bare forward (the command's cold start: ``bench_cli``).

In process, interleaved with :func:`benchmarks.common.measure`: the floor is the bare
``model(x)`` under ``no_grad`` on an already preprocessed batch; ours is ``clf.predict(x, top=5)``
(guard, eval mode, softmax, top-k, labels) on the same tensor, and ``clf.predict(path)`` which also
decodes and preprocesses the image. Correctness: top-5 indices equal to the floor's, max |Δ| of
the probabilities against ``softmax(model(x))``.

"""

from __future__ import annotations

import torch
import torchvision

import convlens

from . import common
from .common import FLOOR_FORWARD, Row, agreement, fill_ratios, floor_cases, measure, peak_memory_mb, spread_pct


def _predict_rows(clf: convlens.Classifier, name: str, batch: int, *, repeats: int, device: str) -> list[Row]:
    path = convlens.sample_image_path()
    x = clf.preprocess([path] * batch).to(device)
    model = clf.model
    cases = {
        **floor_cases(model, x),
        "ours: clf.predict(x)": lambda: clf.predict(x, top=5),
        "ours: clf.predict(paths) (decode + preprocess)": lambda: clf.predict([path] * batch, top=5),
    }
    samples: dict[str, list[float]] = {}
    secs = measure(cases, repeats=repeats, warmup=2, device=device, samples=samples)
    rows = [
        Row(k, name, batch, v, peak_mb=peak_memory_mb(cases[k], device) if common.PRIMARY else None,
            extra={"IQR %": spread_pct(samples[k])})
        for k, v in secs.items()
    ]
    with torch.no_grad():
        probs = model.eval()(x).float().softmax(1)
    ref_top = probs.topk(5, dim=1).indices.cpu().tolist()
    for row, inp in zip(rows[1:], (x, [path] * batch)):
        preds = clf.predict(inp, top=5)
        ours_top = [[p.index for p in ps] for ps in preds]
        ours_p = torch.tensor([[p.probability for p in ps] for ps in preds])
        ref_p = probs.cpu().gather(1, torch.tensor(ours_top))
        row.extra["top-5 = floor"] = "yes" if ours_top == ref_top else "NO"
        row.extra["max abs diff vs floor"] = agreement("floor", ours_p, ref_p)["max abs diff vs floor"]
    return fill_ratios(rows, FLOOR_FORWARD)


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """Top-5 prediction vs a bare forward (default model at batch 1 and 8, random-init ResNet-50)."""
    repeats = 5 if quick else 7
    clf = convlens.load_model(device=device)
    rows = _predict_rows(clf, "default (EfficientNet-Lite0)", 1, repeats=repeats, device=device)
    rows += _predict_rows(clf, "default (EfficientNet-Lite0)", 4 if quick else 8, repeats=repeats, device=device)
    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval().to(device)
    resnet = convlens.Classifier(net, mean=clf.mean, std=clf.std, labels=clf.labels, name="resnet50")
    rows += _predict_rows(resnet, "resnet50 (random init)", 1, repeats=repeats, device=device)
    return [("Top-5 prediction vs a bare forward", rows)]
