"""How many CPU threads PyTorch should use on this machine right now (no torch import here).

PyTorch's OpenMP workers spin while they wait for work. On an idle machine that is the fastest
choice; when other processes keep the cores busy, spinning workers fight them for the same cores
and a run gets many times slower (measured on 2 cores with two CPU-bound processes beside it: a
small Grad-CAM + feature-visualisation workload took 51 s with the default, 3.6 s with
``OMP_WAIT_POLICY=PASSIVE`` and 1.5 s with one thread; ``benchmarks/bench_threads.py``). So the
CLI measures, before any work, how much CPU other processes use (``/proc/stat`` over 0.1 s) and
uses the cores that are free: all of them (PyTorch's default wait policy) on an idle machine, fewer
on a busy one, one thread when the others use all but one core or more. ``OMP_NUM_THREADS`` set by
the user, or ``--threads N``, wins.

Library users choose the same way themselves: ``torch.set_num_threads(1)`` (or
``OMP_NUM_THREADS=1``) when the machine is busy, and ``OMP_WAIT_POLICY=PASSIVE`` set before
``import torch`` when several threads must share cores with other work.
"""

from __future__ import annotations

import logging
import os
import time

__all__ = ["available_cpus", "busy_cpus", "choose_threads", "configure_threads"]

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup CPU quotas are not read)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _cpu_times(cpus: set[int] | None, path: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` (all when None) from /proc/stat, or None."""
    busy = total = 0
    try:
        with open(path) as f:
            for line in f:
                name, *values = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if cpus is not None and int(name[3:]) not in cpus:
                    continue
                fields = [int(v) for v in values[:8]]
                idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
                busy += sum(fields) - idle  # (guest time is already inside user time)
                total += sum(fields)
    except (OSError, ValueError):
        return None
    return (busy, total) if total else None


def busy_cpus(interval: float = 0.1) -> float | None:
    """How many of this process's CPUs other processes keep busy now: the busy fraction of the
    CPUs in its affinity mask over ``interval`` seconds (this process sleeps meanwhile) times
    their number; ``None`` where ``/proc/stat`` is missing (then the 1-minute load average)."""
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    a = _cpu_times(cpus)
    if a is None:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return None
    time.sleep(interval)
    b = _cpu_times(cpus)
    if b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (len(cpus) if cpus else (os.cpu_count() or 1))


def choose_threads(available: int, busy: float | None) -> int:
    """Threads for PyTorch: the available CPUs less those busy with other work, rounded, at least
    one; all of them when the load is unknown.

    Example::

        choose_threads(2, 0.05)   # 2 (idle)
        choose_threads(2, 1.0)    # 1 (one other process keeps a core busy)
    """
    if busy is None:
        return available
    return max(1, min(available, int(available - busy + 0.5)))


def configure_threads(threads: int | None = None) -> int | None:
    """Set PyTorch's intra-op threads for this process (the CLI calls it before any work):
    ``threads`` N >= 1 as given, 0 for PyTorch's own default (no change), ``None`` to choose:
    ``OMP_NUM_THREADS`` from the environment when set, else :func:`choose_threads` from the
    current load. Returns the thread count set, or ``None`` when nothing was changed.

    Example::

        configure_threads(1)   # one thread, e.g. beside other CPU-bound work
    """
    if threads == 0:
        return None
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return None  # the user's choice, which PyTorch already read at import
        available = available_cpus()
        busy = busy_cpus()
        threads = choose_threads(available, busy)
        log.info("CPU threads: %d (%d available, %s busy with other work)", threads, available,
                 "unknown" if busy is None else f"{busy:.1f}")
    import torch

    torch.set_num_threads(threads)
    return threads
