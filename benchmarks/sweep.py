"""Thread settings: one worker process per setting, and the best setting per contender.

OpenMP reads ``OMP_WAIT_POLICY`` once, when PyTorch loads, so every setting runs in its own
process (``python -m benchmarks --worker SETTING``), with ``OMP_NUM_THREADS`` and the wait policy
in its environment. The worker runs the module's tables as usual (cases interleaved in one
process) and writes its rows as JSON; the parent keeps, per table and per row, the setting with
the lowest median (:func:`merge`), then fills every ratio (:func:`benchmarks.common.fill_ratios`).

The first setting's worker is the *primary* one: it alone computes correctness columns, peak
memory and the untimed tables (:data:`benchmarks.common.PRIMARY`), which do not depend on threads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import Row

ROOT = Path(__file__).resolve().parent.parent  # the checkout: benchmarks/ and src/ live here


@dataclass(frozen=True)
class Setting:
    """A thread setting: ``threads`` and whether OpenMP's idle workers sleep (``passive``)."""

    threads: int
    passive: bool = False

    @property
    def name(self) -> str:
        """``"2 default"``, ``"2 passive"``; ``"1"`` (one thread has no idle worker: no wait policy)."""
        return str(self.threads) if self.threads == 1 else f"{self.threads} {'passive' if self.passive else 'default'}"

    def env(self, base: dict[str, str], *, primary: bool) -> dict[str, str]:
        """``base`` without thread variables of its own, with this setting's (and the worker flag)."""
        env = {k: v for k, v in base.items() if not k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))}
        env.pop("CONVLENS_THREADS", None)
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   CONVLENS_BENCH_PRIMARY="1" if primary else "0")
        if self.passive:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        paths = [str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env


def settings(cores: int | None = None) -> list[Setting]:
    """PyTorch's default thread count (every core) with the default and the passive wait policy,
    then one thread (where the wait policy has nothing to act on: :func:`wait_policy_check`)."""
    n = max(1, cores or os.cpu_count() or 1)
    return [Setting(n), Setting(n, passive=True), Setting(1)] if n > 1 else [Setting(1)]


def pick(names: str, available: Sequence[Setting]) -> list[Setting]:
    """The settings named in a comma-separated list (``"1,2 passive"``); ValueError for an unknown one."""
    by_name = {s.name: s for s in available}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"no thread setting {', '.join(unknown)}; have: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


_THREADS_PROBE = (
    "import os, torch\n"
    "with torch.no_grad():\n"
    "    torch.nn.Conv2d(3, 16, 3)(torch.randn(2, 3, 64, 64))\n"
    "print(torch.get_num_threads(), len(os.listdir('/proc/self/task')))\n"
)


def wait_policy_check() -> str:
    """One sentence: at one thread, does the wait policy change anything? Two fresh processes
    (default and PASSIVE, ``OMP_NUM_THREADS=1``) run a convolution and report PyTorch's thread count
    and their OS threads: with one OS thread there is no idle OpenMP worker to spin or sleep."""
    seen = []
    for passive in (False, True):
        env = Setting(1, passive).env(dict(os.environ), primary=False)
        try:
            out = subprocess.run([sys.executable, "-c", _THREADS_PROBE], env=env, capture_output=True, text=True,
                                 timeout=120, check=True).stdout.split()
            seen.append((int(out[0]), int(out[1])))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return "not checked (the probe failed): the one-thread setting may differ by wait policy"
    if seen[0] == seen[1] == (1, 1):
        return ("at 1 thread a process runs one OS thread under either wait policy (checked in two fresh "
                "processes), so there is no idle worker for the policy to act on: 1 thread is measured once")
    return f"at 1 thread: (torch threads, OS threads) = {seen[0]} default, {seen[1]} passive"


def to_json(sections: list[Any]) -> str:
    """Sections (:class:`benchmarks.run.Section`) as JSON, rows included."""
    return json.dumps([dataclasses.asdict(s) for s in sections], default=_plain)


def _plain(o: Any) -> Any:
    return o.item() if hasattr(o, "item") else str(o)


def rows_from(tables: list[list[Any]]) -> list[tuple[str, list[Row]]]:
    """The ``tables`` of one JSON section back as ``(title, [Row, ...])``."""
    return [(title, [Row(**r) for r in rows]) for title, rows in tables]


def merge(runs: dict[str, list[tuple[str, list[Row]]]]) -> list[tuple[str, list[Row]]]:
    """One table per title from several settings' tables: each row (method, model, batch) at the
    setting with the lowest seconds. Its extra columns are that setting's (where not None), over those
    of the first (primary) setting, which alone fills the correctness columns; its peak memory likewise. A row
    whose module set its own ``setting`` keeps it. Ratios are left to :func:`fill_ratios`."""
    order: dict[str, dict[tuple[str, str, int], dict[str, Row]]] = {}
    for name, tables in runs.items():
        for title, rows in tables:
            for r in rows:
                order.setdefault(title, {}).setdefault((r.method, r.model, r.batch), {})[name] = r
    merged = []
    for title, keyed in order.items():
        rows = []
        for by_setting in keyed.values():
            name, best = min(by_setting.items(), key=lambda kv: _sort_key(kv[1].seconds))
            first = next(iter(by_setting.values()))
            row = copy.deepcopy(best)
            row.extra = {**first.extra, **{k: v for k, v in best.extra.items() if v is not None}}
            row.peak_mb = best.peak_mb if best.peak_mb is not None else first.peak_mb
            row.setting = best.setting or name
            rows.append(row)
        merged.append((title, rows))
    return merged


def _sort_key(seconds: float) -> float:
    return seconds if seconds == seconds else float("inf")  # NaN last
