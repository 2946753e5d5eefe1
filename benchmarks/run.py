"""The one benchmark entry point: ``python -m benchmarks [--quick] [--only cam,occlusion] [--device cpu] [--force]``.

Discovers every ``benchmarks/bench_<name>.py`` module (each has ``tables(quick: bool, device: str)
-> list[tuple[str, list[Row]]]``). Per module, on the CPU, one worker process per thread setting
(:mod:`benchmarks.sweep`: PyTorch's default threads with the default and the passive wait policy,
and one thread) runs its tables; the parent keeps each row at its best setting, fills every ratio
(:func:`benchmarks.common.fill_ratios`), prints the tables as they come and at the end writes
``BENCHMARKS.md`` (atomically; :mod:`benchmarks.report`). It refuses to write it when the 1-minute
load average is above 0.5 at the start (the tables are still printed; ``--force`` overrides).
A module whose import fails (a missing optional peer) is skipped with a note; one whose ``tables``
raises is reported and the run goes on (exit status 1 at the end). A module with ``SWEEP = False``
runs in one worker (it sets its own threads); one with ``IN_FULL_RUN = False`` only with ``--only``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from . import sweep
from .common import fill_ratios, machine_info, markdown_table  # noqa: F401 (markdown_table: re-export)
from .report import LOAD_LIMIT, Section, render_report, render_section

log = logging.getLogger("benchmarks")

PACKAGE_DIR = Path(__file__).resolve().parent
HERE = PACKAGE_DIR  # where main() looks for bench modules
DEFAULT_OUT = "BENCHMARKS.md"


def discover(directory: str | Path = PACKAGE_DIR, only: Sequence[str] | None = None) -> dict[str, Path]:
    """``{name: path}`` of the ``bench_<name>.py`` files in ``directory``, sorted by name.

    ``only`` keeps the named ones (``"cam"`` or ``"bench_cam"``); an unknown name is a ValueError.
    """
    found = {p.stem[len("bench_") :]: p for p in sorted(Path(directory).glob("bench_*.py"))}
    if only:
        wanted = [n.strip().removeprefix("bench_") for n in only if n.strip()]
        unknown = [n for n in wanted if n not in found]
        if unknown:
            raise ValueError(f"no benchmark named {', '.join(unknown)}; have: {', '.join(found) or 'none'}")
        found = {n: found[n] for n in wanted}
    return found


def load(name: str, path: Path) -> ModuleType:
    """Import one bench module: as ``benchmarks.bench_<name>`` when it lives in this package."""
    if path.resolve().parent == PACKAGE_DIR:
        return importlib.import_module(f"{__package__ or 'benchmarks'}.bench_{name}")
    spec = importlib.util.spec_from_file_location(f"_convlens_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def run_module(name: str, path: Path, *, quick: bool, device: str) -> Section:
    """Import and run one bench module on one device; never raises (except KeyboardInterrupt)."""
    section = Section(name, device)
    t0 = time.perf_counter()
    try:
        module = load(name, path)
    except Exception as e:  # ImportError for a missing peer, anything else for a broken module
        section.note = f"skipped: import failed ({type(e).__name__}: {_one_line(e)})"
        section.failed = not isinstance(e, ImportError)
        return section
    tables = getattr(module, "tables", None)
    if not callable(tables):
        section.note = "skipped: the module has no tables(quick, device) function"
        return section
    torch.manual_seed(0)
    try:
        result = tables(quick=quick, device=device)
        for title, rows in result:
            section.tables.append((str(title), fill_ratios(list(rows))))
    except Exception as e:
        log.debug("bench %s failed", name, exc_info=True)
        section.note = f"failed: {type(e).__name__}: {_one_line(e)}"
        section.failed = True
        tb = traceback.format_exc(limit=-3)
        print(f"\n[bench_{name} on {device} failed]\n{tb}", file=sys.stderr)
    section.seconds = time.perf_counter() - t0
    return section


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def write_report(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    from convlens.results import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
    path.chmod(0o644)


def _devices(spec: str) -> list[str]:
    devices = []
    for d in (s.strip() for s in spec.split(",")):
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {d}: CUDA is not available here")
        if d and d not in devices:
            devices.append(d)
    return devices or ["cpu"]


def flag(path: Path, name: str) -> bool:
    """A module's ``NAME = True/False`` line (default True), read without importing it."""
    m = re.search(rf"^{name}\s*=\s*(True|False)\b", path.read_text(), flags=re.M)
    return m is None or m.group(1) == "True"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small batches and few repeats: minutes on 2 cores")
    p.add_argument("--only", default="", metavar="A,B", help="comma-separated bench names (cam,occlusion,...)")
    p.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda, auto, or a list: cpu,cuda")
    names = ", ".join(s.name for s in sweep.settings())
    p.add_argument("--settings", default="", metavar="S,T", help=f"thread settings to try (default all: {names})")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="report path (default BENCHMARKS.md, written by a full run only: not with --quick / --only)")
    p.add_argument("--force", action="store_true", help=f"write the report even when the load is above {LOAD_LIMIT}")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--list", action="store_true", help="list the bench modules and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a setting's name: run in-process
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # where a worker writes its sections
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)  # where a worker finds the module
    return p


def run_worker(modules: dict[str, Path], args: argparse.Namespace, devices: list[str]) -> int:
    """In a worker process: run the modules here and write their sections as JSON to ``--json``."""
    sections = [run_module(n, p, quick=args.quick, device=d) for d in devices for n, p in modules.items()]
    Path(args.json).write_text(sweep.to_json(sections))
    return 0


def run_swept(name: str, path: Path, settings: list[sweep.Setting], args: argparse.Namespace,
              device: str) -> Section:
    """One module on one device: a worker per setting, rows merged at their best setting, ratios filled."""
    section = Section(name, device)
    runs, notes, spent = {}, [], {}
    for i, setting in enumerate(settings):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sections.json"
            cmd = [sys.executable, "-m", "benchmarks", "--worker", setting.name, "--only", name, "--device", device,
                   "--json", str(out), "--dir", str(path.parent), *(["--quick"] * args.quick)]
            log.info("bench_%s on %s, threads %s ...", name, device, setting.name)
            rc = subprocess.run(cmd, cwd=sweep.ROOT, env=setting.env(dict(os.environ), primary=i == 0),
                                stdout=2, check=False).returncode  # its output: progress, to stderr
            got = json.loads(out.read_text()) if out.exists() else []
        spent[setting.name] = time.perf_counter() - t0
        if not got:
            notes.append(f"worker {setting.name} exited with {rc} and no rows")
            section.failed = True
            continue
        done = got[0]
        runs[setting.name] = sweep.rows_from(done["tables"])
        section.failed |= done["failed"]
        if done["note"] and done["note"] not in notes:
            notes.append(done["note"])
    section.tables = [(title, fill_ratios(rows)) for title, rows in sweep.merge(runs)]
    section.note = "; ".join(notes) or None
    section.seconds = sum(spent.values())
    log.info("bench_%s on %s: %s", name, device, ", ".join(f"{k} {v:.0f} s" for k, v in spent.items()))
    return section


def _load() -> tuple[float, float, float]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        modules = discover(args.dir or HERE, args.only.split(",") if args.only else None)
        tried = sweep.pick(args.settings, sweep.settings()) if args.settings else sweep.settings()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.only:
        modules = {n: p for n, p in modules.items() if flag(p, "IN_FULL_RUN")}
    if args.list:
        print("\n".join(modules))
        return 0
    devices = _devices(args.device)
    if args.worker:
        return run_worker(modules, args, devices)
    full = not (args.quick or args.only or args.settings)
    out = None if args.no_write else Path(args.out or DEFAULT_OUT) if (args.out or full) else None
    before = _load()
    busy = before[0] > LOAD_LIMIT
    refuse = busy and out is not None and not args.force
    if busy:
        what = f"{out} will NOT be written (the tables are still printed; --force writes it)" if refuse else "rough"
        print(f"load average {before[0]:.2f} (1 min) is above {LOAD_LIMIT}: {what}", file=sys.stderr)
    policy = sweep.wait_policy_check() if "cpu" in devices and any(s.threads == 1 for s in tried) else None
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    started = _dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    sections: list[Section] = []
    for device in devices:
        for name, path in modules.items():
            swept = tried if device == "cpu" and flag(path, "SWEEP") else tried[:1]
            section = run_swept(name, path, swept, args, device)
            sections.append(section)
            print(render_section(section), flush=True)
    total = time.perf_counter() - t0
    after = _load()
    loads = f"{', '.join(f'{v:.2f}' for v in before)} before; {', '.join(f'{v:.2f}' for v in after)} after"
    print(f"load average (1, 5, 15 min): {loads}; whole run {total:.0f} s", file=sys.stderr)
    if out is not None and not refuse:
        run = {"load average (1, 5, 15 min)": loads + (" (**written with --force above the limit**)" if busy else ""),
               "thread settings tried": ", ".join(f"`{s.name}`" for s in tried) + " (threads, OpenMP wait policy)",
               "rule": "each row at its best of those settings (column `threads`); ratios are between best settings"}
        if policy:
            run["wait policy at 1 thread"] = policy
        text = render_report(sections, command=command, info=machine_info(), run=run,
                             date=started.strftime("%Y-%m-%d %H:%M %Z"), total_seconds=total)
        write_report(out, text)
        log.info("wrote %s (%.0f s)", out, total)
    elif refuse:
        print(f"{out} not written: the load average was {before[0]:.2f} at the start (limit {LOAD_LIMIT}; --force)",
              file=sys.stderr)
        return 3
    return 1 if any(s.failed for s in sections) else 0
