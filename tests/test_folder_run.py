"""A folder as a job, continued: one writer per output folder (the lock), a manifest that grows by
appending (the journal), and both surviving kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import convlens
from convlens import outputs
from convlens.cli import main
from convlens.outputs import JOURNAL, LOCK, MANIFEST, RunLockedError, RunWriter, read_manifest

HOLDER = textwrap.dedent("""
    import sys, time
    from convlens.outputs import RunWriter
    run = RunWriter(sys.argv[1], "explain", keys=["a.png"])
    run.write("a.png", "x.txt", b"x"); run.commit_image("a.png", name="a.png")
    print("holding", flush=True)
    time.sleep(120)
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(convlens.__file__).parents[1]), "OMP_NUM_THREADS": "1"}


def _hold(out: Path) -> subprocess.Popen:
    """A process that opened a run in ``out`` and sleeps in the middle of it."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, env=_env(), text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "holding"
    return p


def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_one_leaves_no_stale_lock(
        tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    p = _hold(out)
    try:
        with pytest.raises(RunLockedError, match=f"another convlens run \\(process {p.pid}, which holds"):
            RunWriter(out, "explain", keys=["b.png"])
        # the command line: one line, exit 2, nothing of the other run touched
        (tmp_path / "in.png").write_bytes((Path(convlens.__file__).parent / "data" / "chelsea.jpg").read_bytes())
        assert main(["explain", str(tmp_path / "in.png"), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "being written by another convlens run" in err, err
        assert (out / "a.png" / "x.txt").read_bytes() == b"x" and (out / LOCK).exists()
        # another shard of the same --out is another folder: it runs beside it
        with RunWriter(out / "shard-2-of-2", "explain", keys=["c.png"]) as other:
            other.write("c.png", "x.txt", b"c")
            other.commit_image("c.png")
            other.finish()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert (out / LOCK).exists()  # kill -9 could not remove it, but nobody holds it any more
    with RunWriter(out, "explain", keys=["b.png"], force=True) as run:
        with pytest.raises(RunLockedError):  # the same process, a second writer: refused too
            RunWriter(out, "explain", keys=["b.png"], force=True)
        run.write("b.png", "x.txt", b"b")
        run.commit_image("b.png")
        run.finish()
    assert not (out / LOCK).exists() and (out / "b.png" / "x.txt").read_bytes() == b"b"
    assert not (out / "a.png").exists()  # --force replaced the killed run as a whole


def test_a_refused_run_leaves_no_folder_and_no_lock(tmp_path: Path) -> None:
    src = tmp_path / "cat.png"
    src.write_bytes(b"not an image")
    with pytest.raises(FileExistsError, match="would replace the input"):
        RunWriter(tmp_path / "new", "explain", keys=["cat.png"], inputs=[tmp_path / "new" / "cat.png"])
    assert not (tmp_path / "new").exists()
    with pytest.raises(FileExistsError, match="would replace the input"):  # the parents it made go too
        RunWriter(tmp_path / "a" / "b", "explain", keys=["cat.png"], inputs=[tmp_path / "a" / "b" / "cat.png"])
    assert not (tmp_path / "a").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cat.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="convlens did not write"):
        RunWriter(tmp_path / "old", "explain", keys=["cat.png"])
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["cat.png"]


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with RunWriter(tmp_path / "out", "explain", keys=["a"]) as run:
        assert not (tmp_path / "out" / LOCK).exists()
        run.write("a", "x.txt", b"x")
        run.commit_image("a")
        run.finish()
    assert "cannot lock the output folder" in caplog.text and (tmp_path / "out" / "a" / "x.txt").is_file()


def test_the_manifest_grows_by_journal_lines_and_is_rewritten_rarely(tmp_path: Path, monkeypatch) -> None:
    out, n = tmp_path / "out", 100
    keys = [f"im{i:03d}.png" for i in range(n)]
    rewrites = []
    real = outputs.write_file

    def counting(path, data):
        if Path(path).name == MANIFEST:
            rewrites.append(len(data))
        return real(path, data)

    monkeypatch.setattr(outputs, "write_file", counting)
    with RunWriter(out, "explain", keys=keys, files=["summary.json"]) as run:
        for i, key in enumerate(keys):
            run.write(key, "x.txt", str(i).encode())
            run.commit_image(key, name=key)
            m = read_manifest(out)  # at every moment: every finished image, in order
            assert [r["key"] for r in m["images"]] == keys[: i + 1] and not m["complete"]
            assert m["images"][-1]["files"] == [f"{key}/x.txt"]
        lines = (out / JOURNAL).read_bytes().count(b"\n")
        assert 0 < lines < n
        run.write(None, "summary.json", b"{}")
        run.finish()
    # the first image, then whenever the journal is as long as the manifest (>= 16 lines): at 1, 18, 37 and 75;
    # and the finished run's manifest
    assert len(rewrites) == 5, rewrites
    assert sum(rewrites) < 4 * rewrites[-1]  # linear in the number of images, not quadratic
    assert not (out / JOURNAL).exists() and not (out / LOCK).exists()
    m = json.loads((out / MANIFEST).read_text())
    assert m["complete"] and [r["key"] for r in m["images"]] == keys and m["files"] == ["summary.json"]


def test_a_torn_journal_line_and_another_runs_journal_are_ignored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = RunWriter(out, "explain", keys=["a", "b", "c"])
    for key in "ab":
        run.write(key, "x.txt", b"x")
        run.commit_image(key)
    good = (out / JOURNAL).read_bytes()
    with open(out / JOURNAL, "ab") as f:
        f.write(json.dumps({"run": "someone-else", "image": {"key": "z", "files": ["z/x"]}}).encode() + b"\n")
        f.write(b'{"run": "' + run._run_id.encode() + b'", "image": {"key": "c", "fi')  # killed mid-line
    assert [r["key"] for r in read_manifest(out)["images"]] == ["a", "b"]
    assert good.count(b"\n") == 1  # "a" went into the manifest itself, "b" into the journal
    run.abort()
    assert not (out / LOCK).exists()


def test_kill_9_then_resume_equals_one_run(tmp_path: Path) -> None:
    from test_outputs import tiny
    from test_resume import DRIVER, SMALL, photos, same_images, summary

    imgs = photos(tmp_path / "in", 8)
    out = tmp_path / "out"
    (tmp_path / "driver.py").write_text(DRIVER)
    args = ["explain", str(tmp_path / "in"), "--techniques", "activations,gradcam,occlusion", "--fast",
            "--out", str(out)]
    p = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(Path(__file__).parent), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + 120
    while not (out / imgs[2].name / "summary.json").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    done = {r["key"] for r in read_manifest(out)["images"]}  # the journal's lines count
    assert {i.name for i in imgs[:3]} <= done and len(done) < len(imgs), done
    assert (out / JOURNAL).exists() and (out / LOCK).exists()
    stamps = {f: f.stat().st_mtime_ns for k in done for f in (out / k).iterdir()}
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr("convlens.cli.load_classifier", lambda a: tiny())
        mp.setattr(sys.modules["convlens.explain"], "FAST", SMALL)
        assert main([*args, "--resume"]) == 0
        assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # kept, not recomputed
        assert main([*args[:-1], str(tmp_path / "one")]) == 0
        same_images(summary(out)["images"], summary(tmp_path / "one")["images"])
    finally:
        mp.undo()
    assert [p.name for p in out.rglob(".*")] == [MANIFEST]


# -- several images per call (the GPU path, checked on the CPU too) ---------------------------
def _folder(tmp_path: Path, n: int) -> Path:
    from test_resume import photos

    photos(tmp_path / "in", n)
    return tmp_path / "in"


def test_batched_explain_equals_one_image_at_a_time(tmp_path: Path, device: str, monkeypatch) -> None:
    import torch

    from test_outputs import tiny

    clf = tiny()
    clf.model.to(device)
    clf = convlens.Classifier(clf.model, mean=clf.mean, std=clf.std, size=32, name="tiny", labels=clf.labels)
    folder = _folder(tmp_path, 5)
    settings = {"occlusion": {"patch": 16, "stride": 8}, "activations": {"channels": 2}, "trust": {"steps": 4}}
    methods = ["activations", "gradcam", "occlusion", "trust"]
    sizes = []
    occ = sys.modules["convlens.methods.occlusion"]
    real = occ.occlusion
    monkeypatch.setattr(occ, "occlusion", lambda m, x, **k: sizes.append(len(x)) or real(m, x, **k))
    one = convlens.explain(folder, clf, techniques=methods, options=settings, batch_size=1, cache=False)
    assert sizes == [1] * 5
    sizes.clear()
    many = convlens.explain(folder, clf, techniques=methods, options=settings, batch_size=3, cache=False)
    assert sizes == [3, 2]  # images 1-3, then 4-5, went through occlusion together
    assert [im.name for im in many.images] == [im.name for im in one.images]
    # float rounding only: GPU kernels may pick other algorithms for another batch size
    tol = {"rtol": 1e-5, "atol": 1e-6} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}
    for a, b in zip(one.images, many.images):
        assert a.ok and b.ok and a.target == b.target and a.predictions == b.predictions
        assert a.channels == b.channels and a.layers == b.layers
        for tech in ("gradcam", "occlusion"):
            ra, rb = a.results[tech], b.results[tech]
            assert rb.maps.shape == ra.maps.shape == (1, 32, 32) and rb.target == ra.target and rb.labels == ra.labels
            torch.testing.assert_close(rb.maps, ra.maps, **tol)
            torch.testing.assert_close(rb.raw, ra.raw, **tol)
            torch.testing.assert_close(rb.images, ra.images)
        for layer in a.results["activations"].maps:
            torch.testing.assert_close(b.results["activations"].maps[layer], a.results["activations"].maps[layer])
        flat = [(t, k, v) for t, d in a.results["trust"].auc().items() for k, v in d.items()]
        assert [b.results["trust"].auc()[t][k] for t, k, _ in flat] == pytest.approx([v for *_, v in flat], abs=1e-5)
        # float rounding of the batched convolutions can swap near-tied pixels' ranks
        assert b.agreement["gradcam_occlusion_spearman"] == pytest.approx(a.agreement["gradcam_occlusion_spearman"],
                                                                          abs=1e-4)
        assert b.timings["occlusion_s"] > 0


def test_batch_size_is_checked(tmp_path: Path) -> None:
    with pytest.raises(sys.modules["convlens.explain"].ExplainError, match="batch_size must be a positive int"):
        convlens.explain(tmp_path, batch_size=0)


# -- the feature-visualisation budget of a run over several images ----------------------------
def test_a_folder_draws_the_most_shared_channels_and_one_image_keeps_all(tmp_path: Path, monkeypatch) -> None:
    import torch
    from torch import nn

    from test_outputs import tiny

    explain_mod = sys.modules["convlens.explain"]
    # the last conv's channel c responds to how much of input colour c % 3 there is: an image's
    # top channels follow its colours, so red images share channels 0, 3 and green ones 1, 4
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
        for c in range(6):
            net[0].weight[c, c % 3] = 1.0 + 0.1 * c
    clf = tiny(net=net)
    folder = tmp_path / "in"
    folder.mkdir()
    from PIL import Image

    colours = {"r1": (250, 10, 10), "r2": (240, 30, 20), "r3": (230, 20, 40), "g1": (10, 250, 10)}
    for name, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(folder / f"{name}.png")
    drawn = []
    real = sys.modules["convlens.methods.featureviz"].feature_visualization

    def spy(clf, layer, channels, **k):
        drawn.append(list(channels))
        return real(clf, layer, channels, **k)

    monkeypatch.setattr(sys.modules["convlens.methods.featureviz"], "feature_visualization", spy)
    settings = {"filters": {"channels": 2, "steps": 2, "size": 16}, "trust": {"steps": 2}}
    cache = tmp_path / "cache"
    rep = convlens.explain(folder, clf, techniques=["gradcam", "filters"], options=settings, cache=cache)
    assert explain_mod.FOLDER["filters"]["budget"] == 0.4 and rep.settings["filters"]["shared"] == 2
    by = {im.name: im for im in rep.images}
    # red images' top-2: channels 3 then 0 (weights 1.3, 1.0); green: 4, 1. Votes: 3 and 0 three each: drawn
    assert by["r1.png"].channels["filters"] == [3, 0] and "filters_top" not in by["r1.png"].channels
    assert by["g1.png"].channels["filters_top"] == [4, 1] and "filters" not in by["g1.png"].results
    assert any("[4, 1]" in n and "not drawn" in n for n in by["g1.png"].notes["filters"])
    assert by["g1.png"].ok and "filters" not in by["g1.png"].errors
    # the shared channels are optimised first, together; the red images read them back; g1 asks for nothing
    assert drawn == [[0, 3]] + [[3, 0]] * 3
    assert all(by[f"r{i}.png"].channels["filters_cached"] == 2 for i in (1, 2, 3))
    # one image alone keeps all its top channels
    alone = convlens.explain(folder / "g1.png", clf, techniques=["gradcam", "filters"], options=settings, cache=cache)
    assert alone.images[0].channels["filters"] == [4, 1] and "budget" not in str(alone.images[0].notes)
    assert alone.settings["filters"]["budget"] is None
    # the folder again: channels 4 and 1 are in the cache now, so g1 shows them
    again = convlens.explain(folder, clf, techniques=["gradcam", "filters"], options=settings, cache=cache)
    assert {im.name: im for im in again.images}["g1.png"].channels["filters"] == [4, 1]
    # the drawn images are those of one image alone (same settings, same cache entries)
    torch.testing.assert_close({im.name: im for im in again.images}["g1.png"].results["filters"].images,
                               alone.images[0].results["filters"].images)
    # the budget can be lifted: every image's top channels
    full = convlens.explain(folder, clf, techniques=["gradcam", "filters"], cache=False,
                            options={**settings, "filters": {**settings["filters"], "budget": None}})
    assert all(len(im.channels["filters"]) == 2 for im in full.images)
