"""Peak memory of ``convlens explain`` over a folder: does it stay flat in the number of images?

Each row runs the CLI in a fresh process (``python -m convlens.cli explain DIR --fast
--methods ... --no-cache --out ...``) over a folder of N images made from the 20 natural photos
of :func:`benchmarks.bench_explain.natural_photos` by crops and flips, and reads that process's
peak resident memory (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a small wrapper
process, so each row has its own maximum). Each image's files are written as soon as it is done
and its maps and figures are dropped, so the peak must not grow with N (target: 200 images within
10% of 20). Run::

    python -m benchmarks --only memory            # 20 and 200 images
    python -m benchmarks.bench_memory 20 200      # the same, printed directly
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Row

# it sets its own threads (one subprocess per strategy) and takes long: one worker, only with --only
SWEEP = False
IN_FULL_RUN = False

#: the techniques of the rows (the slow feature visualisation aside: it adds a cache, not a per-image cost)
METHODS = "activations,gradcam,occlusion"

NO_CACHE = ["--no-cache"]  # empty to measure a convlens from before the feature-visualisation cache

_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
    "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def folder_of(folder: Path, n: int) -> list[Path]:
    """``n`` different photos: the 20 natural photos, then crops (a sliding window over each) and
    their mirror images, as 256 px JPEGs."""
    from PIL import Image, ImageOps

    from .bench_explain import natural_photos

    src = natural_photos(folder / "src", 20)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = Image.open(src[i % len(src)]).convert("RGB")
        k = i // len(src)  # the k-th variant of this photo: a crop that moves, mirrored on odd k
        w, h = im.size
        side = int(min(w, h) * (0.95 - 0.04 * (k % 8)))
        x0, y0 = (w - side) * ((k * 37) % 11) // 10, (h - side) * ((k * 53) % 7) // 6
        im = im.crop((x0, y0, x0 + side, y0 + side)).resize((256, 256))
        if k % 2:
            im = ImageOps.mirror(im)
        p = folder / f"img{i:04d}.jpg"
        im.save(p, quality=90)
        out.append(p)
    return out


def peak_rss(n: int, methods: str = METHODS, device: str = "cpu") -> dict[str, float]:
    """Explain a folder of ``n`` images in a fresh CLI process; its peak RSS (MB) and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        folder_of(photos, n)
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "convlens.cli", "explain", str(photos), "--fast", "--methods", methods,
               *NO_CACHE, "--device", device, "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env,
                             check=True)
        seconds = time.perf_counter() - t0
        rc, kb = res.stdout.split()
        if rc != "0":
            raise RuntimeError(f"explain exited {rc}")
        summary = json.loads((out / "summary.json").read_text())
        if len(summary["images"]) != n or not summary["ok"]:
            raise RuntimeError("explain did not explain every image")
        index_kb = (out / "report.html").stat().st_size / 1024
    return {"peak_mb": int(kb) / 1024, "seconds": seconds, "index_kb": index_kb}


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """Peak RSS for 20 and 200 images (``quick``: 10 and 40)."""
    sizes = (10, 40) if quick else (20, 200)
    rows, base = [], None
    for n in sizes:
        r = peak_rss(n, device=device)
        base = base or r["peak_mb"]
        rows.append(Row(f"explain --fast --methods {METHODS}, {n} images", "efficientnet_lite0", n,
                        r["seconds"] / n, None, peak_mb=r["peak_mb"],
                        extra={"peak RSS vs first row": f"{r['peak_mb'] / base:.3f}",
                               "index KB": f"{r['index_kb']:.0f}",
                               "within 10%": "yes" if r["peak_mb"] <= 1.1 * base else "NO"}))
    return [("explain over a folder: peak memory (fresh process per row)", rows)]


if __name__ == "__main__":
    for n in [int(a) for a in sys.argv[1:]] or [20, 200]:
        print(n, peak_rss(n), flush=True)
