"""Feature-visualisation quality on the default model (a measurement for the notes, not a test).

1. Excitation: for channels of a middle layer, the channel mean reached by the returned image
   against the best of six natural photos (scikit-image's chelsea, coffee, astronaut, rocket,
   camera; matplotlib's grace_hopper), each preprocessed the model's own way.
2. High-frequency noise: the share of spectral energy (per-channel mean removed) above half the
   Nyquist frequency (radial frequency > 0.25 cycles/pixel), for the Fourier default, the pixel
   method (the spec's update rule, no transforms) and the photos.

Run: ``PYTHONPATH=src python benchmarks/featureviz_quality.py [--layer blocks.4] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import convlens
from convlens import LayerCapture, feature_visualization, model_guard


def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    out = {n: getattr(skimage.data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket", "camera")}
    out["camera"] = np.stack([out["camera"]] * 3, -1)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        out["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    return out


def high_freq_share(images: torch.Tensor) -> np.ndarray:
    """Per image: spectral energy above half Nyquist / total energy (DC removed per channel)."""
    x = images.double()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(1)  # (N, H, W)
    fy = torch.fft.fftfreq(x.shape[2], dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(x.shape[3], dtype=torch.float64)[None, :]
    high = (fx**2 + fy**2).sqrt() > 0.25
    return ((power * high).sum((1, 2)) / power.sum((1, 2)).clamp_min(1e-30)).numpy()


def channel_means(clf: convlens.Classifier, layer: str, x: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """(images, channels) channel means of ``layer``."""
    name, module = convlens.resolve_layer(clf.model, layer)
    cap = LayerCapture({name: module}, stop_early=True)
    with model_guard(clf.model), cap:
        cap.run(clf.model, x)
    return cap[name][:, channels].mean((2, 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="blocks.4")
    ap.add_argument("--channels", default="0,10,20,30,40,50")
    ap.add_argument("--out", default=None, help="save the image grids here")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    chans = [int(c) for c in a.channels.split(",")]
    clf = convlens.load_model(device="cpu")
    pics = photos()
    xs = clf.preprocess(list(pics.values()))
    photo_act = channel_means(clf, a.layer, xs, chans)  # (6, C)
    best, best_i = photo_act.max(0)
    t0 = time.perf_counter()
    fourier = feature_visualization(clf, a.layer, chans)
    t_fourier = time.perf_counter() - t0
    pixel = feature_visualization(clf, a.layer, chans, param="pixel", transforms=(),
                                  steps=fourier.settings["steps"])
    names = list(pics)
    print(f"layer {a.layer}, defaults {fourier.settings}; {t_fourier:.1f} s for {len(chans)} channels "
          f"({t_fourier / len(chans):.2f} s/channel, {torch.get_num_threads()} threads)")
    print(f"{'channel':>8} {'fourier':>9} {'pixel':>9} {'best photo':>11} {'(which)':>14} {'fourier/best':>13}")
    for j, c in enumerate(chans):
        ratio = f"{float(fourier.objective[j] / best[j]):13.2f}" if best[j] > 0 else f"{'(photos <= 0)':>13}"
        print(f"{c:>8} {float(fourier.objective[j]):9.3f} {float(pixel.objective[j]):9.3f} {float(best[j]):11.3f} "
              f"{names[int(best_i[j])]:>14} {ratio}")
    ok = fourier.objective >= 2 * best.clamp_min(0)
    pos = best > 0
    ratios = (fourier.objective[pos] / best[pos]).numpy()
    print(f"fourier >= 2x best photo for {int(ok.sum())}/{len(chans)} channels; fourier / best photo where the "
          f"best is positive: min {ratios.min():.2f}, median {np.median(ratios):.2f}")
    hf_f, hf_p = high_freq_share(fourier.images), high_freq_share(pixel.images)
    photo_rgb = torch.stack([clf.denormalise(x[None])[0] for x in xs])
    hf_photo = high_freq_share(photo_rgb)
    print("share of spectral energy above half Nyquist (mean over images):")
    print(f"  fourier {hf_f.mean():.4f}   pixel {hf_p.mean():.4f}   photos {hf_photo.mean():.4f}")
    if a.out:
        fourier.save(f"{a.out}/{a.layer}_fourier", force=True)  # the benchmark's own output folder
        pixel.save(f"{a.out}/{a.layer}_pixel", force=True)


if __name__ == "__main__":
    main()
