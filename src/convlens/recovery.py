"""What a run does to an ``<out>`` folder before it writes: take the folder's lock (one writer at a
time, :class:`RunLockedError`), and complete or undo a ``--force`` swap that a killed run left behind
(its intent record, :func:`recover`). :class:`convlens.outputs.RunWriter` calls both; every command
that reads a run folder calls :func:`recover` first. Both are importable from :mod:`convlens.outputs`
too, as before the split.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ._names import INTENT, JOURNAL, LOCK, printable
from .files import (
    OLD,
    _rename,
    hold_interrupts,
)

log = logging.getLogger("convlens.outputs")


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
