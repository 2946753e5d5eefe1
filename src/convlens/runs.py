"""Merge finished (or interrupted) ``convlens explain`` runs and shards into one summary and report.

Every image a run explains has its own folder holding its page (``report.html``), its entry of
the run's summary (``summary.json``) and a ``thumbnail.jpg``; the run's manifest lists the
images. :func:`merge_runs` reads those, never a model: N shards (``--shard I/N``, written into
``OUT/shard-I-of-N/``) or earlier runs become one ``summary.json``, ``summary.csv`` and index
``report.html`` whose links point at the images' own pages where they are.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .display import rich_display
from .outputs import INTENT, MANIFEST, RunWriter, printable, read_manifest, recover, resolve_out
from .results import Result
from .runfolder import RunFolderError, read_run_summary, read_summary, read_thumbnail

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["RunSummary", "find_runs", "merge_runs"]

log = logging.getLogger(__name__)

_SHARD = re.compile(r"shard-(\d+)-of-(\d+)")


@rich_display
@dataclass(frozen=True, eq=False)
class RunSummary(Result, Mapping[str, Any]):
    """What :func:`merge_runs` and :func:`convlens.parallel.explain_on_ray` return: the merged
    ``summary.json``, read as the dict it used to be (``summary["images"]``, ``summary["merged_from"]``);
    ``settings`` the runs' settings (``summary["settings"]``: a run's settings are those of
    :func:`convlens.explain`, recorded per technique). ``save(folder)`` writes a bar chart of the images
    (``plot()``), ``to_numpy()`` (1 per image that succeeded, 0 per image with errors, in name
    order) and the summary as JSON.
    """

    summary: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.summary)

    def __len__(self) -> int:
        return len(self.summary)

    @property
    def settings(self) -> dict[str, Any]:
        """The runs' settings, as in ``summary.json``."""
        return dict(self.summary.get("settings") or {})

    def _repr_lines(self) -> list[str]:
        ok = int(self.to_numpy().sum())
        return [f"RunSummary({len(self.summary.get('images', []))} images, {ok} ok, merged from "
                f"{len(self.summary.get('merged_from', []))} run(s), incomplete {self.summary.get('incomplete')})"]

    def to_numpy(self) -> np.ndarray:
        """(images,) uint8: 1 where the image succeeded, 0 where it has errors."""
        return np.array([1 if im.get("ok") else 0 for im in self.summary.get("images", [])], dtype=np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """The merged summary (as written to ``summary.json``) with ``kind``."""
        return {"kind": type(self).__name__, **self.summary}

    def _name(self) -> str:
        return "summary"

    def plot(self, *, title: str | None = None) -> Figure:
        """A bar chart: images that succeeded, with errors, and skipped."""
        from .plotting import ResultFigure

        flags = self.to_numpy()
        counts = {"ok": int(flags.sum()), "with errors": int(len(flags) - flags.sum()),
                  "skipped": len(self.summary.get("skipped", []))}
        fig = ResultFigure(figsize=(5, 2.4))
        ax = fig.subplots()
        ax.barh(list(counts), list(counts.values()), color=["tab:green", "tab:red", "0.6"])
        ax.set_xlabel("images")
        ax.set_title(title or f"merged from {len(self.summary.get('merged_from', []))} run(s)", fontsize=10)
        fig.tight_layout()
        return fig


def _manifest(folder: Path) -> dict[str, Any] | None:
    recover(folder)  # a replacement a kill left half done is completed before the run is read
    if os.path.lexists(folder / INTENT):  # it could not be (read-only, or its record is damaged)
        log.warning("%s: a replacement of this run was interrupted and is not completed; it may be a mix of two "
                    "runs (a convlens command with write access to it completes it)", printable(folder))
    data = read_manifest(folder)  # with its journal: the images a running or killed run finished
    if data is not None and data.get("format") == "damaged":
        log.warning("%s", data.get("error"))
    return data if data is not None and data.get("format") == "convlens-manifest" else None


def find_runs(folder: str | os.PathLike[str]) -> list[Path]:
    """The explain runs in ``folder``: the folder itself when it holds one, else its shard
    subfolders (``shard-I-of-N``, in order of I). Anything else is a ValueError.

    Example::

        find_runs("out")   # [Path('out/shard-1-of-2'), Path('out/shard-2-of-2')]
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{printable(folder)} is not a folder")
    m = _manifest(root)
    if m is not None and m.get("command") == "explain":
        return [root]
    shards = sorted((p for p in root.iterdir() if _SHARD.fullmatch(p.name) and p.is_dir() and not p.is_symlink()),
                    key=lambda p: tuple(int(g) for g in _SHARD.fullmatch(p.name).groups()[::-1]))  # type: ignore[union-attr]
    runs = [p for p in shards if (_manifest(p) or {}).get("command") == "explain"]
    if not runs:
        raise ValueError(f"{printable(folder)} holds no convlens explain run (no {MANIFEST}, no shard-I-of-N folders)")
    return runs


def _damaged(rec: dict[str, Any], key: str, why: str) -> dict[str, Any]:
    return {"name": printable(rec.get("name") or key), "source": rec.get("source"), "folder": key, "ok": False,
            "predictions": [], "target": None, "errors": {"image": why}, "files": [], "damaged": True}


def _entry(root: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """The summary entry of one image of a run: its own ``summary.json`` read as untrusted input,
    or an entry that says why it is damaged or was not explained."""
    key = rec["key"]
    if not rec.get("files"):
        return {"name": rec.get("name", key), "source": rec.get("source"), "folder": key, "ok": False,
                "predictions": [], "target": None, "errors": rec.get("errors") or {"image": "not explained"},
                "files": []}
    try:
        return read_summary(root, key)
    except (OSError, RunFolderError) as e:
        log.warning("%s; listed as damaged", printable(str(e)))
        return _damaged(rec, key, f"damaged: {printable(str(e))}")


def merge_runs(
    folders: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, force: bool = False
) -> RunSummary:
    """Merge the explain runs in ``folders`` (runs or folders of shards, see :func:`find_runs`)
    into ``out``: ``summary.json`` and ``summary.csv`` (one row per image, sorted by name) and an
    index ``report.html`` linking to each image's own page, without computing anything. The runs
    must share the model, weights and settings (their manifests' fingerprint); an image found in
    two runs (same source) is listed once; a run that is not complete (interrupted, or a shard
    still running) contributes the images it finished and is named under ``incomplete``.
    Returns the merged summary, a :class:`RunSummary` (read as the dict of ``summary.json``).

    Example::

        merge_runs(["out"], "out")   # out/shard-*-of-*/ -> out/report.html, summary.json, summary.csv

    It is long because the runs are read, checked against each other (model, settings, duplicate images)
    and merged in one pass before one writer puts the result in place.
    """
    from .report import render_index, summary_csv, to_json

    target = resolve_out(out)
    roots: list[Path] = []
    for f in folders:
        roots += [r for r in find_runs(f) if r not in roots]
    for r in roots:
        if Path(os.path.realpath(r)) == target:
            raise ValueError(f"--out {printable(out)} is the run {printable(r)} itself; merge into another folder "
                             "(the folder that holds the shards is fine)")
    base: tuple[Path, Any] | None = None
    head: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    thumbs: dict[str, bytes] = {}
    skipped: list[dict[str, str]] = []
    seen: dict[str, Path] = {}
    incomplete: list[str] = []
    for root in roots:
        m = _manifest(root) or {}
        if not m.get("complete"):  # interrupted or still running: merged as far as it got
            incomplete.append(printable(os.path.relpath(os.path.realpath(root), target)))
            log.warning("%s is not complete (interrupted or still running); its finished images are merged",
                        printable(root))
        fp = (m.get("settings") or {}).get("fingerprint")
        if base is None:
            base = (root, fp)
        elif fp != base[1]:
            diff = sorted(k for k in set(fp or {}) | set(base[1] or {}) if (fp or {}).get(k) != (base[1] or {}).get(k))
            raise ValueError(f"{printable(root)} was made with other settings than {printable(base[0])} (differs in: "
                             f"{', '.join(diff) or 'all'}); merge runs of one model and one set of settings")
        try:
            top = read_run_summary(root)
        except (OSError, RunFolderError) as e:
            log.warning("%s; its run-level fields are not used", printable(str(e)))
            top = {}
        head = head or top
        skipped += [s for s in top.get("skipped", []) if s not in skipped]
        records = [(rec, _entry(root, rec)) for rec in m.get("images", [])]
        records += [({"key": d["key"]}, _damaged({}, d["key"], f"damaged: {d['error']}"))
                    for d in m.get("damaged", []) if d.get("key")]
        for rec, entry in records:
            source = str(entry.get("source") or "")
            if source and source in seen:
                skipped.append({"path": source, "reason": f"also in {printable(seen[source])}; listed once"})
                continue
            seen[source] = root
            key = rec["key"]
            folder = Path(os.path.relpath(Path(os.path.realpath(root)) / key, target)).as_posix()  # key: never followed
            entry["folder"] = folder
            # the reader checked each file name lies in the image's folder, which is no symlink
            entry["files"] = [f"{folder}/{f.split('/', 1)[1]}" for f in entry.get("files", [])]
            thumb = read_thumbnail(root, key) if entry["files"] else None
            if thumb is not None:
                thumbs[folder] = thumb
            entries.append(entry)
    entries.sort(key=lambda e: (str(e.get("name", "")), str(e.get("source", ""))))
    fp = base[1] if base is not None and isinstance(base[1], dict) else {}
    errors = [{"image": e.get("name"), "technique": t, "error": msg}
              for e in entries for t, msg in (e.get("errors") or {}).items()]
    summary = {
        "convlens": head.get("convlens"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": head.get("model") or {"name": fp.get("model"), "weights": fp.get("weights"), "input": fp.get("input")},
        "methods": head.get("methods") or fp.get("methods"),
        "settings": {k: v for k, v in (head.get("settings") or fp.get("settings") or {}).items() if k != "shard"},
        "versions": head.get("versions", {}),
        "merged_from": [printable(os.path.relpath(os.path.realpath(r), target)) for r in roots],
        "incomplete": incomplete,
        "ok": not errors,
        "errors": errors,
        "skipped": skipped,
        "images": entries,
    }
    with RunWriter(target, "report", files=["report.html", "summary.json", "summary.csv"], inputs=roots,
                   force=force, settings={"merged_from": summary["merged_from"]}) as run:
        run.write(None, "summary.json", to_json(summary).encode())
        run.write(None, "summary.csv", summary_csv(summary).encode("utf-8"))
        run.write(None, "report.html", render_index(summary, thumbs).encode())
        run.finish()
    return RunSummary(summary)
