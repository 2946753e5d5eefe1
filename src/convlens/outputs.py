"""A run's files: staging, manifest, lock, ``--force``'s swap and its recovery.

Names (image keys), Ctrl-C handling and atomic writes of single files are :mod:`convlens.files`;
its public names are importable from here too, as before the split.

A run (:class:`RunWriter`) writes into ``<out>/.convlens-staging-XXXX/`` and renames each image's
folder into place when it is complete; ``<out>/.convlens-manifest.json`` lists what is there (each
finished image is appended as one line to ``.convlens-manifest.journal`` and the manifest is
rewritten whole only when the journal has grown as long as it, so a run of n images writes O(n)
bytes of manifest, and a kill -9 loses at most the line being written; :func:`read_manifest`
reads both). One process at a time writes into an ``<out>``: a run holds ``<out>/.convlens-lock``
(an ``flock``, released by the kernel when the process dies, so never stale) and a second run on
the same folder is refused at once with :class:`RunLockedError`. An
``--out`` that holds an earlier run, or any entry this run would write, is refused unless
``force``; with ``force`` the earlier run is replaced as a whole at the end: an intent record
(:data:`INTENT`) says what moves where, then the entries are swapped (``renameat2(RENAME_EXCHANGE)``
where the system has it), the manifest last, with Ctrl-C and SIGTERM held back for those few
renames. A kill at any instant leaves the old run, the new one, or a record from which the next
command on ``out`` completes the swap before anything else (:func:`recover`); a failure (a full
disk, :class:`DiskFullError`) undoes it. Every rename goes through :func:`convlens.files._rename`
(where the crash tests stop the process, :data:`FAULT_ENV`). What a run folder holds is read back
through :mod:`convlens.runfolder`, as untrusted input. Entries are moved, never written through: a symlink in
``--out`` is replaced as a link, its target untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._names import INTENT, JOURNAL, LOCK, MANIFEST, STAGING_PREFIX, printable
from .files import (
    FAULT_ENV,
    MAX_KEY_BYTES,
    OLD,
    RESERVED,
    DiskFullError,
    Writer,
    _disk_full,
    _rename,
    _umask_mode,
    activations_files,
    atomic_path,
    check_interrupt,
    feature_files,
    figure_and_array_files,
    figure_writer,
    hold_interrupts,
    image_keys,
    interruptible,
    is_regular,
    last_signal,
    npy_writer,
    png_writer,
    resolve_out,
    safe_key,
    saliency_files,
    save_files,
    to_bytes,
    write_file,
)
from .recovery import (  # the names outputs.py held before the split
    RunLockedError,  # noqa: F401
    _aside,
    _FolderLock,
    _fsync_dir,
    _inode,
    _settle,
    _unlink,
    recover,
)

__all__ = [
    "FAULT_ENV", "INTENT", "JOURNAL", "LOCK", "MANIFEST", "MAX_KEY_BYTES", "RESERVED", "STAGING_PREFIX",
    "DiskFullError", "RunLockedError", "RunWriter", "activations_files", "atomic_path", "check_interrupt",
    "feature_files", "figure_and_array_files", "figure_writer", "hold_interrupts", "image_keys", "interruptible",
    "is_regular", "last_signal", "manifest_entries", "npy_writer", "png_writer", "printable", "read_manifest",
    "recover", "resolve_out", "safe_key", "saliency_files", "save_files", "to_bytes", "write_file",
]

log = logging.getLogger(__name__)


# -- a run ----------------------------------------------------------------------------------
def read_manifest(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of the run in ``out`` with its journal applied (the images finished since the
    manifest was last rewritten, by key, in order; a torn last line, left by a kill, is skipped);
    ``None`` when there is none, ``{"format": "damaged", "error": ...}`` when it cannot be used
    (see :mod:`convlens.runfolder`: it is read as untrusted input). Records that do not validate
    are left out of ``images`` and listed under ``damaged``.

    Example::

        read_manifest("out")["images"]   # one record per image folder of the run
    """
    from .runfolder import RunFolderError, read_manifest_file

    if not os.path.lexists(Path(out) / MANIFEST):
        return None
    try:
        return read_manifest_file(out)
    except (OSError, RunFolderError) as e:
        log.debug("%s", e)
        return {"format": "damaged", "error": printable(str(e)), "files": [], "images": [], "damaged": []}


def manifest_entries(manifest: dict[str, Any]) -> list[str]:
    """The top-level names a manifest's run owns: its files and one folder per image. Only plain
    names count: a manifest that was edited to say ``../elsewhere`` never reaches outside ``out``."""
    names = [*manifest.get("files", []), *(im.get("key") for im in manifest.get("images", []) if im.get("files")),
             *(d.get("key") for d in manifest.get("damaged", []))]  # damaged records' folders go aside with --force
    return [n for n in names if isinstance(n, str) and n not in ("", ".", "..", MANIFEST)
            and not set(n) & {"/", "\\", "\0"} and not n.startswith(STAGING_PREFIX)]


def _sha256(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def _source_fields(source: Any) -> dict[str, Any]:
    """What a manifest records of an image's source file: path, size, mtime, SHA-256."""
    rec: dict[str, Any] = {}
    if isinstance(source, (str, os.PathLike)):
        real = os.path.abspath(source)
        rec["source"] = printable(real)
        if printable(real) != real:
            rec["source_hex"] = os.fsencode(real).hex()  # the exact bytes, for matching later
        with contextlib.suppress(OSError):
            st = os.stat(real)
            rec["size"], rec["mtime_ns"] = st.st_size, st.st_mtime_ns
        if os.path.isfile(real):
            rec["sha256"] = _sha256(Path(real))
    return rec


@dataclass
class RunWriter:
    """The outputs of one run in ``out``: check, stage, commit, manifest.

    ``keys``: the image folders the run may write; ``files``: its top-level files (``report.html``,
    ``summary.json``); ``inputs``: the run's input paths, which are never replaced. At construction,
    before any work, the run takes ``out``'s lock (creating ``out`` if needed; another run there
    raises :class:`RunLockedError`) and makes its checks; the lock is held until :meth:`finish`,
    :meth:`abort` or the end of a ``with`` block.

    Example::

        with RunWriter("out", "gradcam", keys=["cat.jpg"]) as run:
            run.write("cat.jpg", "gradcam.png", png_bytes); run.commit_image("cat.jpg", name="cat.jpg")
    """

    out: str | os.PathLike[str]
    command: str
    keys: Sequence[str] = ()
    files: Sequence[str] = ()
    inputs: Sequence[Any] = ()
    force: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # what produced the run (for a later resume)
    resume: bool = False  # keep an earlier run of this command in ``out`` and add to it (see :meth:`reusable`)
    root: Path = field(init=False)
    _old: dict[str, Any] | None = field(init=False, default=None)
    _replace: list[str] = field(init=False, default_factory=list)
    _staging: Path | None = field(init=False, default=None)
    _made: list[Path] = field(init=False, default_factory=list)  # the folders this run created, deepest first
    _images: dict[str, dict[str, Any]] = field(init=False, default_factory=dict)
    _top: list[str] = field(init=False, default_factory=list)
    _staged_files: list[str] = field(init=False, default_factory=list)
    _run_id: str = field(init=False, default_factory=lambda: uuid.uuid4().hex[:12])
    _created: str = field(init=False, default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _done: bool = field(init=False, default=False)
    _old_top: list[str] = field(init=False, default_factory=list)
    _lock: _FolderLock | None = field(init=False, default=None)
    _journal_n: int = field(init=False, default=-1)  # lines in the journal; -1: no manifest written yet

    def __post_init__(self) -> None:
        self.root = resolve_out(self.out)
        if not self.root.exists():
            self._made = [p for p in (self.root, *self.root.parents) if not p.exists()]
            self.root.mkdir(parents=True)
        try:
            self._lock = _FolderLock(self.root)
            recover(self.root, locked=True)  # a swap a killed run left half done is completed first
            self._check()
        except BaseException:
            self.abort()
            raise

    def _check(self) -> None:
        names = [*self.files, *self.keys]
        old = read_manifest(self.root) if self.root.is_dir() else None
        there = [n for n in names if os.path.lexists(self.root / n)]
        # an input of this run is never replaced or removed, --force or not
        for src in self.inputs:
            if not isinstance(src, (str, os.PathLike)):
                continue
            real = Path(os.path.realpath(src))
            for n in [*names, *(manifest_entries(old) if old else [])]:
                target = self.root / n
                if real == target or target in real.parents:
                    raise FileExistsError(
                        f"{printable(self.out)}/{printable(n)} would replace the input {printable(src)}; choose "
                        "another output folder")
        if self.resume and old is not None and not self.force:
            self._init_resume(old, there)
            return
        if (old is not None or there) and not self.force:
            more = f" and {len(there) - 3} more" if len(there) > 3 else ""
            what = ", ".join(printable(n) for n in there[:3]) + more
            if old is None:
                raise FileExistsError(
                    f"{printable(self.out)} already holds {what}, which convlens did not write; use --force "
                    "(force=True) to replace it or choose another output folder")
            what = what or f"an earlier {old.get('command', 'convlens')} run"
            raise FileExistsError(
                f"{printable(self.out)} already holds {what} from an earlier run; use --force (force=True) to "
                "replace that run or choose another output folder")
        self._old = old
        self._replace = list(dict.fromkeys([*(manifest_entries(old) if old else []), *there]))
        if old is not None:
            self._replace += [n for n in (MANIFEST, JOURNAL) if os.path.lexists(self.root / n)]

    def _init_resume(self, old: dict[str, Any], there: list[str]) -> None:
        """``resume``: the earlier run stays; its images are kept (those this run recomputes are
        replaced one by one as they complete) and its top-level files are replaced at the end."""
        if old.get("format") == "damaged":
            raise FileExistsError(f"{printable(self.out)}: the earlier run's manifest is damaged, so it cannot be "
                                  "resumed; use --force to replace that run")
        if old.get("command") != self.command:
            raise FileExistsError(f"{printable(self.out)} holds a {printable(old.get('command'))} run, not "
                                  f"{self.command}; --resume continues the same command only")
        owned = set(manifest_entries(old)) | set(self.files)
        foreign = [n for n in there if n not in owned]
        if foreign:
            raise FileExistsError(f"{printable(self.out)} already holds {printable(foreign[0])}, which convlens did "
                                  "not write; use --force (force=True) to replace it or choose another output folder")
        self._old = old
        for rec in old.get("images", []):
            if isinstance(rec, dict) and isinstance(rec.get("key"), str) and rec["key"] in manifest_entries(
                    {"images": [rec]}):
                self._images[rec["key"]] = rec  # still there: listed until replaced
        self._replace = [n for n in self.files if os.path.lexists(self.root / n)]
        self._old_top = [n for n in old.get("files", []) if n in self._replace]

    def reusable(self, settings: dict[str, Any], sources: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """With ``resume``: the earlier run's image records (by key) that this run can keep as they
        are: same ``settings`` (the run's fingerprint: model, weights digest, techniques and
        their settings), the same content (SHA-256 of this run's source of that key, ``sources``:
        key -> path; default: the recorded path), no error, every file still there. Raises
        ``FileExistsError`` when the earlier run used other settings.

        Example::

            done = run.reusable({"model": "m", "weights_digest": "..."}, {"cat.jpg": "photos/cat.jpg"})
        """
        from .runfolder import is_dir, is_file

        self.settings["fingerprint"] = settings
        if not self.resume or self._old is None:
            return {}
        before = (self._old.get("settings") or {}).get("fingerprint")
        now = json.loads(json.dumps(settings, default=str))
        if before != now:
            diff = sorted(k for k in set(before or {}) | set(now) if (before or {}).get(k) != now.get(k))
            raise FileExistsError(
                f"{printable(self.out)} holds a run with other settings (differs in: {', '.join(diff) or 'all'}), so "
                "it cannot be resumed; use --force to replace it or choose another output folder")
        keep = {}
        for key in self.keys:
            rec = self._images.get(key)
            if not rec or not rec.get("ok") or not rec.get("files") or not rec.get("sha256"):
                continue
            src = bytes.fromhex(rec["source_hex"]) if rec.get("source_hex") else rec.get("source")
            src = os.fsdecode(src) if isinstance(src, bytes) else src
            if sources is not None:
                src = os.fspath(sources[key]) if isinstance(sources.get(key), (str, os.PathLike)) else None
            if not isinstance(src, str) or not os.path.isfile(src):
                continue
            if not is_dir(self.root, key) or not all(is_file(self.root, f) for f in rec["files"]):
                continue  # only real files inside the run count (runfolder: no symlink, FIFO or device)
            if _sha256(Path(src)) == rec["sha256"]:
                keep[key] = rec
        return keep

    def keep_image(self, key: str, source: Any = None) -> list[str]:
        """With ``resume``: image ``key`` of the earlier run stays as it is (its record names
        ``source``, where this run found the same content); returns its files."""
        rec = self._images[key]
        rec.pop("source_hex", None)
        rec.update(_source_fields(source))
        return list(rec["files"])

    # -- staging ----------------------------------------------------------------------------
    @property
    def deferred(self) -> bool:
        """True when results wait in staging until the end (an earlier run is being replaced)."""
        return bool(self._replace) and not (self.resume and self._old is not None)

    def locate(self, rel: str) -> Path:
        """Where file ``rel`` (relative to ``out``) of this run is now: in staging or in place."""
        staged = self._staging / rel if self._staging is not None else None
        return staged if staged is not None and staged.exists() else self.root / rel

    def _stage(self) -> Path:
        if self._staging is None:
            if self._lock is not None and self._lock.fd is not None and not os.path.lexists(self.root / INTENT):
                # holding out's lock, no other run writes here, no swap pending (recover() ran): staging
                # folders are a killed run's uncommitted leftovers (the run in out is whole)
                for p in self.root.glob(STAGING_PREFIX + "*"):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
            self._staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        return self._staging

    def path(self, key: str | None, name: str) -> Path:
        """Where to stage file ``name`` of image ``key`` (``None``: a top-level file)."""
        folder = self._stage() if key is None else self._stage() / key
        folder.mkdir(exist_ok=True)
        return folder / name

    def folder(self, key: str | None = None) -> Path:
        """The staging folder of image ``key`` (``None``: the top level), for code that writes its
        files itself (each atomically); tell the run about them with :meth:`add`."""
        return self.path(key, "-").parent

    def add(self, key: str | None, name: str) -> str:
        """Record file ``name`` written into :meth:`folder` ``(key)``; returns its relative path."""
        if not (self.folder(key) / name).is_file():
            raise FileNotFoundError(f"{printable(name)} was not written into the staging folder")
        if key is None:
            self._top.append(name)
            return name
        self._staged_files.append(f"{key}/{name}")
        return f"{key}/{name}"

    def write(self, key: str | None, name: str, data: bytes | Writer) -> str:
        """Stage one file; returns its path relative to ``out`` (``key/name``)."""
        check_interrupt()
        if key is not None and key not in self.keys:
            raise ValueError(f"{key!r} is not an image of this run")
        write_file(self.path(key, name), data)
        rel = name if key is None else f"{key}/{name}"
        if key is None:
            self._top.append(name)
        else:
            self._staged_files.append(rel)
        return rel

    def commit_image(self, key: str, *, name: str | None = None, source: Any = None, ok: bool = True,
                     extra: dict[str, Any] | None = None) -> list[str]:
        """The image ``key`` is complete: move its folder into place (at the end when replacing
        an earlier run) and record it in the manifest. Returns its files (relative to ``out``)."""
        files = sorted(f for f in self._staged_files if f.startswith(key + "/"))
        rec: dict[str, Any] = {"key": key, "name": printable(name if name is not None else key), "ok": ok,
                               "files": files}
        rec.update(_source_fields(source))
        rec.update(extra or {})
        earlier = self._images.get(key) if self.resume and self._old is not None else None
        self._images[key] = rec
        if not self.deferred and (files or earlier):
            with hold_interrupts():
                if files and os.path.lexists(self.root / key):  # an earlier run's folder, redone: swapped
                    self._swap([key], [])
                    if os.path.lexists(self._stage() / key):  # the earlier folder, exchanged out
                        _rename(self._stage() / key, _aside(self._stage() / OLD, key))
                elif files:
                    _rename(self._stage() / key, self.root / key)
                elif os.path.lexists(self.root / key):
                    self._swap([], [key])
                self._record(rec)
        return files

    def _record(self, rec: dict[str, Any]) -> None:
        """Add one image's record to the manifest: a line appended to the journal, or, once the
        journal is as long as the manifest (at least 16 lines), the manifest rewritten whole
        (the total written stays linear in the number of images)."""
        if 0 <= self._journal_n < max(16, len(self._images) - self._journal_n):
            line = json.dumps({"run": self._run_id, "image": rec}, ensure_ascii=False).encode("utf-8") + b"\n"
            fd = os.open(self.root / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                         _umask_mode())
            try:
                os.write(fd, line)  # one write on an O_APPEND file: a kill leaves at most a torn last line
            finally:
                os.close(fd)
            self._journal_n += 1
        else:
            self._write_manifest(complete=False)

    def _manifest(self, complete: bool) -> dict[str, Any]:
        from ._version import __version__

        return {
            "format": "convlens-manifest", "version": 1, "convlens": __version__, "command": self.command,
            "run": self._run_id, "created": self._created, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": complete, "settings": json.loads(json.dumps(self.settings, default=str)),
            "files": list(self._top) if complete else list(self._old_top),
            "images": list(self._images.values()),
        }

    def _write_manifest(self, complete: bool) -> None:
        data = json.dumps(self._manifest(complete), indent=1, ensure_ascii=False).encode("utf-8")
        write_file(self.root / MANIFEST, data)
        with contextlib.suppress(FileNotFoundError):  # its lines are in the manifest now
            os.unlink(self.root / JOURNAL)
        self._journal_n = 0

    def finish(self) -> None:
        """Move everything still staged into place, replacing the earlier run as a whole, and
        write the manifest; then remove the staging folder.

        The new manifest is staged with the rest, then an intent record (:data:`INTENT`: each new
        entry's inode, the old entries) is written before the first rename; entries are swapped
        (``renameat2(RENAME_EXCHANGE)`` where the system has it), the manifest last, and the
        record removed. A kill at any point leaves the record, and the next command on ``out``
        completes the swap (:func:`recover`) before anything else; a failure here (a full disk)
        undoes it, so the earlier run stays."""
        check_interrupt()
        staging = self._stage()
        write_file(staging / MANIFEST, json.dumps(self._manifest(True), indent=1, ensure_ascii=False).encode("utf-8"))
        new = [k for k in self._images if self._images[k]["files"] and (staging / k).exists()] + list(self._top)
        new = [*dict.fromkeys(new), MANIFEST]
        old = [n for n in dict.fromkeys([*self._replace, JOURNAL]) if n not in new and os.path.lexists(self.root / n)]
        try:
            with hold_interrupts():
                self._swap(new, old)
                self._journal_n = 0
                self._done = True
        finally:
            if self._done:  # also when a SIGTERM held back during the swap is raised now
                self._cleanup()
                self._unlock()

    def _swap(self, new: list[str], old: list[str]) -> None:
        """Swap the staged entries ``new`` into ``out`` and move ``old`` aside, as one step for
        any reader that comes after a crash: the intent record first, then the renames (see
        :func:`_settle`), then the record removed; a failure undoes them."""
        staging = self._stage()
        (staging / OLD).mkdir(exist_ok=True)
        intent = {"format": "convlens-intent", "staging": staging.name, "old": old,
                  "new": {n: _inode(staging / n) for n in new}}
        data = json.dumps(intent).encode("utf-8")
        write_file(self.root / INTENT, lambda f: (f.write(data), f.flush(), os.fsync(f.fileno())))  # on disk first
        _fsync_dir(self.root)
        try:
            _settle(self.root, intent, forward=True)
        except BaseException as e:
            _settle(self.root, intent, forward=False)  # raises (the record stays) if it cannot
            _unlink(self.root / INTENT)
            if isinstance(e, OSError):
                raise _disk_full(e, e.filename or self.root) from e
            raise
        _unlink(self.root / INTENT)

    def abort(self) -> None:
        """Drop what is staged (the earlier run, if any, stays as it was) and release the lock."""
        self._cleanup()
        self._unlock()
        for folder in self._made:  # --out a/b/c refused: a and b go too, when still empty
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _cleanup(self) -> None:
        # a staging folder that a swap's intent record still names holds a run: the next command completes it
        if self._staging is not None and self._staging.exists() and not os.path.lexists(self.root / INTENT):
            shutil.rmtree(self._staging, ignore_errors=True)  # never follows symlinks
        self._staging = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not self._done:
            with hold_interrupts():
                self.abort()
        self._unlock()

    def __del__(self) -> None:  # a writer dropped unfinished (e.g. the work before its with block raised)
        with contextlib.suppress(Exception):
            if self._done:
                self._unlock()
            else:
                self.abort()
