"""A run folder is untrusted input (issue 24, cases 2-5 and 11): symlinks, FIFOs, devices,
malformed manifests, journals and summaries never crash, hang or reach outside the run.

The runs here are written through :class:`RunWriter` as ``convlens explain`` writes them (per
image ``summary.json``, ``thumbnail.jpg``, ``report.html``), then damaged by hand.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path

import pytest

from convlens.outputs import JOURNAL, MANIFEST, RunWriter, read_manifest
from convlens.runs import merge_runs

FILES = ["report.html", "summary.json", "summary.csv"]
SECRET = b"\xff\xd8SECRET-OUTSIDE-BYTES" * 4


def entry(key: str, label: str = "espresso") -> dict:
    return {"name": key, "source": f"/photos/{key}", "folder": key, "ok": True, "original_size": [4, 6],
            "predictions": [{"label": label, "index": 967, "probability": 0.9}],
            "target": {"index": 967, "label": label}, "layers": {}, "channels": {}, "timings": {"total_s": 0.1},
            "agreement": {}, "errors": {}, "notes": {}, "trust": None,
            "files": [f"{key}/report.html", f"{key}/summary.json", f"{key}/thumbnail.jpg"]}


def make_run(out: Path, keys: list[str]) -> Path:
    with RunWriter(out, "explain", keys=keys, files=FILES, settings={"fingerprint": {"model": "m"}}) as run:
        for k in keys:
            run.write(k, "report.html", b"<html>page</html>")
            run.write(k, "thumbnail.jpg", f"thumb-{k}".encode())
            run.write(k, "summary.json", json.dumps(entry(k)).encode())
            run.commit_image(k, name=k, source=None)
        for f in FILES:
            run.write(None, f, b"{}" if f.endswith(".json") else b"")
        run.finish()
    return out


def merged(run: Path, tmp_path: Path, timeout: float = 60.0) -> dict:
    """``convlens report`` over ``run``, in a thread so a hang fails the test instead of blocking it."""
    box: dict = {}

    def work() -> None:
        try:
            box["summary"] = merge_runs([run], tmp_path / "merged")
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "report hung"
    if "error" in box:
        raise box["error"]
    return box["summary"]


def by_name(summary: dict) -> dict:
    return {im["name"]: im for im in summary["images"]}


# -- case 2: symlinks ----------------------------------------------------------------------------
def test_report_embeds_no_thumbnail_through_a_symlink(tmp_path):
    run = make_run(tmp_path / "run", ["a.jpg", "b.jpg"])
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(SECRET)
    (run / "a.jpg" / "thumbnail.jpg").unlink()
    (run / "a.jpg" / "thumbnail.jpg").symlink_to(secret)
    summary = merged(run, tmp_path)
    page = (tmp_path / "merged" / "report.html").read_text()
    assert base64.b64encode(SECRET).decode() not in page
    assert base64.b64encode(b"thumb-b.jpg").decode() in page  # the real thumbnail is still there
    assert by_name(summary)["b.jpg"]["ok"] is True


def test_report_does_not_merge_an_image_folder_that_is_a_symlink(tmp_path):
    run = make_run(tmp_path / "run", ["a.jpg", "b.jpg"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "summary.json").write_text(json.dumps(entry("a.jpg", label="OUTSIDE-LABEL")))
    (outside / "thumbnail.jpg").write_bytes(SECRET)
    (outside / "report.html").write_text("outside page")
    for p in (run / "a.jpg").iterdir():
        p.unlink()
    (run / "a.jpg").rmdir()
    (run / "a.jpg").symlink_to(outside)
    summary = merged(run, tmp_path)
    page = (tmp_path / "merged" / "report.html").read_text()
    a = by_name(summary)["a.jpg"]
    assert a["ok"] is False and a.get("damaged") and "symlink" in a["errors"]["image"]
    assert "OUTSIDE-LABEL" not in page and "outside" not in page.replace(str(tmp_path), "")
    assert base64.b64encode(SECRET).decode() not in page


# -- case 3: FIFOs and devices -------------------------------------------------------------------
def test_report_over_a_fifo_and_dev_zero_finishes(tmp_path):
    run = make_run(tmp_path / "run", ["a.jpg", "b.jpg", "c.jpg"])
    (run / "a.jpg" / "summary.json").unlink()
    os.mkfifo(run / "a.jpg" / "summary.json")
    (run / "b.jpg" / "summary.json").unlink()
    (run / "b.jpg" / "summary.json").symlink_to("/dev/zero")
    (run / "c.jpg" / "thumbnail.jpg").unlink()
    os.mkfifo(run / "c.jpg" / "thumbnail.jpg")
    summary = merged(run, tmp_path, timeout=60)
    ims = by_name(summary)
    assert "not a regular file" in ims["a.jpg"]["errors"]["image"]
    assert "symlink" in ims["b.jpg"]["errors"]["image"]
    assert ims["c.jpg"]["ok"] is True  # its summary is fine; only the thumbnail is left out


def test_reader_refuses_big_files_without_reading_them(tmp_path):
    from convlens.runfolder import RunFolderError, read_bytes

    (tmp_path / "summary.json").write_bytes(b" " * 2048)
    with pytest.raises(RunFolderError, match="over the limit of 1024"):
        read_bytes(tmp_path, "summary.json", 1024)
    with pytest.raises(RunFolderError, match="not a path inside the run"):
        read_bytes(tmp_path, "../x", 1024)


# -- case 4: a malformed manifest or journal never blocks --force -----------------------------------
@pytest.mark.parametrize("damage", ["images-str", "images-list", "deep", "journal-list-key"])
def test_force_works_over_a_malformed_manifest_or_journal(tmp_path, damage):
    out = make_run(tmp_path / "run", ["a.jpg", "b.jpg"])
    m = json.loads((out / MANIFEST).read_text())
    if damage == "images-str":
        m["images"] = "x"
    elif damage == "images-list":
        m["images"] = ["x"]
    elif damage == "deep":
        (out / MANIFEST).write_text('{"format": "convlens-manifest", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    if damage == "journal-list-key":
        (out / JOURNAL).write_text(json.dumps({"run": m["run"], "image": {"key": ["a"], "files": ["a/x"]}}) + "\n")
    elif damage != "deep":
        (out / MANIFEST).write_text(json.dumps(m))
    info = read_manifest(out)  # never raises
    assert info is not None
    with RunWriter(out, "explain", keys=["a.jpg"], files=FILES, force=True) as run:
        run.write("a.jpg", "summary.json", json.dumps(entry("a.jpg")).encode())
        run.commit_image("a.jpg", name="a.jpg")
        run.finish()
    after = read_manifest(out)
    assert after["format"] == "convlens-manifest" and [im["key"] for im in after["images"]] == ["a.jpg"]
    assert (out / "a.jpg" / "summary.json").is_file() and not (out / JOURNAL).exists()


def test_a_damaged_manifest_is_named_in_the_message(tmp_path):
    out = make_run(tmp_path / "run", ["a.jpg"])
    m = json.loads((out / MANIFEST).read_text())
    m["complete"] = "yes"
    (out / MANIFEST).write_text(json.dumps(m))
    info = read_manifest(out)
    assert info["format"] == "damaged" and MANIFEST in info["error"] and "complete" in info["error"]
    with pytest.raises(FileExistsError, match="damaged"):
        RunWriter(out, "explain", keys=["a.jpg"], files=FILES, resume=True)


# -- case 5: wrong types in a per-image summary ------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [("predictions", "espresso"), ("probability", "high")])
def test_wrong_types_in_a_summary_are_named_and_listed_as_damaged(tmp_path, field, value):
    run = make_run(tmp_path / "run", ["a.jpg", "b.jpg"])
    e = entry("a.jpg")
    if field == "predictions":
        e["predictions"] = value
    else:
        e["predictions"][0]["probability"] = value
    (run / "a.jpg" / "summary.json").write_text(json.dumps(e))
    summary = merged(run, tmp_path)
    a = by_name(summary)["a.jpg"]
    assert a["ok"] is False and "summary.json: field predictions" in a["errors"]["image"]
    assert by_name(summary)["b.jpg"]["ok"] is True
    assert "a.jpg" in (tmp_path / "merged" / "report.html").read_text()
    from convlens.runfolder import RunFolderError, read_summary

    with pytest.raises(RunFolderError, match=r"a\.jpg/summary\.json: field predictions"):
        read_summary(run, "a.jpg")


# -- case 11: manifest file entries outside the run ------------------------------------------------
@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "b.jpg/summary.json"])
def test_manifest_files_outside_the_image_are_not_listed(tmp_path, bad):
    out = make_run(tmp_path / "run", ["a.jpg", "b.jpg"])
    m = json.loads((out / MANIFEST).read_text())
    m["images"][0]["files"].append(bad)
    (out / MANIFEST).write_text(json.dumps(m))
    info = read_manifest(out)
    assert [im["key"] for im in info["images"]] == ["b.jpg"]
    assert info["damaged"][0]["key"] == "a.jpg" and "files" in info["damaged"][0]["error"]
    run = RunWriter(out, "explain", keys=["a.jpg", "b.jpg"], files=FILES, resume=True,
                    settings={"fingerprint": {"model": "m"}})
    try:
        assert "a.jpg" not in run._images  # not listed as a file the run wrote; it is explained again
    finally:
        run.abort()
