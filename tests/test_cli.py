"""The command line: output, exit codes, one-line errors, no tracebacks without --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest

from convlens.cli import main


def test_predict_sample_prints_top5(capsys):
    assert main(["predict", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("chelsea.jpg") and "efficientnet_lite0" in out[0]
    assert len(out) == 6 and "Egyptian cat" in out[1] and "[285]" in out[1]


def test_predict_top_k_and_two_images(capsys, tmp_path):
    from PIL import Image

    import convlens

    convlens.sample_image().save(tmp_path / "cat.png")
    assert main(["predict", str(tmp_path / "cat.png"), str(convlens.sample_image_path()), "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and out[0].startswith("cat.png") and "Egyptian cat" in out[1]
    Image.new("L", (30, 20)).save(tmp_path / "grey.png")
    assert main(["predict", str(tmp_path / "grey.png")]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "does-not-exist.jpg"], "does-not-exist.jpg: no such file"),
        (["predict", "--model", "resnet5O"], "did you mean resnet50"),
        (["predict", "--top", "0"], "--top must be at least 1"),
        (["layers", "--filter", "nothing*"], "no layer matches"),
        (["predict", "--weights", "missing.pth"], "weights file not found"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("convlens: error:") and len(err.splitlines()) == 1


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="no such file"):
        main(["--debug", "predict", "nope.png"])


def test_layers_table_marks_default(capsys):
    assert main(["layers", "--filter", "bn2*"]) == 0
    out = capsys.readouterr().out
    assert "bn2 " in out and "1280x7x7" in out and "<- Grad-CAM default" in out


def test_console_script_version_and_errors():
    run = [sys.executable, "-m", "convlens.cli"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("convlens ")
    bad = subprocess.run([*run, "predict", "/nonexistent.png"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    usage = subprocess.run([*run, "predict", "--nope"], capture_output=True, text=True)
    assert usage.returncode == 2 and "unrecognized arguments" in usage.stderr


def test_every_map_comes_with_its_evidence(capsys, tmp_path, clf, sample_x):
    """gradcam/occlusion print each map's deletion/insertion AUC beside a random map's (the library's
    numbers) and name a CAM method that does not tell classes apart; --no-evidence skips it."""
    import re

    import convlens

    assert main(["gradcam", "--method", "gradcam++", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    cam = convlens.grad_cam(clf, sample_x, method="gradcam++")
    d, i = convlens.deletion(clf, sample_x, cam), convlens.insertion(clf, sample_x, cam)
    shown = re.search(r"evidence \[Egyptian cat\]: deletion AUC ([\d.]+), insertion AUC ([\d.]+)", out)
    assert shown and float(shown[1]) == pytest.approx(float(d.auc[0]), abs=6e-4)
    assert float(shown[2]) == pytest.approx(float(i.auc[0]), abs=6e-4)
    assert "warning: gradcam++ is not class-discriminative here" in out
    assert "verdict: do not trust. It fails the sanity check" in out and "random 7x7 map" in out
    assert main(["gradcam", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "evidence [Egyptian cat]" in out and "not class-discriminative" not in out  # Grad-CAM is
    assert main(["gradcam", "--no-evidence", "--out", str(tmp_path / "c")]) == 0
    assert "evidence" not in capsys.readouterr().out


def test_per_image_commands_take_a_folder(capsys, tmp_path):
    """`convlens gradcam photos/` as `explain photos/` and `compare photos/` take it: each image file
    in the folder (sorted, not recursive), the rest skipped; an empty folder is a usage error."""
    import numpy as np
    from PIL import Image

    import convlens

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    convlens.sample_image().save(photos / "b cat.png")
    Image.new("L", (40, 30), 90).save(photos / "a grey.jpg")
    (photos / "notes.txt").write_text("not an image")
    assert main(["predict", str(photos), "-k", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  (")[0] for line in out[::2]] == ["a grey.jpg", "b cat.png"] and "Egyptian cat" in out[3]
    out_dir = tmp_path / "out"
    assert main(["gradcam", str(photos), "--target", "285", "--no-evidence", "--out", str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) == ["a grey.jpg", "b cat.png"]
    cam = convlens.grad_cam(convlens.load_model(), photos / "b cat.png", target=285)
    np.testing.assert_allclose(np.load(out_dir / "b cat.png" / "gradcam.npy"), cam.to_numpy()[0], atol=1e-5)
    (tmp_path / "empty").mkdir()
    assert main(["occlusion", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    assert "the folder holds no image files" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    # an unreadable image fails alone in predict too (exit 1), the others are still predicted
    (photos / "c broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    assert main(["predict", str(photos), "-k", "1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("a grey.jpg  (") and out[2].startswith("b cat.png  (") and "Egyptian cat" in out[3]
    assert out[4].startswith("c broken.jpg: FAILED: ") and out[5] == "1 of 3 images failed"


def test_a_layer_without_a_map_is_refused_and_leaves_no_folders(capsys, tmp_path):
    """The message says what to do on the command line, and the folders --out a/b/c made are gone."""
    assert main(["activations", "--layers", "classifier", "--out", str(tmp_path / "a" / "b" / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "choose a layer whose output is a map (`convlens layers` shows" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
