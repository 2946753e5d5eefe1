"""The one rule for the files convlens writes: names, uniqueness, staging, manifest, ``--force``.

Naming: every image gets a *key*, its whole file name made safe (``cat.v2.jpg`` -> ``cat.v2.jpg``);
its results go into the folder ``<out>/<key>/`` (``gradcam.png``, ``gradcam.npy``, ...). A name that
had to be changed (control characters, undecodable bytes, ``/ \\ : * ? " < > |``, a leading dot,
over :data:`MAX_KEY_BYTES` bytes) or that repeats an earlier key of the run (``a/cat.png`` and
``b/cat.png``, also differing only in case) gets ``~`` and 8 hex digits of the SHA-1 of the
source's full path, so keys are unique within a run and the same for the same inputs.

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
disk, :class:`DiskFullError`) undoes it. Every rename goes through :func:`_rename`, where the crash
tests stop the process (:data:`FAULT_ENV`). What a run folder holds is read back through
:mod:`convlens.runfolder`, as untrusted input. Entries are moved,
never written through: a symlink in ``--out`` is replaced as a link, its target untouched.
Library ``save()`` calls write each file to a temporary name beside it and rename it; they refuse
a file they did not write in this process unless ``force=True``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._names import INTENT, JOURNAL, LOCK, MANIFEST, STAGING_PREFIX, printable

__all__ = [
    "INTENT", "JOURNAL", "LOCK", "MANIFEST", "MAX_KEY_BYTES", "DiskFullError", "RunLockedError", "RunWriter",
    "atomic_path", "check_interrupt", "hold_interrupts", "image_keys", "interruptible", "manifest_entries", "printable",
    "read_manifest", "recover", "resolve_out", "safe_key", "save_files", "write_file",
]

log = logging.getLogger(__name__)

OLD = ".old"  # inside a staging folder: the entries a swap moved aside
FAULT_ENV = "CONVLENS_FAULT"  # tests: "rename:K:kill|term|enospc" acts before the K-th rename of the process
#: top-level names no image key may take (compared case-insensitively)
RESERVED = frozenset({"report.html", "summary.json", "summary.csv", MANIFEST, JOURNAL, LOCK, INTENT})
MAX_KEY_BYTES = 120
_BAD_CHARS = set('/\\:*?"<>|')

Writer = Callable[[IO[bytes]], None]


# -- names ----------------------------------------------------------------------------------
def _digest(source: Any) -> str:
    raw = os.fsencode(os.path.abspath(source)) if isinstance(source, (str, os.PathLike)) else str(source).encode(
        "utf-8", "surrogateescape")
    return hashlib.sha1(raw).hexdigest()[:8]


def safe_key(name: str) -> tuple[str, bool]:
    """``(key, changed)``: ``name`` as one safe path component, and whether it had to change.

    Keeps letters of any script, digits, spaces and punctuation; replaces path separators,
    characters Windows forbids, control/format characters and undecodable bytes by ``_``; a
    leading dot or space by ``_``; cuts to :data:`MAX_KEY_BYTES` UTF-8 bytes.

    Example::

        safe_key("cat.v2.jpg")  # ('cat.v2.jpg', False)
    """
    chars = []
    for ch in name:
        o = ord(ch)
        bad = ch in _BAD_CHARS or 0xD800 <= o <= 0xDFFF or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
        chars.append("_" if bad else ch)
    key = "".join(chars).rstrip(" .")
    if key[:1] in (".", " ", "-"):
        key = "_" + key[1:]
    data = key.encode("utf-8")
    if len(data) > MAX_KEY_BYTES:
        key = data[:MAX_KEY_BYTES].decode("utf-8", "ignore").rstrip(" .")
    key = key or "image"
    return key, key != name


def image_keys(names: Sequence[str], sources: Sequence[Any] | None = None) -> list[str]:
    """Unique keys (folder names) for a run's images, from their whole file names.

    A changed or repeated name gets ``~`` and 8 hex digits of the SHA-1 of its source's absolute
    path (its name when there is no path), then ``-2``, ``-3`` if that still repeats.

    Example::

        image_keys(["cat.png", "cat.png"], ["a/cat.png", "b/cat.png"])  # ['cat.png', 'cat.png~1b2c...']
    """
    sources = list(sources) if sources is not None else list(names)
    keys: list[str] = []
    seen = {r.lower() for r in RESERVED}
    for name, src in zip(names, sources):
        base, changed = safe_key(str(name))
        key = base
        if changed or key.lower() in seen or key.lower().startswith(STAGING_PREFIX):
            key = f"{base}~{_digest(src)}"
        n = 1
        while key.lower() in seen:
            n += 1
            key = f"{base}~{_digest(src)}-{n}"
        seen.add(key.lower())
        keys.append(key)
    return keys


# -- Ctrl-C ---------------------------------------------------------------------------------
_state = threading.local()
_pending: dict[str, Any] = {"interrupt": False, "signal": signal.SIGINT}


def last_signal() -> int:
    """The signal behind the last interrupt (``SIGINT`` or ``SIGTERM``)."""
    return int(_pending["signal"])


def check_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` when a Ctrl-C arrived that something swallowed (a weakref
    callback, a ``finally`` in third-party code). Called between steps of a run."""
    if _pending["interrupt"]:
        _pending["interrupt"] = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, Ctrl-C (and ``SIGTERM``) raises ``KeyboardInterrupt`` and is also
    remembered, so :func:`check_interrupt` re-raises it if it was swallowed. The CLI wraps each
    command in it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        _pending["interrupt"], _pending["signal"] = True, signum
        if getattr(_state, "held", 0):
            return  # raised when the held section ends
        raise KeyboardInterrupt

    def unraisable(info: Any) -> None:
        # a Ctrl-C that lands in a weakref callback or __del__ cannot propagate: Python would print
        # "Exception ignored in ..." and go on; it is remembered (handler) and raised at the next step
        if isinstance(info.exc_value, KeyboardInterrupt):
            _pending["interrupt"] = True
            return
        old_hook(info)

    _pending["interrupt"], _pending["signal"] = False, signal.SIGINT
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
        sys.unraisablehook = old_hook


@contextlib.contextmanager
def hold_interrupts() -> Iterator[None]:
    """Hold Ctrl-C back during a few renames that must happen together; it is raised after."""
    _state.held = getattr(_state, "held", 0) + 1
    try:
        yield
    finally:
        _state.held -= 1
    if not _state.held:
        check_interrupt()


# -- renames: every rename of a run goes through _rename (the fault-injection point) -----------
_RENAMES = [0]  # renames this process made (the count CONVLENS_FAULT's K refers to)


class DiskFullError(OSError):
    """The device holding ``path`` is full; nothing of the earlier run was replaced."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.ENOSPC, "no space left on the device", os.fspath(path))

    def __str__(self) -> str:
        return f"{printable(self.filename)}: no space left on the device; free some space and run again"


_PARTIAL_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk (no errno)


def _disk_full(e: OSError, path: str | os.PathLike[str]) -> OSError:
    """``e`` as a :class:`DiskFullError` naming ``path`` when it says the disk is full."""
    if isinstance(e, DiskFullError) or not (e.errno in (errno.ENOSPC, errno.EDQUOT) or _PARTIAL_WRITE.search(str(e))):
        return e
    return DiskFullError(path)


def _fault(dst: str | os.PathLike[str]) -> None:
    """The test hook: ``CONVLENS_FAULT="rename:K:ACTION"`` kills the process (``kill``), sends it
    SIGTERM (``term``) or fails with a full disk (``enospc``) just before its K-th rename."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) != 3 or spec[0] != "rename" or spec[1] != str(_RENAMES[0]):
        return
    if spec[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec[2] == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif spec[2] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_EXCHANGE: list[Any] = []


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot (the caller then moves one aside and the other in)."""
    if not _EXCHANGE:
        _EXCHANGE.append(_renameat2())
    fn = _EXCHANGE[0]
    if fn is None:
        return False
    import ctypes

    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, exchange: bool = False) -> bool:
    """Rename ``src`` to ``dst`` (replacing it), or with ``exchange`` swap the two when the system
    can; returns False only when an exchange was asked for, ``dst`` exists and the system cannot
    swap (nothing was done then). Every rename and replace of a run goes through here, so the
    crash tests can stop the process before each one (:data:`FAULT_ENV`)."""
    _RENAMES[0] += 1
    _fault(dst)
    if exchange and os.path.lexists(dst):
        return _exchange(Path(src), Path(dst))
    os.replace(src, dst)
    return True


# -- single files -----------------------------------------------------------------------------
_WRITTEN: set[str] = set()  # resolved paths this process wrote: a library save() may replace them


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; it is renamed to ``path`` only if the block
    succeeds (an existing ``path``, even a symlink, is replaced, never written through), so an
    interrupted write never leaves a half-written file.

    Example::

        with atomic_path("out/a.txt") as tmp: tmp.write_text("hi")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ""
    try:
        # a short temporary name: a 240-byte output name must not make a 260-byte temporary one
        fd, tmp = tempfile.mkstemp(prefix=".convlens-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, _umask_mode())  # mkstemp makes the file private (0600)
        try:
            yield Path(tmp)
            _rename(tmp, path)
        except OSError as e:
            raise _disk_full(e, path) from e
        _WRITTEN.add(os.path.realpath(path))
    finally:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_file(path: str | os.PathLike[str], data: bytes | Writer) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data) if isinstance(data, (bytes, bytearray)) else data(f)
    return Path(path)


def npy_writer(array: np.ndarray) -> Writer:
    """A writer of ``array`` as ``.npy``."""
    return lambda f: np.save(f, np.asarray(array))


def figure_writer(fig: Any, dpi: int = 120) -> Writer:
    """A writer of a matplotlib figure as PNG."""
    return lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")


def png_writer(rgb_uint8: np.ndarray) -> Writer:
    """A writer of an (H, W, 3) uint8 array as PNG, pixel for pixel."""
    from PIL import Image

    return lambda f: Image.fromarray(rgb_uint8, mode="RGB").save(f, format="PNG")


def save_files(files: Sequence[tuple[Path, Writer | bytes]], *, force: bool = False) -> list[Path]:
    """Write ``files`` (``(path, data)``) for a library ``save()``: first check that none would
    replace a file this process did not write (unless ``force``), then write each atomically.

    Example::

        save_files([(Path("out/cam.png"), png_bytes)])
    """
    paths = [Path(p) for p, _ in files]
    if len({os.path.realpath(p) for p in paths}) != len(paths):
        raise ValueError("two outputs of one save() would have the same name")
    for p in paths:
        real = os.path.realpath(p)
        if os.path.lexists(p) and not force:
            if os.path.isdir(p) and not os.path.islink(p):
                raise IsADirectoryError(f"{printable(p)} is a folder")
            if os.path.islink(p) or real not in _WRITTEN:
                raise FileExistsError(
                    f"{printable(p)} exists and convlens did not write it; pass force=True to replace it")
        elif not os.path.lexists(p):
            _check_parent(p.parent)
    written = []
    for p, data in files:
        check_interrupt()
        written.append(write_file(p, data))
    return written


def _check_parent(folder: Path) -> None:
    probe = Path(os.path.realpath(folder))
    while not probe.exists():
        if os.path.lexists(probe):
            raise NotADirectoryError(f"{printable(folder)}: a dangling symlink is in the way")
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{printable(folder)}: {printable(probe)} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{printable(folder)}: cannot write in {printable(probe)}")


def resolve_out(path: str | os.PathLike[str]) -> Path:
    """The output folder with symlinks and ``..`` resolved, checked before any work: it must be a
    folder or creatable (no file or dangling symlink in the way) and writable.

    Example::

        resolve_out("out/nonexist/../o")  # Path('/abs/out/o'); creates nothing
    """
    p = Path(path)
    if os.path.islink(p) and not p.exists():
        raise NotADirectoryError(f"--out {printable(p)} is a dangling symlink")
    real = Path(os.path.realpath(p))
    if real.exists() and not real.is_dir():
        raise NotADirectoryError(f"--out {printable(p)} exists and is not a folder")
    _check_parent(real)
    return real


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


def _inode(path: Path) -> list[int]:
    st = os.lstat(path)
    return [st.st_dev, st.st_ino]


def _is(path: Path, inode: Any) -> bool:
    try:
        return _inode(path) == list(inode)
    except OSError:
        return False


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _aside(old_dir: Path, name: str) -> Path:
    path, n = old_dir / name, 1
    while os.path.lexists(path):
        n += 1
        path = old_dir / f"{name}~{n}"
    return path


def _settle(root: Path, intent: dict[str, Any], *, forward: bool) -> None:
    """Bring a swap described by ``intent`` to its end (``forward``: the new run in ``root``) or
    back to its start (the old run). Which entry is the new one is known by its inode, so this
    works from any point a kill left, and may run again after a kill of its own."""
    staging = root / intent["staging"]
    old_dir = staging / OLD
    new: dict[str, Any] = intent["new"]
    if forward:
        for n in intent["old"]:
            if os.path.lexists(root / n) and n != JOURNAL:
                _rename(root / n, _aside(old_dir, n))
        for n, inode in new.items():
            if _is(root / n, inode):
                continue
            if not _is(staging / n, inode):
                raise FileNotFoundError(f"{printable(staging / n)}: an entry of the new run is missing")
            if not _rename(staging / n, root / n, exchange=True):  # no exchange here: aside, then in
                _rename(root / n, _aside(old_dir, n))
                _rename(staging / n, root / n)
        if JOURNAL in intent["old"] and os.path.lexists(root / JOURNAL):  # its lines are in the new manifest
            _rename(root / JOURNAL, _aside(old_dir, JOURNAL))
        return
    for n, inode in reversed(new.items()):
        if _is(root / n, inode) and not _rename(root / n, staging / n, exchange=True):
            _rename(root / n, _aside(staging, n))
        if not os.path.lexists(root / n) and os.path.lexists(old_dir / n):
            _rename(old_dir / n, root / n)
    for n in intent["old"]:
        if not os.path.lexists(root / n) and os.path.lexists(old_dir / n):
            _rename(old_dir / n, root / n)


def recover(root: str | os.PathLike[str], *, locked: bool = False) -> bool:
    """Complete a swap that a killed run left half done in ``root`` (its :data:`INTENT` record),
    then remove that run's staging folder (the earlier run it held). Every command that opens a
    run folder calls it first; without ``locked`` it takes the folder's lock and does nothing
    while another run holds it or when it cannot write there. Returns whether it completed one.

    Example::

        recover("out")   # True when a killed --force swap was completed
    """
    root = Path(root)
    temps = [p for p in root.glob(".convlens-*.tmp") if p.is_file() and not p.is_symlink()]
    if not os.path.lexists(root / INTENT) and not temps:
        return False
    if not locked:
        try:
            lock = _FolderLock(root)
        except OSError:  # another run holds it (it recovers itself), or the folder is read-only
            return False
        try:
            return recover(root, locked=True)
        finally:
            lock.release()
    from .runfolder import RunFolderError, read_intent

    for p in temps:  # a write a kill cut short (atomic_path's temporary file); nobody else writes here now
        _unlink(p)
    if not os.path.lexists(root / INTENT):
        return False
    try:
        intent = read_intent(root)
        staging = root / intent["staging"]
        if any(p.is_symlink() or (p.exists() and not p.is_dir()) for p in (staging, staging / OLD)):
            raise RunFolderError(f"{printable(staging)}: not a staging folder (a symlink or a file)")
    except RunFolderError as e:
        log.warning("%s; the staging folders in %s are kept (check them and remove them by hand)", e,
                    printable(root))
        return False
    with hold_interrupts():
        try:
            _settle(root, intent, forward=True)
            done = "completed the replacement of a run that was interrupted (kill -9 or a crash)"
        except OSError as e:  # the new run cannot be completed (its staging was edited): the old one comes back
            try:
                _settle(root, intent, forward=False)
            except OSError as again:
                log.warning("%s: an interrupted replacement can be neither completed nor undone (%s; %s); its "
                            "staging folder is kept", printable(root), e, again)
                return False
            done = f"undid the replacement of a run that was interrupted ({printable(str(e))})"
        _unlink(root / INTENT)
    log.warning("%s: %s", printable(root), done)
    shutil.rmtree(staging, ignore_errors=True)
    return True


class RunLockedError(FileExistsError):
    """Another process is writing a run into the same output folder right now."""


class _FolderLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.convlens-lock``, held until :meth:`release`
    or the process's end (the kernel drops it then, so a killed run leaves no stale lock). The
    file is removed on release, while still held; a process that opened it before and locks it
    after finds it unlinked (or replaced) and tries again on the new one. Where ``fcntl`` is
    missing (Windows) there is no lock."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid = os.read(fd, 32).decode("ascii", "replace").strip()
                finally:
                    os.close(fd)
                who = f"process {pid}" if pid.isdigit() else "another process"
                raise RunLockedError(
                    f"{printable(folder)} is being written by another convlens run ({who}, which holds {LOCK}); "
                    "wait for it to finish or choose another output folder") from None
            except OSError as e:  # a file system without flock (some network mounts): no lock, as on Windows
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                log.warning("%s: cannot lock the output folder (%s); a second run there would not be refused",
                            printable(folder), e)
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        raise RunLockedError(f"{printable(folder)}: cannot take {LOCK} (it keeps being replaced)")

    def release(self) -> None:
        """Remove the lock file and drop the lock (may run twice)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


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
    _created_out: bool = field(init=False, default=False)
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
            self.root.mkdir(parents=True)
            self._created_out = True
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
        if self._created_out and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

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


def to_bytes(writer: Writer) -> bytes:
    """What ``writer`` writes, as bytes."""
    buf = io.BytesIO()
    writer(buf)
    return buf.getvalue()


def is_regular(path: Path) -> bool:
    """True for a regular file (after symlinks)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


# -- the files of each result ----------------------------------------------------------------
def _base(path: str | os.PathLike[str]) -> Path:
    """``path`` without a ``.png``/``.npy`` suffix; any other dot stays (``cam.v2`` -> ``cam.v2.png``)."""
    p = Path(path)
    return p.with_name(p.stem) if p.suffix.lower() in (".png", ".npy") else p


def saliency_files(result: Any, path: str | os.PathLike[str], *, index: int | None = None,
                   **plot_args: Any) -> list[tuple[Path, Writer]]:
    """The files of a :class:`~convlens.results.Saliency`: ``<path>.png`` (figure) and ``<path>.npy``
    (raw map) per row; with several rows ``<path>_<row>.png`` ... (rows are images or targets)."""
    base = _base(path)
    rows = range(result.maps.shape[0]) if index is None else [index]
    files: list[tuple[Path, Writer]] = []
    arrays = result.to_numpy()
    for i in rows:
        stem = base.name if len(rows) == 1 else f"{base.name}_{i}"
        files.append((base.with_name(stem + ".png"), _lazy_figure(result.plot, i, **plot_args)))
        files.append((base.with_name(stem + ".npy"), npy_writer(arrays[i])))
    return files


def activations_files(result: Any, directory: str | os.PathLike[str], *, prefix: str = "activations",
                      **plot_args: Any) -> list[tuple[Path, Writer]]:
    """The files of an :class:`~convlens.results.Activations`: ``<prefix>_<layer>.npy`` per layer,
    ``<prefix>.png`` (``<prefix>_<i>.png`` per image when there are several)."""
    d = Path(directory)
    files: list[tuple[Path, Writer]] = [
        (d / f"{prefix}_{safe_key(name)[0]}.npy", npy_writer(arr)) for name, arr in result.to_numpy().items()
    ]
    n = result.images.shape[0]
    for i in range(n):
        png = d / (f"{prefix}.png" if n == 1 else f"{prefix}_{i}.png")
        files.append((png, _lazy_figure(result.plot, i, **plot_args)))
    return files


def feature_files(result: Any, path: str | os.PathLike[str]) -> list[tuple[Path, Writer]]:
    """The files of a :class:`~convlens.results.FeatureImages`: ``<path>_<i>_c<channel>.png`` per
    image (exact pixels), ``<path>.npy`` (all images) and ``<path>_grid.png`` (the figure)."""
    base = _base(path)
    files: list[tuple[Path, Writer]] = []
    for i, unit in enumerate(result.channels):
        tag = "layer" if unit is None else f"c{safe_key(str(unit))[0]}"
        files.append((base.with_name(f"{base.name}_{i}_{tag}.png"), png_writer(result.uint8(i))))
    files.append((base.with_name(base.name + ".npy"), npy_writer(result.to_numpy())))
    files.append((base.with_name(base.name + "_grid.png"), _lazy_figure(result.plot)))
    return files


def figure_and_array_files(result: Any, path: str | os.PathLike[str], *plot_args: Any) -> list[tuple[Path, Writer]]:
    """``<path>.png`` (``result.plot(*plot_args)``) and ``<path>.npy`` (``result.to_numpy()``): the
    files of a metric result (deletion/insertion curves, a sanity check, class sensitivity)."""
    base = _base(path)
    return [(base.with_name(base.name + ".png"), _lazy_figure(result.plot, *plot_args)),
            (base.with_name(base.name + ".npy"), npy_writer(result.to_numpy()))]


def _lazy_figure(plot: Callable[..., Any], *args: Any, **kwargs: Any) -> Writer:
    def write(f: IO[bytes]) -> None:
        figure_writer(plot(*args, **kwargs))(f)

    return write
