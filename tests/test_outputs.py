"""Files, interrupts and failures (issue 11): one test per reported case, each of which failed on
the main branch before convlens.outputs, and the folder that holds all of them at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from html import unescape
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens
from convlens import outputs
from convlens.checks import NonFiniteError
from convlens.cli import main
from convlens.images import ImageError, load_image
from convlens.models import Classifier

EXPLAIN = sys.modules["convlens.explain"]
SMALL = {"occlusion": {"patch": 16, "stride": 16}, "activations": {"channels": 2},
         "filters": {"channels": 1, "steps": 2, "size": 32}}


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


def tiny(seed: int = 0, net: nn.Module | None = None) -> Classifier:
    """A five-class net on 32 px inputs: every CLI test here runs in milliseconds per image."""
    return Classifier(net or tiny_net(seed), mean=(0.5,) * 3, std=(0.5,) * 3, size=32, name="tiny",
                      labels=[f"class{i}" for i in range(5)])


@pytest.fixture
def tiny_cli(monkeypatch: pytest.MonkeyPatch) -> Classifier:
    clf = tiny()
    monkeypatch.setattr("convlens.cli.load_classifier", lambda args: clf)
    monkeypatch.setattr(EXPLAIN, "FAST", SMALL)
    return clf


def photo(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, link targets, or "dir"."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = os.fsdecode(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = "special"
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / outputs.MANIFEST).read_text())


# -- naming ----------------------------------------------------------------------------------
def test_keys_keep_the_whole_name_and_are_unique_and_stable() -> None:
    names = ["cat.v2.jpg", "cat.png", "cat.png", "CAT.PNG", "summary.json", "a\x1b[2Jb.png"]
    sources = ["d/cat.v2.jpg", "a/cat.png", "b/cat.png", "c/CAT.PNG", "s/summary.json", "e.png"]
    keys = outputs.image_keys(names, sources)
    assert keys[:2] == ["cat.v2.jpg", "cat.png"]
    assert keys[2].startswith("cat.png~") and keys[3].startswith("CAT.PNG~") and keys[4].startswith("summary.json~")
    assert keys[5].startswith("a_[2Jb.png~") and "\x1b" not in keys[5]
    assert len({k.lower() for k in keys}) == len(keys)
    assert keys == outputs.image_keys(names, sources)  # stable: the same inputs give the same keys
    long = outputs.image_keys(["x" * 240 + ".jpg", os.fsdecode(b"caf\xe9.jpg"), ".hidden.png", "..", "a/b.png"])
    assert all(len(k.encode()) <= outputs.MAX_KEY_BYTES + 9 and "/" not in k for k in long)
    assert long[1].startswith("caf_.jpg~") and long[1].encode("utf-8")  # encodable: no lone surrogate
    assert not long[2].startswith(".") and long[3] not in (".", "..")


def test_display_escapes_terminal_codes_and_undecodable_bytes() -> None:
    assert outputs.printable("a\x1b[31mb\n.jpg") == "a\\x1b[31mb\\x0a.jpg"
    assert outputs.printable(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert outputs.printable("\u202egnp.exe") == "\\u202egnp.exe"  # a bidi override
    assert outputs.printable("café 猫.jpg") == "café 猫.jpg"


# -- case 1: a user's own file overwritten ------------------------------------------------------
def test_case1_gradcam_never_cuts_the_name_or_replaces_a_users_file(tmp_path: Path, tiny_cli, capsys) -> None:
    dot = tmp_path / "dot"
    dot.mkdir()
    photo(dot / "cat.v2.jpg")
    (dot / "cat.png").write_bytes(b"the user's own photo")
    before = tree(dot)
    # --out is the image's own folder: its output folder would be the input itself -> refused
    assert main(["gradcam", str(dot / "cat.v2.jpg"), "--out", str(dot)]) == 2
    assert "would replace the input" in capsys.readouterr().err
    assert tree(dot) == before
    out = tmp_path / "out"
    assert main(["gradcam", str(dot / "cat.v2.jpg"), "--out", str(out), "--top", "3"]) == 0
    files = sorted(p.name for p in (out / "cat.v2.jpg").iterdir())
    assert files == [f"gradcam_{i}.{s}" for i in range(3) for s in ("npy", "png")]
    maps = [np.load(out / "cat.v2.jpg" / f"gradcam_{i}.npy") for i in range(3)]
    cam = convlens.grad_cam(tiny_cli, tiny_cli.preprocess(dot / "cat.v2.jpg"), top=3)
    for i in range(3):  # three classes, three different maps, each the API's
        np.testing.assert_allclose(maps[i], cam.to_numpy()[i], rtol=1e-5, atol=1e-6)
    assert not np.allclose(maps[0], maps[1])
    assert tree(dot) == before


def test_case1_occlusion_two_inputs_of_the_same_name(tmp_path: Path, tiny_cli) -> None:
    for sub, seed in (("a", 1), ("b", 2)):
        (tmp_path / sub).mkdir()
        photo(tmp_path / sub / "cat.png", seed)
    out = tmp_path / "out"
    args = ["occlusion", str(tmp_path / "a" / "cat.png"), str(tmp_path / "b" / "cat.png"), "--out", str(out),
            "--patch", "8", "--stride", "8"]
    assert main(args) == 0
    keys = outputs.image_keys(["cat.png", "cat.png"], [tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png"])
    assert sorted(p.name for p in out.iterdir()) == sorted([outputs.MANIFEST, *keys])
    for key, sub in zip(keys, "ab"):
        ref = convlens.occlusion(tiny_cli, tiny_cli.preprocess(tmp_path / sub / "cat.png"), patch=8, stride=8)
        np.testing.assert_allclose(np.load(out / key / "occlusion.npy"), ref.to_numpy()[0], rtol=1e-5, atol=1e-7)
    m = manifest(out)
    assert m["complete"] is True and [im["key"] for im in m["images"]] == keys
    assert m["command"] == "occlusion" and m["settings"]["patch"] == 8 and m["settings"]["score"] == "probability"
    assert m["images"][1]["source"] == str(tmp_path / "b" / "cat.png")
    import hashlib

    assert m["images"][1]["sha256"] == hashlib.sha256((tmp_path / "b" / "cat.png").read_bytes()).hexdigest()


def test_case1_save_keeps_the_whole_name_and_refuses_foreign_files(tmp_path: Path) -> None:
    clf = tiny()
    cam = convlens.grad_cam(clf, torch.rand(1, 3, 32, 32))

    def old() -> pytest.WarningsChecker:  # the old files <path>.png/.npy (issue 22.2)
        return pytest.warns(DeprecationWarning, match="save")

    with old():
        written = cam.save(tmp_path / "cam.v2.png")
    assert sorted(p.name for p in written) == ["cam.v2.npy", "cam.v2.png"]
    with old():
        assert cam.save(tmp_path / "cam.v2.png") == written  # its own files, written by this process: replaced
    (tmp_path / "mine.png").write_bytes(b"user")
    with pytest.raises(FileExistsError, match="did not write"), old():
        cam.save(tmp_path / "mine.png")
    assert (tmp_path / "mine.png").read_bytes() == b"user" and not (tmp_path / "mine.npy").exists()
    with old():
        cam.save(tmp_path / "mine.png", force=True)
    assert (tmp_path / "mine.png").read_bytes()[:4] == b"\x89PNG"
    acts = convlens.activations(clf, torch.rand(1, 3, 32, 32), ["0"])
    fv = convlens.feature_visualization(clf, "2", [0], steps=1, size=32)
    with old():
        assert {p.name for p in fv.save(tmp_path / "f.4.png")} == {"f.4_0_c0.png", "f.4.npy", "f.4_grid.png"}
    with old():
        assert {p.name for p in acts.save(tmp_path / "acts", prefix="activations")} == {"activations_0.npy",
                                                                                      "activations.png"}


# -- case 2: the guard bypassed by a path spelling -------------------------------------------
def test_case2_dotdot_and_symlink_spellings_do_not_bypass_the_guard(tmp_path: Path, tiny_cli, capsys) -> None:
    img = photo(tmp_path / "p.png")
    base = ["explain", str(img), "--techniques", "gradcam", "--fast"]
    out = tmp_path / "out"
    out.mkdir()
    assert main([*base, "--out", str(out / "o")]) == 0
    before = tree(tmp_path)
    capsys.readouterr()
    assert main([*base, "--out", str(out / "nonexist" / ".." / "o")]) == 2
    assert "already holds" in capsys.readouterr().err
    os.symlink(out / "o", tmp_path / "link")
    assert main([*base, "--out", str(tmp_path / "link")]) == 2
    os.unlink(tmp_path / "link")
    assert tree(tmp_path) == before and not (out / "nonexist").exists()
    assert main([*base, "--out", str(out / "nonexist" / ".." / "p")]) == 0  # a new folder: no stray one
    assert (out / "p" / "summary.json").is_file() and not (out / "nonexist").exists()


# -- case 3: an interrupted --force run ----------------------------------------------------------
def test_case3_interrupted_force_leaves_the_old_run_and_force_removes_stale_files(
    tmp_path: Path, tiny_cli, monkeypatch, capsys
) -> None:
    imgs = [photo(tmp_path / f"{n}.png", i) for i, n in enumerate("abc")]
    out = tmp_path / "out"
    assert main(["explain", *map(str, imgs), "--techniques", "gradcam,occlusion", "--fast", "--out", str(out)]) == 0
    old = tree(out)
    calls = []
    real = EXPLAIN.RUNNERS["occlusion"]

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second image: the first is complete and staged
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setitem(EXPLAIN.RUNNERS, "occlusion", interrupted)
    new = ["explain", str(imgs[0]), str(imgs[1]), "--techniques", "gradcam,occlusion", "--fast", "--force"]
    assert main([*new, "--target", "3", "--out", str(out)]) == 130
    assert tree(out) == old  # the old run, whole; no staging folder left
    monkeypatch.setitem(EXPLAIN.RUNNERS, "occlusion", real)
    assert main([*new, "--target", "3", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [im["name"] for im in s["images"]] == ["a.png", "b.png"] and s["settings"]["target"] == "3"
    # c.png's folder belonged to the earlier run: gone; nothing but this run's files
    listed = {f for im in s["images"] for f in im["files"]} | {"summary.json", "summary.csv", "report.html",
                                                                outputs.MANIFEST}
    assert {os.fsdecode(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == listed
    assert manifest(out)["files"] == ["summary.json", "summary.csv", "report.html"]


def test_case3_force_moves_symlinks_aside_never_writes_through_them(tmp_path: Path, tiny_cli) -> None:
    img = photo(tmp_path / "p.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "gradcam.png").write_bytes(b"precious")
    (outside / "report.html").write_bytes(b"precious too")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "p.png")  # where the image's folder goes
    os.symlink(outside / "report.html", out / "report.html")
    args = ["explain", str(img), "--techniques", "gradcam", "--fast", "--out", str(out)]
    assert main(args) == 2  # in the way, and not convlens's
    assert main([*args, "--force"]) == 0
    assert (outside / "gradcam.png").read_bytes() == b"precious"
    assert (outside / "report.html").read_bytes() == b"precious too"
    assert not (out / "p.png").is_symlink() and (out / "p.png" / "gradcam.npy").is_file()
    assert not (out / "report.html").is_symlink()


def test_force_never_reaches_outside_out_through_an_edited_manifest(tmp_path: Path, tiny_cli) -> None:
    img = photo(tmp_path / "p.png")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    args = ["gradcam", str(img), "--out", str(out)]
    assert main(args) == 0
    m = manifest(out)
    m["files"] = ["../victim", "/etc", ".."]
    m["images"].append({"key": "../victim", "files": ["../victim/keep.txt"]})
    (out / outputs.MANIFEST).write_text(json.dumps(m))
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "victim" / "keep.txt").read_text() == "mine"
    (out / outputs.MANIFEST).write_text("[1, 2]")  # damaged: an earlier run all the same
    assert main(args) == 2 and main([*args, "--force"]) == 0


def test_a_full_disk_during_force_leaves_the_old_run(tmp_path: Path, tiny_cli, monkeypatch, capsys) -> None:
    imgs = [str(photo(tmp_path / f"{i}.png", i)) for i in range(2)]
    out = tmp_path / "out"
    args = ["explain", *imgs, "--techniques", "gradcam", "--out", str(out)]
    assert main(args) == 0
    old = tree(out)
    real = outputs.write_file
    calls = []

    def full(path, data):
        calls.append(path)
        if len(calls) == 4:  # the write itself fails, as on a full disk
            data = lambda f: (_ for _ in ()).throw(OSError(28, "No space left on device"))  # noqa: E731
        return real(path, data)

    monkeypatch.setattr(outputs, "write_file", full)
    assert main([*args, "--force", "--target", "1"]) == 1  # issue 24: not a usage error; the path is named
    assert f"{calls[3]}: no space left on the device" in capsys.readouterr().err and tree(out) == old


def test_force_never_removes_an_input_inside_the_earlier_run(tmp_path: Path, tiny_cli, capsys) -> None:
    out = tmp_path / "out"
    assert main(["explain", str(photo(tmp_path / "p.png")), "--techniques", "gradcam", "--out", str(out)]) == 0
    inside = out / "p.png" / "input.png"
    before = tree(out)
    assert main(["explain", str(inside), "--techniques", "gradcam", "--out", str(out), "--force"]) == 2
    assert "would replace the input" in capsys.readouterr().err and tree(out) == before


# -- case 4: undecodable and very long names ------------------------------------------------------
@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses non-UTF-8 file names")
def test_case4_undecodable_and_long_names_go_through_explain(tmp_path: Path, tiny_cli, capsys) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    photo(Path(os.fsdecode(os.fsencode(d) + b"/caf\xe9.png")), 1)
    long = "x" * 240 + ".png"
    photo(d / long, 2)
    out = tmp_path / "out"
    assert main(["explain", str(d), "--techniques", "gradcam", "--fast", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert sorted(im["name"] for im in s["images"]) == sorted(["caf\\xe9.png", long])
    assert all(im["ok"] and im["files"] for im in s["images"])
    assert "caf\\xe9.png" in (out / "report.html").read_text(encoding="utf-8")
    for im in s["images"]:
        assert all((out / f).is_file() for f in im["files"])
    stdout = capsys.readouterr().out
    assert "caf\\xe9.png" in stdout
    m = manifest(out)
    assert any(os.fsencode(d) + b"/caf\xe9.png" == bytes.fromhex(im.get("source_hex", "")) for im in m["images"])


# -- case 5: content sniffing runs no external program ------------------------------------------
def test_case5_postscript_named_jpg_is_refused_without_ghostscript(tmp_path: Path, monkeypatch) -> None:
    from PIL import EpsImagePlugin

    def never(*args, **kwargs):
        raise AssertionError("the EPS plugin ran (it would start Ghostscript)")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    monkeypatch.setattr(subprocess, "Popen", never)
    ps = tmp_path / "x.jpg"
    ps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n")
    with pytest.raises(ImageError, match="not an image in a supported format"):
        load_image(ps)
    with pytest.raises(ImageError, match="supported format"):
        load_image(ps.read_bytes())
    assert load_image(photo(tmp_path / "fine.tif")).size == (40, 32)  # the supported formats still open


# -- case 6: failures reported as success -----------------------------------------------------
def test_case6_nan_weights_are_an_error_per_image_exit_1(tmp_path: Path, monkeypatch, capsys) -> None:
    net = tiny_net()
    with torch.no_grad():
        net[2].weight[0, 0, 0, 0] = float("nan")
    clf = tiny(net=net)
    monkeypatch.setattr("convlens.cli.load_classifier", lambda args: clf)
    img = photo(tmp_path / "p.png")
    out = tmp_path / "out"
    assert main(["explain", str(img), "--techniques", "gradcam,occlusion", "--fast", "--out", str(out)]) == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] is False and "NaN" in s["images"][0]["errors"]["image"]
    assert "1 with errors" in capsys.readouterr().out
    assert main(["occlusion", str(img), "--patch", "8", "--stride", "8", "--out", str(tmp_path / "o")]) == 1
    assert "FAILED" in capsys.readouterr().out and not list((tmp_path / "o").glob("*/occlusion.npy"))
    for fn in (lambda c, x: convlens.occlusion(c, x, patch=8), convlens.grad_cam,
               lambda c, x: convlens.activations(c, x, ["2"])):
        with pytest.raises(NonFiniteError, match="NaN"):
            fn(clf, torch.rand(1, 3, 32, 32))


def test_case6_constant_maps_warn_in_occlusion_and_activations() -> None:
    net = tiny_net()
    with torch.no_grad():
        net[6].weight.zero_()  # every logit is the bias: nothing in the image matters
        net[0].weight.zero_()
        net[0].bias.fill_(-1.0)  # the first ReLU is off everywhere
    clf = tiny(net=net)
    x = torch.rand(1, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="occlusion map is constant"):
        res = convlens.occlusion(clf, x, patch=8, stride=8)
    assert float(res.raw.abs().max()) == 0.0
    with pytest.warns(RuntimeWarning, match="activations of 1 map is constant"):
        convlens.activations(clf, x, ["1"])


# -- case 7: Ctrl-C -------------------------------------------------------------------------------
WEAKREF_DRIVER = textwrap.dedent("""
    import gc, signal, sys, weakref
    import torch
    from torch import nn
    import convlens.cli as cli
    from convlens.models import Classifier
    explain = sys.modules["convlens.explain"]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 5)).eval()
    cli.load_classifier = lambda args: Classifier(net, mean=(0.5,) * 3, std=(0.5,) * 3, size=32)
    real = explain.RUNNERS["gradcam"]
    class Thing:
        pass
    def collected(*args, **kwargs):
        t = Thing()
        weakref.finalize(t, signal.raise_signal, signal.SIGINT)  # Ctrl-C inside a weakref callback
        del t
        gc.collect()
        return real(*args, **kwargs)
    explain.RUNNERS["gradcam"] = collected
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_case7_ctrl_c_inside_a_weakref_callback_is_not_lost(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(convlens.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", WEAKREF_DRIVER, "explain", str(photo(tmp_path / "p.png")), "--techniques", "gradcam",
         "--out", str(out)], capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 130 and run.stderr.endswith("\nconvlens: interrupted\n"), run.stderr
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr
    assert not (out / "summary.json").exists()


def test_case7_a_swallowed_ctrl_c_still_ends_the_run_with_130(tmp_path: Path, tiny_cli, monkeypatch) -> None:
    real = EXPLAIN.RUNNERS["gradcam"]

    def swallowing(*args, **kwargs):
        try:  # what a weakref callback or a careless finally does with a KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return real(*args, **kwargs)

    monkeypatch.setitem(EXPLAIN.RUNNERS, "gradcam", swallowing)
    imgs = [str(photo(tmp_path / f"{i}.png", i)) for i in range(3)]
    out = tmp_path / "out"
    assert main(["explain", *imgs, "--techniques", "gradcam", "--fast", "--out", str(out)]) == 130
    assert not (out / "summary.json").exists() and not list(out.glob(".convlens-staging-*"))
    assert manifest(out)["complete"] is False if out.exists() else True


DRIVER = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    import convlens.cli as cli, convlens.outputs as outputs
    from convlens.models import Classifier
    sys.modules["convlens.explain"].FAST = {"occlusion": {"patch": 8, "stride": 8}}
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    clf = Classifier(net, mean=(0.5,) * 3, std=(0.5,) * 3, size=32, name="tiny")
    cli.load_classifier = lambda args: clf
    real = outputs.npy_writer
    def slow(array):  # a slow disk: most of the run is spent inside writes
        w = real(array)
        def write(f):
            f.write(b"\\x93NUMPY")
            time.sleep(0.01)
            f.seek(0)
            w(f)
        return write
    outputs.npy_writer = slow
    print("ready", flush=True)
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_case7_sigint_at_many_points_exits_130_with_nothing_half_written(tmp_path: Path) -> None:
    imgs = [str(photo(tmp_path / f"{i}.png", i)) for i in range(8)]
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(convlens.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    seen = set()
    for k, delay in enumerate((0.0, 0.1, 0.3, 0.6)):
        out = tmp_path / f"out{k}"
        force = ["--force"] if k % 2 else []
        if force:  # an earlier run to replace: an interrupted --force must leave it whole
            main(["explain", imgs[0], "--techniques", "gradcam", "--out", str(out)])
            old = tree(out)
        p = subprocess.Popen(
            [sys.executable, str(tmp_path / "driver.py"), "explain", *imgs, "--techniques", "gradcam,occlusion",
             "--fast", "--out", str(out), *force],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        sig = signal.SIGTERM if k == 2 else signal.SIGINT  # `kill` cleans up the same way, exit 143
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        seen.add(p.returncode)
        assert p.returncode in (128 + sig, 0), err
        assert "Traceback" not in err and "Exception ignored" not in err
        everything = [os.fsdecode(f.relative_to(out)) for f in out.rglob("*")] if out.exists() else []
        assert not [f for f in everything if ".convlens-staging" in f or f.endswith(".tmp")], everything
        if force:  # the old run whole, or the new one complete (a Ctrl-C after the last rename)
            assert tree(out) == old or manifest(out)["complete"]
        if out.exists() and (out / outputs.MANIFEST).exists():
            m = manifest(out)
            on_disk = {f for f in everything if (out / f).is_file()} - {outputs.MANIFEST}
            listed = set(m["files"]) | {f for im in m["images"] for f in im["files"]}
            assert on_disk == listed  # exactly what the manifest says, every file complete
            for f in on_disk:
                if f.endswith(".npy"):
                    np.load(out / f)
            assert (out / "summary.json").exists() == m["complete"] >= (p.returncode == 0)
    assert 130 in seen


# -- case 8: work thrown away ---------------------------------------------------------------
def test_case8_arguments_and_out_checked_before_any_work(tmp_path: Path, tiny_cli, monkeypatch, capsys) -> None:
    img = str(photo(tmp_path / "p.png"))
    assert main(["activations", img, "--layers", "0", "--channels", "0,5000", "--out", str(tmp_path / "a")]) == 2
    assert "5000 is out of range: 0 has 6 channels" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    def no_work(args):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("convlens.cli.load_classifier", no_work)
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for out, message in ((tmp_path / "file" / "out", "is a file"), (tmp_path / "dangling", "dangling symlink"),
                         (tmp_path / "file", "not a folder")):
        for cmd in (["gradcam", img], ["occlusion", img], ["activations", img], ["explain", img],
                    ["filters", "--layer", "2"]):
            assert main([*cmd, "--out", str(out)]) == 2, cmd
            assert message in capsys.readouterr().err
    assert main(["gradcam", img, "--top", "100000", "--out", str(tmp_path / "g")]) == 2
    assert "--top must be from 1 to 50" in capsys.readouterr().err
    assert main(["filters", "--layer", "2", "--size", "100000", "--out", str(tmp_path / "f")]) == 2
    assert "16 to 1024" in capsys.readouterr().err
    with pytest.raises(ValueError, match="16 to 1024"):
        convlens.feature_visualization(tiny(), "2", [0], size=100000)
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists() and not (tmp_path / "gone").exists()


# -- case 9: silently dropped inputs ------------------------------------------------------------
def test_case9_every_unused_folder_entry_is_listed(tmp_path: Path, tiny_cli, capsys) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    photo(d / "good.png")
    os.symlink(d / "missing.png", d / "dangling.png")
    os.mkfifo(d / "pipe.png")
    (d / "photo.jpg").mkdir()
    (d / ".hidden.png").write_bytes(b"")
    (d / "notes.txt").write_text("hi")
    out = tmp_path / "out"
    assert main(["explain", str(d), "--techniques", "gradcam", "--fast", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    reasons = {Path(x["path"]).name: x["reason"] for x in s["skipped"]}
    assert reasons == {
        ".hidden.png": "hidden file", "dangling.png": "dangling symlink",
        "notes.txt": "not an image file (suffix)", "photo.jpg": "a folder (folders are not searched)",
        "pipe.png": "not a regular file (a FIFO, socket or device)",
    }
    html = (out / "report.html").read_text()
    assert all(name in html for name in reasons)
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(ImageError, match="not a regular file"):  # named directly: never opened (it would block)
        load_image(d / "pipe.png")


# -- case 10: the smaller points --------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["predict", "--device", "mps"], ["predict", "--device", "xla"], ["predict", "--device", "meta"],
    ["occlusion", "--baseline", "1e308"], ["occlusion", "--baseline", "nan"],
])
def test_case10_device_and_baseline_are_usage_errors(argv, capsys) -> None:
    if argv[-1] == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    try:
        code = main(argv)  # known to torch but not available here: refused when the model is loaded
    except SystemExit as e:  # not a device convlens runs on: refused by the argument parser
        code = e.code
    assert code == 2 and "error" in capsys.readouterr().err
    from convlens.models import ModelError, _pick_device

    for dev in ("meta", "xla", "mps"):
        if dev == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(ModelError):
            _pick_device(dev)
    with pytest.raises(ValueError, match="not a colour"):
        convlens.occlusion(tiny(), torch.rand(1, 3, 32, 32), patch=8, baseline=1e308)


def test_case10_predict_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    img = photo(tmp_path / "p.png")
    code = ("import sys, convlens.cli as c; from convlens.models import Classifier; import torch.nn as nn;"
            "c.load_classifier = lambda a: Classifier(nn.Sequential(nn.Flatten(), nn.LazyLinear(5)), mean=(0,)*3,"
            " std=(1,)*3, size=8); sys.exit(c.main(sys.argv[1:]))")
    p = subprocess.Popen([sys.executable, "-c", code, "predict", *[str(img)] * 3000, "-k", "5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # what `| head -1` does
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert err == "" and p.returncode == 141


def test_case10_escape_codes_in_names_are_escaped_everywhere(tmp_path: Path, tiny_cli, capsys) -> None:
    evil = tmp_path / "a\x1b]0;owned\x07\x1b[2J.png"
    photo(evil)
    assert main(["predict", str(evil)]) == 0
    out_text = capsys.readouterr().out
    assert "\x1b" not in out_text and "a\\x1b]0;owned\\x07\\x1b[2J.png" in out_text
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path), "--techniques", "gradcam", "--fast", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out and "\x1b" not in captured.err
    for f in ("summary.json", "report.html", outputs.MANIFEST):
        assert "\x1b" not in (out / f).read_text() and "\\u001b" not in (out / f).read_text()


def test_case10_state_dict_without_num_batches_tracked_is_accepted() -> None:
    from convlens.models import _load_into

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    ref[1].running_mean.uniform_()
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    _load_into(model, sd, "w.pth")
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).load_state_dict(sd)  # torch's strict load agrees
    with pytest.raises(ValueError, match="missing"):  # a real missing key is still refused
        _load_into(model, {k: v for k, v in sd.items() if k != "1.running_var"}, "w.pth")


# -- done means: all of it at once --------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses non-UTF-8 file names")
def test_a_folder_of_every_bad_case_through_explain(tmp_path: Path, clf, monkeypatch, capsys) -> None:
    """The real default model, every technique (--fast, made tinier), one folder holding every bad
    case: each good image explained, each bad one listed, nothing outside --out touched, exit 1."""
    monkeypatch.setattr(EXPLAIN, "FAST", {"activations": {"channels": 2}, "occlusion": {"patch": 112, "stride": 112},
                                          "filters": {"channels": 1, "steps": 2, "size": 32}})
    monkeypatch.setattr("convlens.cli.load_classifier", lambda args: clf)
    d = tmp_path / "photos"
    d.mkdir()
    sample = convlens.sample_image().resize((96, 72))
    good = ["cat.v2.jpg", "x" * 230 + ".png", "tab\tand\x1b[31mred.png", os.fsdecode(b"caf\xe9.png")]
    for name in good:
        sample.save(d / name)
    (d / "cat.png").write_bytes(b"the user's unrelated photo")  # an image that cannot be read
    (d / "broken.jpg").write_bytes(convlens.sample_image_path().read_bytes()[:2000])
    (d / "ghost.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    os.symlink(d / "nowhere.jpg", d / "dangling.jpg")
    os.mkfifo(d / "fifo.jpg")
    (d / "photo.jpg").mkdir()
    (d / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    before = tree(tmp_path)
    rc = main(["explain", str(d), "--fast", "--out", str(out)])
    assert rc == 1
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before  # nothing outside --out
    s = json.loads((out / "summary.json").read_text())
    by_name = {im["name"]: im for im in s["images"]}
    for name in good:
        im = by_name[outputs.printable(name)]
        assert im["ok"], im["errors"]
        assert {Path(f).name for f in im["files"]} >= {f"{t}.png" for t in ("input", *EXPLAIN.METHODS)}
        assert all((out / f).is_file() for f in im["files"])
    for bad in ("cat.png", "broken.jpg", "ghost.jpg"):
        assert "image" in by_name[bad]["errors"] and by_name[bad]["files"] == []
    assert "supported format" in by_name["ghost.jpg"]["errors"]["image"]
    assert {Path(x["path"]).name for x in s["skipped"]} == {"dangling.jpg", "fifo.jpg", "photo.jpg", "readme.txt"}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "\x1b" not in html and "\\x1b" in html and "fifo.jpg" in html
    links = re.findall(r'href="([^"]+)"', html)  # the index links each image's page whatever the names hold
    assert len(links) == sum(1 for im in s["images"] if im["files"])
    assert all((out / unquote(unescape(h))).is_file() for h in links)
    m = manifest(out)
    assert m["complete"] and {im["key"] for im in m["images"] if im["files"]} == {
        im["folder"] for im in s["images"] if im["files"]}
    assert "\x1b" not in capsys.readouterr().out
