"""Cold starts: the wall time of a fresh process running the ``convlens`` command as a user types it.

Rows (fresh interpreter each, round-robin over the cases, median of the repeats), on the bundled
sample photo and the default model, output into a temporary folder:

- ``floor: python -c 'import torch'``: no torch program starts faster;
- ``python -c 'import convlens'``;
- ``convlens predict IMG``, ``convlens gradcam IMG`` (its evidence lines included, as shipped);
- ``convlens occlusion IMG --patch 16 --stride 8`` (exact) and ``... --mode approximate --refine``;
  ``x exact`` = the exact command's seconds / the approximate one's (approximate / exact is its inverse).

Threads: each worker's setting reaches the command as ``OMP_NUM_THREADS`` (and ``OMP_WAIT_POLICY``),
which the command honours like ``--threads`` / ``CONVLENS_THREADS``: those rows are the command at
each setting, shown at their best. The rows ``... (own policy)`` (primary worker only) run it as
shipped, with no thread variable: the command then picks threads and wait policy from the load
(``convlens/_cpu.py``); their ``threads`` column says ``own policy``. ``peak MB`` = the child's peak
RSS (its own ``VmHWM``), an absolute figure.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common
from .common import Row, spread_pct

CLI = "from convlens.cli import main; raise SystemExit(main())"
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
FLOOR = "floor: python -c 'import torch'"
EXACT = "convlens occlusion IMG --patch 16 --stride 8"
APPROX = "convlens occlusion IMG --patch 16 --stride 8 --mode approximate --refine"
OWN = " (own policy)"


def child(code: str, args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of a fresh interpreter running ``code``."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", HWM + code, *args], env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = ([line for line in proc.stderr.splitlines() if line.strip() and "@@VmHWM" not in line] or ["?"])[-1]
        raise RuntimeError(f"child {args[:1]} exited with {proc.returncode}: {tail}")
    kb = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("@@VmHWM ")]
    return wall, int(kb[-1]) / 1024 if kb else float("nan"), proc.stdout


def cases(image: str, out: str) -> dict[str, tuple[str, list[str]]]:
    """``{row: (python code, argv)}``; the CLI rows write into ``out``/<n>."""
    def cli(n: int, command: str, *options: str) -> tuple[str, list[str]]:
        return CLI, [command, image, *options, "--out", f"{out}/{n}", "--force"]

    rows = {
        FLOOR: ("import torch", []),
        "python -c 'import convlens'": ("import convlens", []),
        "convlens predict IMG": (CLI, ["predict", image]),
        "convlens gradcam IMG": cli(1, "gradcam"),
        EXACT: cli(2, "occlusion", "--patch", "16", "--stride", "8"),
        APPROX: cli(3, "occlusion", "--patch", "16", "--stride", "8", "--mode", "approximate", "--refine"),
    }
    return rows


def tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]:
    """One table: the cold starts (CPU only: the command's fixed costs)."""
    if device != "cpu":
        return []
    import convlens

    image = str(convlens.sample_image_path())
    src = str(Path(convlens.__file__).resolve().parent.parent)  # this checkout's convlens, not another
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "CUDA_VISIBLE_DEVICES": ""}
    own = {k: v for k, v in env.items() if not k.startswith(("OMP_", "MKL_")) and k != "CONVLENS_THREADS"}
    with tempfile.TemporaryDirectory() as out:
        plan = {k: (code, args, env) for k, (code, args) in cases(image, out).items()}
        if common.PRIMARY:
            plan.update({k + OWN: (code, args, own) for k, (code, args) in cases(image, out + "/own").items()
                         if k.startswith("convlens")})
        walls: dict[str, list[float]] = {k: [] for k in plan}
        rss = dict.fromkeys(plan, 0.0)
        printed: dict[str, str] = {}
        for _ in range(2 if quick else 3):  # round-robin, as measure() does
            for k, (code, args, e) in plan.items():
                wall, peak, stdout = child(code, args, e)
                walls[k].append(wall)
                rss[k] = max(rss[k], peak)
                printed[k] = stdout
    rows = []
    for k in plan:
        ratios = {"x exact": EXACT + (OWN if k.endswith(OWN) else "")} if k.startswith(APPROX) else {}
        rows.append(Row(k, "default" if k.startswith("convlens") else "-", 1, statistics.median(walls[k]),
                        peak_mb=rss[k], extra={"IQR %": spread_pct(walls[k]), "max s": max(walls[k])},
                        floor=FLOOR, ratios=ratios, setting="own policy" if k.endswith(OWN) else None))
    lines = printed["convlens predict IMG"].splitlines()
    rows[2].extra["top-1 printed"] = lines[1].split(None, 1)[1].rsplit(None, 2)[0].strip() if len(lines) > 1 else "?"
    return [("Cold start of the `convlens` command (fresh process each; IMG = the bundled sample photo)", rows)]
