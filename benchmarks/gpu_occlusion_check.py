"""GPU check of exact occlusion (issue 16, item 3): ``python benchmarks/gpu_occlusion_check.py``.

On the first CUDA device, for ResNet-50 (random init) and the default model, patch 16 / stride 8,
224 px, 4 images in one call (their windows share batches): the plain path (one full forward per
window, batches from free memory) and the exact crop path, one after the other, twice, the second
timed. Prints per model: the path taken (``crop`` expected: the self-check's tolerance follows
TF32, so the fast path must not fall back on a modern GPU; ``fallback`` says why if it did), the
batch size, seconds of both paths and their ratio, and the largest drop difference against the
plain path relative to the largest drop. Then the approximate path's path and work. Needs no
network (random weights; the default model's weights ship with its package). Runs in ~1 minute
on an H100; exits 1 when a model falls back to the plain path or differs by more than 5e-2 with
TF32 convolutions (cuDNN's default; 1e-4 without).
"""

from __future__ import annotations

import logging
import sys
import time

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    if "--float32" in sys.argv:  # no TF32 anywhere: the two paths must then agree to float32 rounding
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    import torchvision

    import convlens
    from convlens.methods.occlusion import occlusion

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dev = "cuda"
    print(torch.cuda.get_device_name(), "torch", torch.__version__,
          "cudnn.allow_tf32", torch.backends.cudnn.allow_tf32,
          "matmul precision", torch.get_float32_matmul_precision())
    torch.manual_seed(0)
    clf = convlens.load_model(device=dev)
    photo = clf.preprocess(convlens.sample_image())
    g = torch.Generator().manual_seed(0)
    models = [("resnet50 (random init)", torchvision.models.resnet50().eval().to(dev),
               torch.randn(4, 3, 224, 224, generator=g).to(dev)),
              ("efficientnet_lite0 (default)", clf.model,
               torch.cat([photo, photo.flip(-1), photo.flip(-2), photo.roll(50, -1)]))]
    bad = 0
    for name, model, x in models:
        runs = {}
        for _ in range(2):
            for fast in (False, True):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                runs[fast] = occlusion(model, x, patch=16, stride=8, fast=fast, target=0)
                torch.cuda.synchronize()
                runs[fast].settings["seconds"] = time.perf_counter() - t0
        plain, crop = runs[False], runs[True]
        diff = float((crop.raw - plain.raw).abs().max()) / max(float(plain.raw.abs().max()), 1e-12)
        s = crop.settings
        print(f"{name}: exact path {s['path']} (fallback: {s['fallback']}), batch {s['batch_size']}, "
              f"plain {plain.settings['seconds']:.2f} s (batch {plain.settings['batch_size']}), "
              f"crop {s['seconds']:.2f} s, x {plain.settings['seconds'] / s['seconds']:.2f}, work {s['work']:.3f}, "
              f"max |drop diff| / max |drop| = {diff:.2e}")
        approx = occlusion(model, x, patch=16, stride=8, mode="approximate", target=0)
        print(f"{name}: approximate path {approx.settings['path']}, mode {approx.settings['mode']}, "
              f"work {approx.settings['work']:.3f}")
        # TF32 convolutions (cuDNN's default) round each path differently: ~2e-2 of the largest drop
        bad += s["path"] != "crop" or diff > (5e-2 if torch.backends.cudnn.allow_tf32 else 1e-4)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
