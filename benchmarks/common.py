"""Shared timing helpers: interleaved repeats in one process, medians, ratios, markdown tables.

Every table is measured with :func:`measure`: all its cases run round-robin (case A, B, C, A,
B, C, ...) after a warm-up, so a noisy neighbour slows every row alike and the ratios hold.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Row:
    """One measured row of a table."""

    method: str
    model: str
    batch: int
    seconds: float  # median over repeats
    ratio: float | None = None  # to the table's floor row
    peak_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # correctness columns etc.


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak extra memory of one call of ``fn``: CUDA allocator peak on a GPU, sampled RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(0.0, max(peak[0], _rss_mb()) - base)


def measure(
    cases: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Median seconds per case, with the cases interleaved round-robin after ``warmup`` rounds."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(title: str, rows: list[Row]) -> str:
    """Rows as a markdown table under a heading, extra columns appended."""
    extra_keys: list[str] = []
    for r in rows:
        extra_keys += [k for k in r.extra if k not in extra_keys]
    head = ["method", "model", "batch", "median s", "x floor", "peak MB", *extra_keys]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.method,
            r.model,
            str(r.batch),
            f"{r.seconds:.4f}",
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            "-" if r.peak_mb is None else f"{r.peak_mb:.0f}",
            *[_fmt(r.extra.get(k)) for k in extra_keys],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
