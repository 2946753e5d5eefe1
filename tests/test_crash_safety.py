"""Crash safety of ``--force`` (issue 24, cases 1 and 11): fault injection before every rename.

As SQLite tests itself: a run that replaces an earlier one is stopped before its k-th rename, for
every k, by SIGKILL, by SIGTERM and by a full disk, and each time ``--out`` must hold one
complete run, the old or the new (after a kill: once the next command has recovered it), with no
staging folder left behind where the process could clean up. The run is driven through
:class:`RunWriter` in a forked child with small fake image results, so the whole test takes
seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from convlens import files, outputs
from convlens.outputs import FAULT_ENV, INTENT, LOCK, MANIFEST, STAGING_PREFIX, DiskFullError, RunWriter

FILES = ["report.html", "summary.json", "summary.csv"]
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def write_run(out: Path, tag: str, keys: list[str], *, force: bool = False) -> None:
    """A run like explain's: per image two files and a subfolder-free folder, then the top files."""
    with RunWriter(out, "explain", keys=keys, files=FILES, force=force) as run:
        for k in keys:
            run.write(k, "gradcam.png", f"{tag}-{k}-png".encode())
            run.write(k, "summary.json", json.dumps({"name": k, "tag": tag}).encode())
            run.commit_image(k, name=k)
        for f in FILES:
            run.write(None, f, f"{tag}-{f}".encode())
        run.finish()


def snapshot(out: Path) -> dict[str, object]:
    """What a reader of ``out`` sees: every file outside staging folders (the manifest as its run
    id, completeness and image keys)."""
    seen: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if rel.startswith(STAGING_PREFIX) or rel == LOCK or p.is_dir():
            continue
        if rel == MANIFEST:
            m = json.loads(p.read_bytes())
            seen[rel] = (m["run"], m["complete"], sorted(im["key"] for im in m["images"]), m["files"])
        else:
            seen[rel] = p.read_bytes()
    return seen


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(STAGING_PREFIX) or p.name == INTENT)


def child(out: Path, fault: str) -> int:
    """Fork; the child replaces the run in ``out`` with CONVLENS_FAULT=fault; its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.environ[FAULT_ENV] = fault
            files._RENAMES[0] = 0
            with outputs.interruptible():
                write_run(out, "new", ["b", "c", "d"], force=True)
            code = 0
        except DiskFullError as e:
            code = 3 if str(out) in str(e) and "no space left on the device" in str(e) else 4
        except KeyboardInterrupt:
            code = 128 + outputs.last_signal()
        except BaseException:
            code = 5
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.fixture(params=["exchange", "no-exchange"])
def exchange(request, monkeypatch):
    """Each test runs with renameat2(RENAME_EXCHANGE) and with the fallback (move aside, then in)."""
    if request.param == "exchange" and files._renameat2() is None:
        pytest.skip("no renameat2 here")
    monkeypatch.setattr(files, "_EXCHANGE", [files._renameat2() if request.param == "exchange" else None])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], dict[str, object], int]:
    """The old run (a template folder), what the old and the new run look like, and how many
    renames the replacement makes."""
    base = tmp_path_factory.mktemp("crash")
    old = base / "old"
    write_run(old, "old", ["a", "b", "c"])
    new = base / "new"
    shutil.copytree(old, new)
    before = files._RENAMES[0]
    write_run(new, "new", ["b", "c", "d"], force=True)
    total = files._RENAMES[0] - before
    return old, snapshot(old), snapshot(new), total


def fresh(runs: tuple[Path, ...], tmp_path: Path, k: int, action: str) -> Path:
    out = tmp_path / f"{action}-{k}"
    shutil.copytree(runs[0], out)
    return out


def same_run(seen: dict[str, object], old: dict[str, object], new: dict[str, object]) -> str:
    strip = {k: v for k, v in seen.items() if k != MANIFEST}
    if strip == {k: v for k, v in old.items() if k != MANIFEST} and seen[MANIFEST] == old[MANIFEST]:
        return "old"
    if strip == {k: v for k, v in new.items() if k != MANIFEST} and seen[MANIFEST][1:] == new[MANIFEST][1:]:
        return "new"
    return "mixed"


def test_the_replacement_renames_enough_to_test(runs):
    old, old_seen, new_seen, total = runs
    assert total >= 15  # the staged files, the staged manifest, the intent and the swap itself
    assert old_seen["b/gradcam.png"] == b"old-b-png" and new_seen["b/gradcam.png"] == b"new-b-png"
    assert "a/gradcam.png" in old_seen and "a/gradcam.png" not in new_seen


def test_kill_before_every_rename_leaves_one_run(runs, tmp_path, exchange):
    """SIGKILL before rename k, for every k: the next command (its recovery) finds the old run or
    the new one, whole; a kill after the intent record was written gives the new one."""
    _, old_seen, new_seen, total = runs
    got = []
    for k in range(1, total + 1):
        out = fresh(runs, tmp_path, k, "kill")
        assert child(out, f"rename:{k}:kill") == -signal.SIGKILL
        outputs.recover(out)  # what every command (RunWriter, report's reader) does first
        which = same_run(snapshot(out), old_seen, new_seen)
        assert which != "mixed", (k, sorted(snapshot(out)))
        assert not (out / INTENT).exists()
        got.append(which)
        # the next --force run works and leaves no staging folder behind
        write_run(out, "new", ["b", "c", "d"], force=True)
        assert same_run(snapshot(out), old_seen, new_seen) == "new" and leftovers(out) == []
    assert got[0] == "old" and got[-1] == "new" and got == sorted(got, key=lambda w: w == "new")


def test_resume_after_a_kill_keeps_the_finished_run(runs, tmp_path, exchange):
    """Case 1: killed in the middle of the swap, the next --resume used to say "0 kept" and delete
    the staging folder holding both runs; now it finds the new run whole and keeps all of it."""
    _, old_seen, new_seen, total = runs
    out = fresh(runs, tmp_path, total - 2, "resume")
    assert child(out, f"rename:{total - 2}:kill") == -signal.SIGKILL
    run = RunWriter(out, "explain", keys=["b", "c", "d"], files=FILES, resume=True)
    try:
        assert sorted(run._images) == ["b", "c", "d"]
        assert same_run(snapshot(out), old_seen, new_seen) == "new"
    finally:
        run.abort()


def resume_run(out: Path) -> None:
    """A --resume run that redoes image b (its folder swapped in as it completes, its record
    journalled) and rewrites the top-level files at the end."""
    with RunWriter(out, "explain", keys=["a", "b", "c"], files=FILES, resume=True) as run:
        run.write("b", "gradcam.png", b"redo-b-png")
        run.write("b", "summary.json", json.dumps({"name": "b", "tag": "redo"}).encode())
        run.commit_image("b", name="b")
        for f in FILES:
            run.write(None, f, f"redo-{f}".encode())
        run.finish()


def test_kill_before_every_rename_of_a_resume_keeps_each_image_whole(runs, tmp_path, exchange):
    """The move of each finished image and the manifest/journal update: killed before any rename
    of a --resume, every image folder is there whole (the old b or the redone one, never none or
    a mix), the manifest lists all three, and the top-level files are all old or all new."""
    base = tmp_path / "base"
    write_run(base, "old", ["a", "b", "c"])
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    before = files._RENAMES[0]
    resume_run(probe)
    total = files._RENAMES[0] - before
    done = snapshot(probe)
    assert done["b/gradcam.png"] == b"redo-b-png" and done["a/gradcam.png"] == b"old-a-png"
    for k in range(1, total + 1):
        out = tmp_path / f"resume-{k}"
        shutil.copytree(base, out)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.environ[FAULT_ENV] = f"rename:{k}:kill"
            files._RENAMES[0] = 0
            resume_run(out)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), k
        outputs.recover(out)
        seen = snapshot(out)
        assert seen["b/gradcam.png"] in (b"old-b-png", b"redo-b-png"), k
        tag = json.loads(seen["b/summary.json"])["tag"]
        assert seen["b/gradcam.png"] == (b"old-b-png" if tag == "old" else b"redo-b-png"), k
        assert seen["a/gradcam.png"] == b"old-a-png" and seen["c/gradcam.png"] == b"old-c-png", k
        assert len({seen[f][:3] for f in FILES}) == 1, (k, [seen[f] for f in FILES])
        assert sorted(im["key"] for im in outputs.read_manifest(out)["images"]) == ["a", "b", "c"], k


def test_sigterm_before_every_rename_ends_clean(runs, tmp_path, exchange):
    """SIGTERM before rename k: the run stops (143) with the old run (before the swap) or the new
    one (the swap completes first), and its staging folder is removed, also after the swap."""
    _, old_seen, new_seen, total = runs
    for k in range(1, total + 1):
        out = fresh(runs, tmp_path, k, "term")
        assert child(out, f"rename:{k}:term") == 128 + signal.SIGTERM, k
        assert same_run(snapshot(out), old_seen, new_seen) != "mixed", k
        assert leftovers(out) == [], (k, leftovers(out))


def test_full_disk_at_every_rename_keeps_the_old_run(runs, tmp_path, exchange):
    """A full disk at rename k: DiskFullError naming the path and "no space left on the device",
    the old run exactly as it was, no staging folder and no intent record left."""
    _, old_seen, new_seen, total = runs
    for k in range(1, total + 1):
        out = fresh(runs, tmp_path, k, "enospc")
        assert child(out, f"rename:{k}:enospc") == 3, k
        assert same_run(snapshot(out), old_seen, new_seen) == "old", k
        assert leftovers(out) == [], (k, leftovers(out))


def test_numpy_short_write_is_named_as_a_full_disk(tmp_path):
    """Case 11: numpy's "50176 requested and 16352 written" becomes the path and the disk."""

    def short(f):
        raise OSError("50176 requested and 16352 written")

    with pytest.raises(DiskFullError, match=r"cam\.npy: no space left on the device"):
        outputs.write_file(tmp_path / "cam.npy", short)
    assert list(tmp_path.iterdir()) == []


def test_cli_full_disk_message_and_exit_1(tmp_path, monkeypatch, capsys):
    """The CLI: exit 1 (not a usage error), one line naming the path and the full disk."""
    from convlens import cli

    def full(args):
        raise DiskFullError(tmp_path / "out" / "x.png")

    summary, add, _ = cli.COMMANDS["layers"]
    monkeypatch.setitem(cli.COMMANDS, "layers", (summary, add, full))
    rc = cli.main(["layers"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == f"convlens: error: {tmp_path / 'out' / 'x.png'}: no space left on the device"


@pytest.mark.parametrize("case", ["symlinked-staging", "missing-staging", "not-json"])
def test_a_hostile_or_damaged_intent_never_blocks_force_nor_reaches_outside(tmp_path, case):
    """An intent record is read as untrusted input too: one whose staging folder is a symlink to a
    folder outside, or is gone, or that is not JSON, moves nothing out of --out and --force works."""
    out = tmp_path / "out"
    write_run(out, "old", ["a", "b", "c"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    if case == "symlinked-staging":
        (out / f"{STAGING_PREFIX}evil").symlink_to(outside)
        (outside / ".old").mkdir()
        intent = {"format": "convlens-intent", "staging": f"{STAGING_PREFIX}evil", "old": ["a", "summary.json"],
                  "new": {}}
        (out / INTENT).write_text(json.dumps(intent))
    elif case == "missing-staging":
        intent = {"format": "convlens-intent", "staging": f"{STAGING_PREFIX}gone", "old": ["a"],
                  "new": {"report.html": [0, 0]}}
        (out / INTENT).write_text(json.dumps(intent))
    else:
        (out / INTENT).write_text("{not json")
    write_run(out, "new", ["b", "c", "d"], force=True)
    seen = snapshot(out)
    assert seen["d/gradcam.png"] == b"new-d-png" and "a/gradcam.png" not in seen
    expected = [".old", "keep.txt"] if case == "symlinked-staging" else ["keep.txt"]  # nothing moved in
    assert sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*")) == expected
