"""The one benchmark entry point: ``python -m benchmarks [--quick] [--only cam,occlusion] [--device cpu]``.

Discovers every ``benchmarks/bench_<name>.py`` module, calls its
``tables(quick: bool, device: str) -> list[tuple[str, list[Row]]]``, prints each table as
markdown as soon as it is measured, and writes ``BENCHMARKS.md`` (atomically) with the machine,
the exact command, the date, every table, and a "Reading" section. A module whose import fails
(a missing optional peer, no GPU) is skipped with a note; one whose ``tables`` raises is
reported with the error and the run goes on (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import logging
import re
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from .common import Row, fill_ratios, machine_info, markdown_table

log = logging.getLogger("benchmarks")

PACKAGE_DIR = Path(__file__).resolve().parent
HERE = PACKAGE_DIR  # where main() looks for bench modules
READING_HEADING = "## Reading"
READING_PLACEHOLDER = (
    "_To be written after the full run: where convlens wins, where it does not, and why "
    "(kept across reruns: the harness carries this section over from the previous file)._"
)


@dataclass
class Section:
    """What one bench module produced on one device."""

    name: str
    device: str
    tables: list[tuple[str, list[Row]]] = field(default_factory=list)
    note: str | None = None  # why it was skipped or failed
    failed: bool = False
    seconds: float = 0.0


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
            rows = list(rows)
            if rows and all(r.ratio is None for r in rows):
                fill_ratios(rows)
            section.tables.append((str(title), rows))
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


def render_section(section: Section) -> str:
    """One module's tables (device in the title when not the CPU) and its note, as markdown."""
    suffix = "" if section.device == "cpu" else f" ({section.device})"
    parts = [markdown_table(f"{title}{suffix}", rows) for title, rows in section.tables]
    if section.note:
        parts.append(f"_bench_{section.name}{suffix}: {section.note}_\n")
    return "\n".join(parts)


def render_report(
    sections: Sequence[Section],
    *,
    command: str,
    info: dict[str, object],
    date: str,
    reading: str | None = None,
    total_seconds: float | None = None,
) -> str:
    """The whole BENCHMARKS.md text."""
    lines = [
        "# convlens benchmarks",
        "",
        "Generated by `benchmarks/run.py`; every table's rows were measured side by side in one process "
        "(cases interleaved round-robin after a warm-up, median of the repeats). `x floor` = seconds / the "
        "table's floor row (bare forward, or forward + the partial backward the method needs) on the same "
        "model and batch. `peak MB` = peak torch-tensor memory above the start of one call (CUDA allocator "
        "peak; on the CPU the profiler's allocation events). Correctness columns compare our map with each "
        "peer's on the same input (`max abs diff`, Pearson `r`, minimum over the batch). `IQR %` = interquartile range "
        "of a row's repeats / its median: when it is large the machine was noisy and the ratios are rough.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Command",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Date: {date}" + ("" if total_seconds is None else f" (whole run: {total_seconds:.0f} s)"),
        "",
        "## Tables",
        "",
    ]
    for s in sections:
        header = f"## {s.name}" + ("" if s.device == "cpu" else f" ({s.device})")
        timing = f" ({s.seconds:.0f} s)" if s.seconds else ""
        lines += [header + timing, "", render_section(s)]
    lines += [READING_HEADING, "", (reading or READING_PLACEHOLDER).strip(), ""]
    return "\n".join(lines)


def previous_reading(path: Path) -> str | None:
    """The "Reading" section of an existing report, unless it is still the placeholder."""
    try:
        text = path.read_text()
    except OSError:
        return None
    m = re.search(rf"^{re.escape(READING_HEADING)}\s*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if not m or not m.group(1).strip() or m.group(1).strip() == READING_PLACEHOLDER:
        return None
    return m.group(1).strip()


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small batches and few repeats: minutes on 2 cores")
    p.add_argument("--only", default="", metavar="A,B", help="comma-separated bench names (cam,occlusion,...)")
    p.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda, auto, or a list: cpu,cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads(N) first")
    p.add_argument("--out", default="BENCHMARKS.md", metavar="FILE", help="report path (default BENCHMARKS.md)")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--list", action="store_true", help="list the bench modules and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        modules = discover(HERE, args.only.split(",") if args.only else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(modules))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = _devices(args.device)
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    started = _dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    sections: list[Section] = []
    for device in devices:
        for name, path in modules.items():
            log.info("bench_%s on %s ...", name, device)
            section = run_module(name, path, quick=args.quick, device=device)
            sections.append(section)
            print(render_section(section), flush=True)
    total = time.perf_counter() - t0
    if not args.no_write:
        out = Path(args.out)
        text = render_report(
            sections,
            command=command,
            info=machine_info(),
            date=started.strftime("%Y-%m-%d %H:%M %Z"),
            reading=previous_reading(out),
            total_seconds=total,
        )
        write_report(out, text)
        log.info("wrote %s (%.0f s)", out, total)
    return 1 if any(s.failed for s in sections) else 0
