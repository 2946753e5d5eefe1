"""Prediction: ``Classifier.predict`` against a bare forward, and the cold start of ``convlens predict``.

Table 1 (in process, interleaved with :func:`benchmarks.common.measure`): the floor is the bare
``model(x)`` under ``no_grad`` on an already preprocessed batch; ours is ``clf.predict(x, top=5)``
(guard, eval mode, softmax, top-k, labels) on the same tensor, and ``clf.predict(path)`` which also
decodes and preprocesses the image. Correctness: top-5 indices equal to the floor's, max |Δ| of
the probabilities against ``softmax(model(x))``.

Table 2 (subprocesses, round-robin, median): wall time of a fresh interpreter running
``convlens predict`` on the bundled sample photo, against ``python -c "import torch"`` (the floor
no torch program can beat) and ``import convlens``. Peak MB there is the child's peak RSS
(its own ``VmHWM``), an absolute figure, not a delta.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

import convlens

from .common import FLOOR_FORWARD, Row, agreement, fill_ratios, floor_cases, measure, peak_memory_mb, spread_pct

CLI = "from convlens.cli import main; raise SystemExit(main())"


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
        Row(k, name, batch, v, peak_mb=peak_memory_mb(cases[k], device), extra={"IQR %": spread_pct(samples[k])})
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


# the child reports its own high-water RSS (VmHWM is per address space, so it is the child's;
# ru_maxrss is not: Linux carries the forking parent's peak across exec)
HWM = (
    "import atexit, sys\n"
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('\\n@@VmHWM ' + line.split()[1] + '\\n')\n"
    "atexit.register(_hwm)\n"
)


def _child(code: str, args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of a fresh interpreter running ``code``."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", HWM + code, *args], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"child exited with {proc.returncode}: {tail}")
    kb = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("@@VmHWM ")]
    return wall, int(kb[-1]) / 1024 if kb else float("nan"), proc.stdout


def _cold_rows(*, repeats: int, threads: int) -> list[Row]:
    src = str(Path(convlens.__file__).resolve().parent.parent)  # this checkout's convlens, not another
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.update(OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")  # the CLI on the CPU, this run's threads
    cases = {
        "floor: python -c 'import torch'": ("import torch", []),
        "python -c 'import convlens'": ("import convlens", []),
        "convlens predict (sample photo, default model)": (CLI, ["predict"]),
    }
    walls: dict[str, list[float]] = {k: [] for k in cases}
    rss: dict[str, float] = {k: 0.0 for k in cases}
    outs: dict[str, str] = {}
    for _ in range(repeats):  # round-robin, as measure() does; the first round warms the page cache
        for k, (code, args) in cases.items():
            wall, peak, out = _child(code, args, env)
            walls[k].append(wall)
            rss[k] = max(rss[k], peak)
            outs[k] = out
    rows = [
        Row(k, "default" if "predict" in k else "-", 1, statistics.median(walls[k]), peak_mb=rss[k],
            extra={"IQR %": spread_pct(walls[k])})
        for k in cases
    ]
    lines = outs["convlens predict (sample photo, default model)"].splitlines()
    rows[-1].extra["top-1 printed"] = lines[1].split(None, 1)[1].rsplit(None, 2)[0].strip() if len(lines) > 1 else "?"
    rows[-1].extra["max s"] = max(walls["convlens predict (sample photo, default model)"])
    return fill_ratios(rows)


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """Top-5 prediction vs a bare forward (default model, random-init ResNet-50), and CLI cold start."""
    repeats = 5 if quick else 10
    clf = convlens.load_model(device=device)
    rows = _predict_rows(clf, "default (EfficientNet-Lite0)", 1, repeats=repeats, device=device)
    rows += _predict_rows(clf, "default (EfficientNet-Lite0)", 4 if quick else 16, repeats=repeats, device=device)
    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval().to(device)
    resnet = convlens.Classifier(net, mean=clf.mean, std=clf.std, labels=clf.labels, name="resnet50")
    rows += _predict_rows(resnet, "resnet50 (random init)", 1 if quick else 8, repeats=repeats, device=device)
    out = [("Top-5 prediction vs a bare forward", rows)]
    if device == "cpu":  # the CLI's cold start is a CPU figure; one table is enough
        threads = torch.get_num_threads()
        out.append(
            (
                f"Cold start of `convlens predict` (fresh interpreter, {threads} threads, peak MB = child's peak RSS)",
                _cold_rows(repeats=3 if quick else 5, threads=threads),
            )
        )
    return out
