"""``convlens explain --fast`` on a busy CPU: PyTorch's threading options beside other work.

For each load case (the machine as it is, then with one and with two CPU-bound competitor
processes started beside it: a ``while`` loop in Python), each threading strategy runs the
real command in its own subprocess (so every strategy starts torch fresh with its own
environment):

- ``PyTorch default``: ``--threads 0`` (PyTorch's own thread count and OpenMP's spinning waits);
- ``OMP_WAIT_POLICY=PASSIVE``: the same, with waiting workers sleeping instead of spinning;
- ``1 thread``: ``--threads 1``;
- ``convlens (auto)``: no option, what a user gets: threads and wait policy chosen from the load
  at start (``convlens/_cpu.py``).

``median s`` is the explain + save time the command itself reports (summary.json, without Python
and torch start-up), ``wall s`` the whole command; ``x floor`` is each row over the best row of
its load case: the goal is ``convlens (auto)`` within 1.3x of the best in every case. Strategies
run round-robin within a load case, so a change of the background load hits them alike; the
``load before`` column is what :func:`convlens._cpu.busy_cpus` saw just before the case (other
users' work included: "as it is" is idle only on a machine of one's own). Run::

    python -m benchmarks --only threads [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Row

# it sets its own threads (one subprocess per strategy) and takes long: one worker, only with --only
SWEEP = False
IN_FULL_RUN = False

STRATEGIES: dict[str, tuple[dict[str, str], list[str]]] = {
    "PyTorch default": ({}, ["--threads", "0"]),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", "0"]),
    "1 thread": ({}, ["--threads", "1"]),
    "convlens (auto)": ({}, []),
}
LOADS = {"as it is": 0, "+1 CPU-bound process": 1, "+2 CPU-bound processes": 2}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return {**env, **extra}


def run_once(name: str, out: Path, timeout: float = 900.0) -> tuple[float, float]:
    """(explain + save seconds from summary.json, wall seconds) of one ``explain --fast`` run."""
    extra, args = STRATEGIES[name]
    cmd = [sys.executable, "-m", "convlens.cli", "explain", "--fast", "--device", "cpu", "--force",
           "--out", str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(extra), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    timings = json.loads((out / "summary.json").read_text())["timings"]
    return float(timings["total_s"]), wall


# a CPU-bound loop that ends by itself once the bench is gone (killed before its cleanup ran)
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


def _competitors(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(n)]


def tables(quick: bool = False, device: str = "cpu") -> list[tuple[str, list[Row]]]:
    if device != "cpu":
        return []
    from convlens._cpu import available_cpus, busy_cpus

    repeats = 1 if quick else 2
    out: list[tuple[str, list[Row]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        run_once("1 thread", Path(tmp) / "warm")  # file caches, bytecode: not part of any row
        for load, n in LOADS.items():
            procs = _competitors(n)
            try:
                time.sleep(1.0)  # let the competitors reach full speed
                before = busy_cpus(0.5)
                samples: dict[str, list[tuple[float, float]]] = {s: [] for s in STRATEGIES}
                for r in range(repeats):
                    order = list(STRATEGIES) if r % 2 == 0 else list(reversed(STRATEGIES))
                    for s in order:
                        samples[s].append(run_once(s, Path(tmp) / f"{load}-{s}".replace(" ", "_")))
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            rows = [
                Row(s, "efficientnet_lite0", 1, statistics.median(t for t, _ in v),
                    extra={"wall s": statistics.median(w for _, w in v),
                           "load before": None if before is None else round(before, 2),
                           "CPUs": available_cpus(), "repeats": repeats})
                for s, v in samples.items()
            ]
            best = min(rows, key=lambda r: r.seconds).method
            for r in rows:
                r.floor, r.setting = best, "see method"
            out.append((f"explain --fast, machine {load} (x floor: over the best row)", rows))
    return out


if __name__ == "__main__":  # quick look without the harness: python -m benchmarks.bench_threads
    from .common import markdown_table

    for title, rows in tables(quick="--quick" in sys.argv):
        print(markdown_table(title, rows))
