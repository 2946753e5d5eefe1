"""``explain`` on a GPU: several images per call of activations, Grad-CAM and occlusion.

Explains the 20 natural photos of :func:`benchmarks.bench_explain.natural_photos` with the default
model on CUDA twice, one image per call (``batch_size=1``) and 8 per call (the default there),
checks that every map, target and prediction agrees (to float rounding), and prints seconds per
image of each technique and in all. Run (needs CUDA; about a minute)::

    PYTHONPATH=src python -m benchmarks.explain_gpu [--n 20] [--batch 8] [--fast]

Exit code 0 when the two runs agree, 1 when they do not, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

TECHS = ("activations", "gradcam", "occlusion", "trust", "filters")


def _run(clf, folder: Path, batch: int, fast: bool) -> tuple[object, float]:
    import convlens

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = convlens.explain(folder, clf, fast=fast, batch_size=batch, cache=False)
    torch.cuda.synchronize()
    return report, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--fast", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    import convlens

    from .bench_explain import natural_photos

    clf = convlens.load_model(device="cuda")
    worst: dict[str, float] = {}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        natural_photos(folder, args.n)
        convlens.explain(folder / "chelsea.jpg", clf, methods=["gradcam"])  # warm-up
        runs = {b: _run(clf, folder, b, args.fast) for b in (1, args.batch)}
    one, many = runs[1][0], runs[args.batch][0]
    for a, b in zip(one.images, many.images):
        if a.errors or b.errors or a.target != b.target or [p.index for p in a.predictions] != [
                p.index for p in b.predictions]:
            print(f"MISMATCH {a.name}: errors {a.errors} / {b.errors}, target {a.target} / {b.target}")
            ok = False
            continue
        for tech in ("gradcam", "occlusion"):
            d = float((a.results[tech].maps - b.results[tech].maps).abs().max())
            scale = float(a.results[tech].maps.abs().max()) or 1.0
            worst[tech] = max(worst.get(tech, 0.0), d / scale)
        for layer, t in a.results["activations"].maps.items():
            d = float((t - b.results["activations"].maps[layer]).abs().max()) / (float(t.abs().max()) or 1.0)
            worst["activations"] = max(worst.get("activations", 0.0), d)
    print(f"device: {torch.cuda.get_device_name()}; {args.n} photos; fast={args.fast}")
    print("largest difference, batched vs one at a time (relative to the map's max):",
          ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    # cuDNN convolutions run in TF32 by default on Ampere and later, with kernels chosen per batch
    # size: a map then differs by ~1e-3 of its max between batch sizes, occlusion's differences of
    # probabilities more; in float32 proper the two agree to ~1e-6
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    tol = 2e-2 if tf32 else 1e-4
    print(f"tolerance {tol:g} ({'TF32 on' if tf32 else 'float32'})")
    ok = ok and all(v < tol for v in worst.values())
    print(f"{'batch':>6} {'s/image':>8} " + " ".join(f"{t:>12}" for t in TECHS))
    for b, (report, wall) in runs.items():
        n = len(report.images)
        per = [sum(im.timings.get(f"{t}_s", 0.0) for im in report.images) / n for t in TECHS]
        print(f"{b:>6} {wall / n:>8.3f} " + " ".join(f"{p:>12.3f}" for p in per))
    print("AGREE" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
