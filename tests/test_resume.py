"""A folder as a job: each image written as it is done, --resume after a kill, shards merged."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convlens
from convlens import outputs
from convlens.cli import main
from convlens.runs import merge_runs

EXPLAIN = sys.modules["convlens.explain"]
SMALL = {"occlusion": {"patch": 16, "stride": 16}, "activations": {"channels": 2}}
METHODS = "activations,gradcam,occlusion"


@pytest.fixture
def tiny_cli(monkeypatch: pytest.MonkeyPatch):
    from test_outputs import tiny

    clf = tiny()
    monkeypatch.setattr("convlens.cli.load_classifier", lambda args: clf)
    monkeypatch.setattr(EXPLAIN, "FAST", SMALL)
    return clf


def photos(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        p = folder / f"im{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def same_images(a: list[dict], b: list[dict]) -> None:
    """Per-image summaries equal in what a recomputation must reproduce (timings aside)."""
    def key(im: dict) -> tuple:
        return (im["name"], im["ok"], im["target"], [(p["label"], p["index"], round(p["probability"], 6))
                for p in im["predictions"]], sorted(Path(f).name for f in im["files"]), im.get("agreement"))
    assert [key(im) for im in a] == [key(im) for im in b]


def test_a_folder_run_streams_pages_index_and_csv(tmp_path: Path, tiny_cli) -> None:
    imgs = photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "in"), "--techniques", METHODS, "--fast", "--out", str(out)]) == 0
    s = summary(out)
    assert [im["name"] for im in s["images"]] == [p.name for p in imgs]
    for im in s["images"]:
        folder = out / im["folder"]
        assert {"report.html", "summary.json", "thumbnail.jpg", "input.png", "gradcam.png"} <= {
            p.name for p in folder.iterdir()}
        assert json.loads((folder / "summary.json").read_text())["predictions"] == im["predictions"]
        page = (folder / "report.html").read_text()
        assert page.count("data:image/png;base64,") >= 4 and im["name"] in page  # self-contained, full figures
    index = (out / "report.html").read_text()
    assert all(f'href="{im["folder"]}/report.html"' in index for im in s["images"])
    assert "data:image/png;base64" not in index  # thumbnails (JPEG) only
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [r["name"] for r in rows] == [p.name for p in imgs]
    assert [float(r["top1_probability"]) for r in rows] == [im["predictions"][0]["probability"] for im in s["images"]]


def test_one_image_keeps_the_single_page(tmp_path: Path, tiny_cli) -> None:
    img = photos(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    assert main(["explain", str(img), "--techniques", "gradcam", "--fast", "--out", str(out)]) == 0
    assert (out / "report.html").read_bytes() == (out / img.name / "report.html").read_bytes()
    assert "convlens-index" not in (out / "report.html").read_text()


def test_library_out_releases_each_image(tmp_path: Path, tiny_cli) -> None:
    photos(tmp_path / "in", 2)
    report = convlens.explain(tmp_path / "in", tiny_cli, techniques=["gradcam", "occlusion"], fast=True,
                              out=tmp_path / "out")
    assert all(im.results == {} and im.rgb is None and im.thumb for im in report.images)
    assert report._png == {}
    assert [im["name"] for im in summary(tmp_path / "out")["images"]] == ["im00.png", "im01.png"]


DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv.pop(1))
    import convlens.cli as cli, convlens.outputs as outputs
    from test_outputs import tiny
    sys.modules["convlens.explain"].FAST = {"occlusion": {"patch": 16, "stride": 16}, "activations": {"channels": 2}}
    clf = tiny()
    cli.load_classifier = lambda args: clf
    real = outputs.RunWriter.commit_image
    def slow(self, *a, **k):  # time to be interrupted between images
        files = real(self, *a, **k)
        time.sleep(0.5)
        return files
    outputs.RunWriter.commit_image = slow
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_killed_halfway_then_resume_keeps_the_finished_images(tmp_path: Path) -> None:
    imgs = photos(tmp_path / "in", 6)
    out = tmp_path / "out"
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(convlens.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    args = ["explain", str(tmp_path / "in"), "--techniques", METHODS, "--fast", "--out", str(out)]
    p = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(Path(__file__).parent), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 120
    while not (out / imgs[0].name / "summary.json").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    done = {im["key"] for im in json.loads((out / outputs.MANIFEST).read_text())["images"]}
    assert imgs[0].name in done and len(done) < len(imgs) and not (out / "summary.json").exists()
    stamps = {f: f.stat().st_mtime_ns for k in done for f in (out / k).iterdir()}
    partial = merge_runs([out], tmp_path / "partial")  # what is there can be merged already, and says so
    assert {im["folder"] for im in partial["images"]} == {f"../out/{k}" for k in done}
    assert partial["incomplete"] == ["../out"]
    assert main(args) == 2  # without --resume the earlier run is still refused
    from test_outputs import tiny

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr("convlens.cli.load_classifier", lambda a: tiny())
        mp.setattr(EXPLAIN, "FAST", SMALL)
        assert main([*args, "--resume"]) == 0
        s = summary(out)
        assert [im["name"] for im in s["images"]] == [p.name for p in imgs]
        assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # the finished images were not recomputed
        assert all((out / f).is_file() for im in s["images"] for f in im["files"])
        m = json.loads((out / outputs.MANIFEST).read_text())
        assert m["complete"] and {im["key"] for im in m["images"]} == {p.name for p in imgs}
        # the same as one uninterrupted run
        assert main([*args[:-1], str(tmp_path / "one")]) == 0
        same_images(s["images"], summary(tmp_path / "one")["images"])
        # a finished run resumed again: nothing recomputed, the report rewritten
        again = {f: f.stat().st_mtime_ns for f in (out / imgs[-1].name).iterdir()}
        assert main([*args, "--resume"]) == 0
        assert {f: f.stat().st_mtime_ns for f in again} == again
    finally:
        mp.undo()


def test_resume_redoes_changed_files_and_refuses_other_settings(tmp_path: Path, tiny_cli, capsys) -> None:
    imgs = photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "in"), "--techniques", "gradcam,occlusion", "--fast", "--out", str(out)]
    assert main(args) == 0
    before = {p.name: (out / p.name / "gradcam.npy").stat().st_mtime_ns for p in imgs}
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(imgs[1])  # new content, same name
    assert main([*args, "--resume"]) == 0
    after = {p.name: (out / p.name / "gradcam.npy").stat().st_mtime_ns for p in imgs}
    assert after[imgs[0].name] == before[imgs[0].name] and after[imgs[2].name] == before[imgs[2].name]
    assert after[imgs[1].name] != before[imgs[1].name]
    assert not [p for p in out.rglob("*") if ".convlens-staging" in str(p)]
    import shutil

    shutil.copytree(tmp_path / "in", tmp_path / "moved")  # the same files elsewhere: the content decides
    assert main([args[0], str(tmp_path / "moved"), *args[2:], "--resume"]) == 0
    assert {p.name: (out / p.name / "gradcam.npy").stat().st_mtime_ns for p in imgs} == after
    assert summary(out)["images"][0]["source"] == str(tmp_path / "moved" / imgs[0].name)
    capsys.readouterr()
    assert main([*args, "--resume", "--target", "3"]) == 2  # other settings: not the same run
    assert "other settings" in capsys.readouterr().err
    assert main([*args, "--resume", "--force"]) == 2


def test_two_shards_merged_equal_one_run(tmp_path: Path, tiny_cli, capsys) -> None:
    photos(tmp_path / "in", 5)
    base = ["explain", str(tmp_path / "in"), "--techniques", METHODS, "--fast"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    for i in (1, 2):  # two processes, one --out
        assert main([*base, "--shard", f"{i}/2", "--out", str(tmp_path / "sh")]) == 0
    assert sorted(p.name for p in (tmp_path / "sh").iterdir()) == ["shard-1-of-2", "shard-2-of-2"]
    assert main(["report", str(tmp_path / "sh"), "--out", str(tmp_path / "merged")]) == 0
    merged, one = summary(tmp_path / "merged"), summary(tmp_path / "one")
    same_images(merged["images"], one["images"])
    assert all((tmp_path / "merged" / f).is_file() for im in merged["images"] for f in im["files"])
    index = (tmp_path / "merged" / "report.html").read_text()
    assert all(f'href="{im["folder"]}/report.html"' in index for im in merged["images"])
    assert all((tmp_path / "merged" / im["folder"] / "report.html").is_file() for im in merged["images"])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "merged" / "summary.csv").read_text())))
    assert [r["top1"] for r in rows] == [im["predictions"][0]["label"] for im in one["images"]]
    # into the folder that holds the shards; again only with --force; a run cannot merge into itself
    assert main(["report", str(tmp_path / "sh"), "--out", str(tmp_path / "sh")]) == 0
    assert main(["report", str(tmp_path / "sh"), "--out", str(tmp_path / "sh")]) == 2
    assert main(["report", str(tmp_path / "sh"), "--out", str(tmp_path / "sh"), "--force"]) == 0
    same_images(summary(tmp_path / "sh")["images"], one["images"])
    with pytest.raises(ValueError, match="itself"):
        merge_runs([tmp_path / "one"], tmp_path / "one")
    assert main(["report", str(tmp_path / "in"), "--out", str(tmp_path / "x")]) == 2
    assert "no convlens explain run" in capsys.readouterr().err
    assert main([*base, "--target", "2", "--out", str(tmp_path / "other")]) == 0
    with pytest.raises(ValueError, match="other settings"):
        merge_runs([tmp_path / "one", tmp_path / "other"], tmp_path / "y")
