"""Every result has the one shape (issue 22.2): ``plot()`` returns a Figure, ``save(folder)`` writes
``<name>.png``, ``<name>.npy`` and ``<name>.json``, ``to_dict()``, a short repr, and a frozen settings
dataclass that still reads like the dict it replaced; the old calling forms warn and do what they did."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import convlens
from conftest import tiny_classifier
from convlens.metrics.trust import trust_summary
from convlens.report import to_json
from convlens.runs import RunSummary
from convlens.settings import CamSettings, OcclusionSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread per module


@pytest.fixture(scope="module")
def clf() -> convlens.Classifier:
    return tiny_classifier()


@pytest.fixture(scope="module")
def results(clf) -> dict[str, object]:
    """One of every result, on two fixed 16x16 images (no warnings: the new forms only)."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        cam = convlens.grad_cam(clf, x, layer="2")
        occ = convlens.occlusion(clf, x, patch=4, stride=4)
        out = {
            "cam": cam,
            "occlusion": occ,
            "activations": convlens.activations(clf, x, ["0", "2"]),
            "features": convlens.feature_visualization(clf, "2", [0, 3], steps=2, size=16),
            "curve": convlens.deletion(clf, x, cam, steps=4),
            "curves": convlens.deletion_insertion(clf, x, {"gradcam": cam, "occlusion": occ}, steps=4),
            "sanity": convlens.sanity_check(clf, x, "gradcam", layer="2", draws=1),
            "class": convlens.class_sensitivity(clf, x, "gradcam", layer="2"),
            "trust": trust_summary(clf, x[:1], {"gradcam": cam_row(cam)}, steps=4, draws=2),
            "compare": convlens.compare(clf, x[:1], ("gradcam",), steps=4, draws=2, layer="2", sanity=False),
        }
    return {**out, "x": x}


def cam_row(cam: convlens.Saliency) -> convlens.Saliency:
    return dataclasses.replace(cam, maps=cam.maps[:1], raw=cam.raw[:1], target=cam.target[:1], images=cam.images[:1],
                               labels=cam.labels[:1], settings=cam.settings.replace(image_index=[0]))


ALL = ["cam", "occlusion", "activations", "features", "curve", "curves", "sanity", "class", "trust", "compare"]


@pytest.mark.parametrize("which", ALL)
def test_save_writes_the_figure_the_array_and_the_settings(results, which, tmp_path) -> None:
    r = results[which]
    assert isinstance(r, convlens.Result) and isinstance(r.settings, convlens.Settings)
    written = r.save(tmp_path / "out")
    name = written[0].stem
    arrays = r._array()
    suffix = ".npz" if isinstance(arrays, dict) else ".npy"
    expected = {f"{name}.png", f"{name}{suffix}", f"{name}.json"} | (
        {f"{name}.csv", f"{name}.html"} if which == "compare" else set())  # the comparison's page too
    assert {p.name for p in written} == expected == {p.name for p in (tmp_path / "out").iterdir()}
    assert (tmp_path / "out" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    if suffix == ".npy":
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{name}.npy"), r.to_numpy())
    else:  # activations: one array per layer, each its own shape
        with np.load(tmp_path / "out" / f"{name}.npz") as z:
            assert sorted(z.files) == sorted(arrays)
            for k, v in r.to_numpy().items():
                np.testing.assert_array_equal(z[k], v)
    data = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    assert data == json.loads(to_json(r.to_dict()))
    assert data["kind"] == type(r).__name__ and data["settings"] == json.loads(to_json(r.settings.to_dict()))
    assert data["settings"]  # something was recorded
    assert len(repr(r).splitlines()) <= 3 and "tensor(" not in repr(r)


def test_names_and_the_folder_is_made(results, tmp_path) -> None:
    cam = results["cam"]
    assert [p.name for p in cam.save(tmp_path / "a" / "b")] == ["gradcam.png", "gradcam.npy", "gradcam.json"]
    assert [p.name for p in cam.save(tmp_path, "cat.v2")] == ["cat.v2.png", "cat.v2.npy", "cat.v2.json"]
    with pytest.raises(ValueError, match="without a folder"):
        cam.save(tmp_path, "../x")


def test_a_foreign_file_is_refused_and_left_as_it_was(results, tmp_path) -> None:
    (tmp_path / "gradcam.json").write_text("mine")
    # rerunning a script finds its earlier outputs too: the message does not claim convlens never wrote them
    with pytest.raises(FileExistsError, match=r"this session did not write it \(an earlier run or another program"):
        results["cam"].save(tmp_path)
    assert (tmp_path / "gradcam.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradcam.json"]  # nothing else written either
    results["cam"].save(tmp_path, force=True)
    assert json.loads((tmp_path / "gradcam.json").read_text())["method"] == "gradcam"


def test_plot_draws_the_array(results) -> None:
    cam, fv = results["cam"], results["features"]
    fig = cam.plot(index=1, normalize="none", title="mine")
    assert isinstance(fig, Figure) and fig._suptitle.get_text() == "mine"
    np.testing.assert_array_equal(np.asarray(fig.axes[1].images[0].get_array()), cam.to_numpy()[1])
    grid = fv.plot(ncols=1)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(grid.axes[i].images[0].get_array()), fv.rgb(i))
    curve = results["curve"].plot(index=1)
    np.testing.assert_allclose(curve.axes[0].lines[0].get_ydata(), results["curve"].scores[1].numpy())
    for which in ALL:
        assert isinstance(results[which].plot(title="t"), Figure)


def test_to_dict_holds_the_small_numbers(results) -> None:
    cam, curve, sanity = results["cam"].to_dict(), results["curve"].to_dict(), results["sanity"].to_dict()
    assert cam["target"] == results["cam"].target and cam["settings"]["image_index"] == [0, 1]
    assert curve["auc"] == results["curve"].auc.tolist() and curve["curve"] == "deletion"
    assert sanity["passed"] == results["sanity"].passed and "maps" not in sanity
    occ = results["occlusion"].to_dict()["settings"]
    assert occ["windows_evaluated"] == results["occlusion"].settings.windows_evaluated == 32  # 16 windows x 2


def test_old_forms_warn_and_give_the_same_files_and_figures(results, tmp_path) -> None:
    cam, check = results["cam"], results["sanity"]
    with pytest.warns(DeprecationWarning, match=r"index="):
        old = cam.plot(1, alpha=0.3)
    new = cam.plot(index=1, alpha=0.3)
    np.testing.assert_array_equal(old.axes[2].images[0].get_array(), new.axes[2].images[0].get_array())
    with pytest.warns(DeprecationWarning, match=r"save\(folder, name\)"):
        paths = cam.save(tmp_path / "cam.png")
    assert [p.name for p in paths] == ["cam_0.png", "cam_0.npy", "cam_1.png", "cam_1.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "cam_1.npy"), cam.to_numpy()[1])
    with pytest.warns(DeprecationWarning, match="index"):
        png, npy = check.save(tmp_path / "sanity", index=1)
    np.testing.assert_array_equal(np.load(npy), check.to_numpy())
    with pytest.warns(DeprecationWarning):
        old_png = check.plot(1)
    assert old_png._suptitle.get_text() == check.plot(index=1)._suptitle.get_text()
    with pytest.raises(TypeError, match="by keyword"):
        cam.plot(0, 1)


def test_deletion_insertion_still_reads_as_its_dict(results, clf) -> None:
    curves = results["curves"]
    assert list(curves) == ["gradcam", "occlusion"] and len(curves) == 2 and "gradcam" in curves
    d, i = curves["gradcam"]
    torch.testing.assert_close(d.scores, results["curve"].scores)  # as deletion() gives it alone
    assert (d.kind, i.kind) == ("deletion", "insertion")
    assert {k: (a.kind, b.kind) for k, (a, b) in curves.items()} == {"gradcam": ("deletion", "insertion"),
                                                                     "occlusion": ("deletion", "insertion")}
    # per image: the clean image and the full baseline once, then 3 inner steps per map and kind
    assert curves.settings["forwards"] == 2 * (2 + 2 * 2 * 3)
    np.testing.assert_array_equal(curves.to_numpy()[1, 1], curves["occlusion"][1].to_numpy())


def test_settings_are_frozen_and_read_like_dicts(results) -> None:
    occ, cam = results["occlusion"].settings, results["cam"].settings
    assert isinstance(occ, OcclusionSettings) and isinstance(cam, CamSettings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        occ.patch = (1, 1)  # type: ignore[misc]
    assert occ["patch"] == occ.patch == (4, 4) and occ.get("nothing") is None and "windows" in occ
    assert "zero_gradient" not in cam and "layer_reason" not in cam and dict(cam) == cam.to_dict()
    assert occ == dict(occ) and set(occ) <= {f.name for f in dataclasses.fields(occ)}
    with pytest.raises(ValueError, match=r"unknown occlusion setting\(s\) \['sride'\]; valid: patch, stride"):
        OcclusionSettings.of({"patch": 8, "sride": 4})


def test_an_unknown_explain_option_names_the_valid_ones(clf) -> None:
    from convlens.explain import settings_for
    from convlens.settings import OcclusionOptions

    conf = settings_for(fast=True, overrides={"occlusion": {"patch": 8}})
    assert isinstance(conf["occlusion"], OcclusionOptions) and conf["occlusion"].to_dict() == {
        "patch": 8, "stride": 28, "baseline": 0.0, "score": "probability"}  # DEFAULTS, FAST, then the override
    with pytest.raises(dataclasses.FrozenInstanceError):
        conf["occlusion"].patch = 4  # type: ignore[misc]
    valid = r"unknown occlusion setting\(s\) \['sride'\]; valid: patch, stride, baseline, score$"
    with pytest.raises(ValueError, match=valid):
        convlens.explain(convlens.sample_image(), clf, techniques=["occlusion"], options={"occlusion": {"sride": 4}},
                         cache=False)


#: summary.json's settings keys of an explain run on main before issue 22.2 (group -> keys)
MAIN_KEYS = {"fast": None, "target": None, "tier": ["command", "fast", "folder_from", "name", "said"],
             "predictions": ["top"], "activations": ["channels", "layers"], "gradcam": ["layer", "method"],
             "occlusion": ["baseline", "patch", "score", "stride"],
             "filters": ["budget", "channels", "param", "seed", "size", "steps", "transforms"],
             "trust": ["baseline", "class_maps", "steps"], "cache": None}


def test_summary_json_keeps_its_settings_keys_and_the_run_summary_reads_as_a_dict(clf, tmp_path) -> None:
    img = convlens.sample_image().resize((48, 40))
    report = convlens.explain(img, clf, techniques=["activations", "gradcam", "occlusion", "trust"], fast=True,
                              cache=False, out=tmp_path / "run", layer="2",
                              options={"occlusion": {"patch": 8, "stride": 8}})
    s = json.loads((tmp_path / "run" / "summary.json").read_text())["settings"]
    assert {k: sorted(v) if isinstance(v, dict) else None for k, v in s.items()} == MAIN_KEYS
    assert json.loads(to_json(report.to_dict()))["settings"] == s  # the report's to_dict is its summary
    merged = convlens.runs.merge_runs([tmp_path / "run"], tmp_path / "merged")
    assert isinstance(merged, RunSummary) and merged["settings"] == s and merged.settings == s
    assert dict(merged) == json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert merged.to_numpy().tolist() == [1]
    assert [p.name for p in merged.save(tmp_path / "m")] == ["summary.png", "summary.npy", "summary.json"]
