"""How many CPU threads PyTorch should use on this machine right now, and how its idle threads
should wait (no torch import here: the CLI decides before torch is loaded).

PyTorch's OpenMP workers spin while they wait for work. On an idle machine that is the fastest
choice; when other processes keep the cores busy, spinning workers fight them for the same cores
and a run gets many times slower (on 2 cores: ``explain --fast`` took 136-413 s with the default
beside other work, 8-15 s with ``OMP_WAIT_POLICY=PASSIVE``; ``benchmarks/bench_threads.py``).
So the ``convlens`` command measures, before ``import torch``, how much of its CPUs other
processes use (``/proc/stat`` over 0.1 s) and how many of them are runnable (``/proc/loadavg``):

- idle (others use under half a CPU): every CPU, PyTorch's default wait policy;
- busy: ``OMP_WAIT_POLICY=PASSIVE`` (waiting workers sleep) and one thread per CPU left free,
  at least one; but every CPU when the others keep twice as many processes runnable as there
  are CPUs (the scheduler shares a CPU per thread, so more passive threads get more of it).

``--threads N`` or ``OMP_NUM_THREADS`` set by the user win. In Python, :func:`threads` applies
the same policy at any time: the thread count always; the wait policy only while PyTorch is not
loaded yet (OpenMP reads ``OMP_WAIT_POLICY`` once, when PyTorch loads, and ``import convlens``
loads PyTorch). So a notebook that wants the whole policy sets ``CONVLENS_THREADS=auto`` (or a
number) in the environment before ``import convlens``; the import then decides as the command does.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping, Sequence
from typing import NamedTuple

__all__ = [
    "Threads",
    "available_cpus",
    "busy_cpus",
    "choose_threads",
    "configure_threads",
    "prepare_cli_environment",
    "threads",
]

log = logging.getLogger(__name__)

#: what :func:`prepare_cli_environment` decided before torch was imported: (threads, message)
PREPARED: tuple[int, str] | None = None


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


def _runnable(path: str = "/proc/loadavg") -> int | None:
    """Processes runnable right now, this one included (field 4 of /proc/loadavg: ``R/total``)."""
    try:
        with open(path) as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def busy_cpus(interval: float = 0.1) -> float | None:
    """How many of this process's CPUs other processes keep busy now: the busy fraction of the
    CPUs in its affinity mask over ``interval`` seconds (this process sleeps meanwhile) times
    their number; ``None`` where ``/proc/stat`` is missing (then the 1-minute load average)."""
    return _measure(interval)[0]


def _measure(interval: float = 0.1) -> tuple[float | None, float | None]:
    """(busy CPUs, other runnable processes) over ``interval`` seconds; None where unknown."""
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    a = _cpu_times(cpus)
    runnable: list[int] = []
    for _ in range(5):
        r = _runnable()
        if r is not None:
            runnable.append(max(0, r - 1))  # this process is running while it reads
        time.sleep(interval / 5)
    others = sum(runnable) / len(runnable) if runnable else None
    if a is None:
        try:
            return float(os.getloadavg()[0]), others
        except (AttributeError, OSError):
            return None, others
    b = _cpu_times(cpus)
    if b is None or b[1] <= a[1]:
        return None, others
    return (b[0] - a[0]) / (b[1] - a[1]) * (len(cpus) if cpus else (os.cpu_count() or 1)), others


def choose_threads(available: int, busy: float | None, runnable: float | None = None) -> tuple[int, bool]:
    """``(threads, passive)`` for PyTorch from the available CPUs, the CPUs other processes keep
    busy and how many other processes are runnable (see the module doc). Unknown load: every CPU.

    Example::

        choose_threads(2, 0.05)        # (2, False): idle
        choose_threads(2, 1.0, 2)      # (1, True): one CPU left free
        choose_threads(2, 2.0, 8)      # (2, True): heavily oversubscribed
    """
    if busy is None or busy < 0.5:
        return available, False
    if runnable is not None and runnable >= 2 * available:
        return available, True
    return max(1, min(available, int(available - busy + 0.5))), True


def _threads_option(argv: Sequence[str]) -> int | None:
    """The value of ``--threads N`` / ``--threads=N`` in ``argv`` (None when absent or not a number)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None  # argparse reports it
    return None


def prepare_environment(argv: Sequence[str], environ: MutableMapping[str, str]) -> tuple[int, str] | None:
    """Set ``OMP_NUM_THREADS`` (and ``OMP_WAIT_POLICY=PASSIVE`` on a busy machine) in ``environ``
    for a command line ``argv``, before torch is imported; returns (threads, what was decided) or
    None when nothing was set (``--threads 0``, or ``OMP_NUM_THREADS`` already set)."""
    threads = _threads_option(argv)
    if threads is not None and threads < 1:
        return None
    if threads is not None:
        environ["OMP_NUM_THREADS"] = str(threads)
        return threads, f"{threads} (--threads)"
    if environ.get("OMP_NUM_THREADS"):
        return None
    available = available_cpus()
    busy, others = _measure()
    threads, passive = choose_threads(available, busy, others)
    environ["OMP_NUM_THREADS"] = str(threads)
    if passive:
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load = "unknown" if busy is None else f"{busy:.1f}"
    runq = "" if others is None else f", {others:.0f} other processes runnable"
    policy = f", OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']}" if "OMP_WAIT_POLICY" in environ else ""
    return threads, f"{threads} ({available} CPUs, {load} busy with other work{runq}{policy})"


def _is_cli() -> bool:
    """True when this process is the ``convlens`` command (console script or ``-m convlens.cli``)."""
    if sys.argv and os.path.basename(sys.argv[0]) in ("convlens", "convlens.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return "-m" in orig[:-1] and orig[orig.index("-m") + 1] == "convlens.cli"


def _env_argv(value: str) -> list[str] | None:
    """``CONVLENS_THREADS`` as the command line :func:`prepare_environment` reads: ``auto`` -> [],
    a number N -> ``--threads N``; None for anything else (ignored, with a warning)."""
    value = value.strip().lower()
    if value == "auto":
        return []
    if value.isdigit():
        return ["--threads", value]
    log.warning("CONVLENS_THREADS=%r is neither 'auto' nor a number of threads; ignored", value)
    return None


def prepare_cli_environment() -> None:
    """Called first thing by ``convlens/__init__``, while torch is not loaded yet: in the
    ``convlens`` command, or in any Python process whose environment has ``CONVLENS_THREADS``
    (``auto`` or a number), decide threads and wait policy (:func:`prepare_environment`)."""
    global PREPARED
    if "torch" in sys.modules:
        return
    if _is_cli():
        argv: list[str] | None = sys.argv[1:]
    elif os.environ.get("CONVLENS_THREADS"):
        argv = _env_argv(os.environ["CONVLENS_THREADS"])
    else:
        return
    if argv is None:
        return
    try:
        PREPARED = prepare_environment(argv, os.environ)
    except Exception:  # noqa: BLE001 -- a measurement problem never stops the command
        PREPARED = None


class Threads(NamedTuple):
    """What :func:`threads` set: PyTorch's intra-op ``count``, the OpenMP ``wait_policy`` in
    force (``"PASSIVE"``, ``"ACTIVE"`` or ``"default"``), and the ``reason`` in words."""

    count: int
    wait_policy: str
    reason: str


def threads(setting: int | str = "auto") -> Threads:
    """Apply the ``convlens`` command's CPU policy in a running Python (a notebook, a script):
    ``"auto"`` measures how busy this process's CPUs are now and sets PyTorch's thread count as
    the command would (every CPU when idle; one per CPU left free when others keep them busy);
    a number N sets N threads. The wait policy (``OMP_WAIT_POLICY=PASSIVE`` on a busy machine,
    many times faster there) can only change before PyTorch loads, i.e. before ``import
    convlens``: set ``CONVLENS_THREADS=auto`` in the environment first for that; here it is
    reported, not changed. Call it again whenever the load changes.

    Example::

        convlens.threads("auto")   # Threads(count=1, wait_policy='PASSIVE', reason='...')
    """
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "").upper() or "default"
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        available = available_cpus()
        busy, others = _measure()
        count, passive = choose_threads(available, busy, others)
        load = "unknown" if busy is None else f"{busy:.1f}"
        reason = f"{available} CPUs, {load} busy with other work"
        if passive and policy != "PASSIVE":
            reason += ("; OMP_WAIT_POLICY=PASSIVE would help but PyTorch is already loaded: set "
                       "CONVLENS_THREADS=auto before importing convlens")
    else:
        try:
            count = int(setting)
        except (TypeError, ValueError):
            raise ValueError(f"threads() takes 'auto' or a number of threads, not {setting!r}") from None
        if count < 1:
            raise ValueError(f"threads() needs at least 1 thread, not {count}")
        reason = "as asked"
    torch.set_num_threads(count)
    log.info("CPU threads: %d (%s)", count, reason)
    return Threads(count, policy, reason)


def configure_threads(threads: int | None = None) -> int | None:
    """Set PyTorch's intra-op threads for this process (the CLI calls it before any work):
    ``threads`` N >= 1 as given, 0 for PyTorch's own default (no change), ``None`` to choose:
    what :func:`prepare_cli_environment` set before torch was loaded, else ``OMP_NUM_THREADS``
    from the environment when set, else :func:`choose_threads` from the current load (threads
    only: the wait policy can no longer change once torch is loaded). Returns the thread count
    set, or ``None`` when nothing was changed.

    Example::

        configure_threads(1)   # one thread, e.g. beside other CPU-bound work
    """
    if threads == 0:
        return None
    if PREPARED is not None and threads in (None, PREPARED[0]):
        log.info("CPU threads: %s", PREPARED[1])
        return PREPARED[0]
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return None  # the user's choice, which PyTorch already read at import
        available = available_cpus()
        busy, others = _measure()
        threads, _ = choose_threads(available, busy, others)
        log.info("CPU threads: %d (%d CPUs, %s busy with other work)", threads, available,
                 "unknown" if busy is None else f"{busy:.1f}")
    import torch

    torch.set_num_threads(threads)
    return threads


# Imported first by convlens/__init__, so in the `convlens` command this runs before torch loads.
prepare_cli_environment()
