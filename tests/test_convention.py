"""The one argument convention (docs/api.md): every public function names its model ``model`` and its
images ``images``, takes the same kinds of images through one resolver, and every old keyword
still works for one release with a DeprecationWarning naming the new one, giving the same result."""

from __future__ import annotations

import inspect
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens
from conftest import tiny, tiny_classifier
from convlens._compat import method_options, renamed
from convlens.baselines import gaussian_blur
from convlens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread per module

#: the old spellings of the model and the images arguments (issue 22)
OLD_NAMES = {"model_or_classifier", "classifier_or_model", "classifier", "clf", "x", "image_or_images", "sources",
             "source"}


MAP = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def clf() -> convlens.Classifier:
    return tiny_classifier()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(1, 3, 16, 16)


def _public_functions():
    out = [(n, getattr(convlens, n)) for n in convlens.__all__]
    out = [(n, f) for n, f in out if callable(f) and not inspect.isclass(f)]
    out += [(f"Classifier.{n}", getattr(convlens.Classifier, n)) for n in ("batch", "logits", "outputs", "predict")]
    from convlens.parallel import explain_on_ray

    return out + [("explain_on_ray", explain_on_ray)]


def test_one_name_for_the_model_and_one_for_the_images():
    seen_model, seen_images = set(), set()
    for name, fn in _public_functions():
        params = list(inspect.signature(fn).parameters)
        assert not OLD_NAMES & set(params), (name, params)
        seen_model |= {p for p in params if p == "model"}
        seen_images |= {p for p in params if p == "images"}
    assert seen_model == {"model"} and seen_images == {"images"}
    # the techniques and metrics: (model, images, ...) in that order; explain: images first
    for fn in (convlens.activations, convlens.grad_cam, convlens.occlusion, convlens.deletion, convlens.insertion,
               convlens.deletion_insertion, convlens.sanity_check, convlens.class_sensitivity, convlens.compare,
               convlens.layer_table, convlens.default_cam_layer, convlens.serve):
        assert list(inspect.signature(fn).parameters)[:2] == ["model", "images"], fn.__name__
    assert list(inspect.signature(convlens.explain).parameters)[:2] == ["images", "model"]


def test_layers_take_a_classifier_as_its_module(clf):
    assert convlens.resolve_layer(clf, "2") == convlens.resolve_layer(clf.model, "2") == ("2", clf.model[2])
    assert convlens.resolve_layers(clf, "?") == convlens.resolve_layers(clf.model, "?")
    assert len(convlens.resolve_layers(clf, "?")) == 7


def test_every_technique_takes_the_same_kinds_of_images(clf):
    """A tensor, a path, a PIL image, an array and a list of them: one resolver, the same maps."""
    arr = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    kinds = {"tensor": clf.preprocess(pil), "pil": pil, "array": arr, "bytes": buf.getvalue(), "list": [pil]}
    calls = {
        "grad_cam": lambda im: convlens.grad_cam(clf, im, target=1).maps,
        "occlusion": lambda im: convlens.occlusion(clf, im, target=1, patch=8, stride=8).maps,
        "activations": lambda im: convlens.activations(clf, im, ["2"]).maps["2"],
        "deletion": lambda im: convlens.deletion(clf, im, MAP, target=1, steps=2).scores,
        "layer_table": lambda im: torch.tensor([r.shape[1] for r in convlens.layer_table(clf, im) if r.shape]),
    }
    for name, call in calls.items():
        ref = call(kinds["tensor"])
        for kind, im in kinds.items():
            assert torch.equal(call(im), ref), (name, kind)


def test_the_decorator_warns_names_the_new_keyword_and_refuses_both():
    @renamed(old="new", flat=("options", lambda v: {"m": v}))
    def f(new=None, options=None):
        return new, options

    with pytest.warns(DeprecationWarning, match=r"f\(\): old= is deprecated .* use new="):
        assert f(old=3) == (3, None)
    with pytest.warns(DeprecationWarning, match="use options="):
        assert f(flat={"k": 1}) == (None, {"m": {"k": 1}})
    with pytest.raises(TypeError, match="both old= and new="):
        f(old=1, new=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(new=4) == (4, None)  # the new name: no warning
    assert inspect.signature(f).parameters.keys() == {"new", "options"}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(p, q) for p, q in zip(a, b))
    return a == b


def _cases(clf, x):
    """(name, call with keywords, new keywords, {old: new}) for every renamed keyword."""
    m = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(2))
    mi = {"model_or_classifier": "model", "x": "images"}
    return [
        ("activations", lambda **k: convlens.activations(layers=["2"], **k).maps, {"model": clf, "images": x}, mi),
        ("grad_cam", lambda **k: convlens.grad_cam(target=1, **k).maps, {"model": clf, "images": x}, mi),
        ("occlusion", lambda **k: convlens.occlusion(target=1, patch=8, stride=8, **k).maps,
         {"model": clf, "images": x}, mi),
        ("deletion", lambda **k: convlens.deletion(saliency=m, target=1, steps=2, baseline="blur", **k).scores,
         {"model": clf, "images": x, "blur_sigma": 2.0}, {**mi, "sigma": "blur_sigma"}),
        ("insertion", lambda **k: convlens.insertion(saliency=m, target=1, steps=2, baseline="blur", **k).scores,
         {"model": clf, "images": x, "blur_sigma": 2.0}, {**mi, "sigma": "blur_sigma"}),
        ("deletion_insertion",
         lambda **k: convlens.deletion_insertion(maps={"m": m}, target=1, steps=2, **k)["m"][0].scores,
         {"model": clf, "images": x, "blur_sigma": 2.0}, {**mi, "sigma": "blur_sigma"}),
        ("sanity_check", lambda **k: convlens.sanity_check(target=1, draws=1, **k).spearman,
         {"model": clf, "images": x}, mi),
        ("class_sensitivity", lambda **k: convlens.class_sensitivity(target=1, other=0, **k).spearman,
         {"model": clf, "images": x}, mi),
        ("compare", lambda **k: [r.insertion.auc for r in convlens.compare(
            methods=["gradcam", "occlusion"], target=1, steps=2, sanity=False, references=(), **k).rows],
         {"model": clf, "images": x, "options": {"occlusion": {"patch": 8, "stride": 8}}},
         {**mi, "occlusion": "options"}),
        ("feature_visualization", lambda **k: convlens.feature_visualization(
            layer="2", channels=[0], steps=2, size=16, transforms=(), **k).images,
         {"model": clf}, {"classifier_or_model": "model"}),
        ("layer_table", lambda **k: [r.shape for r in convlens.layer_table(**k)], {"model": clf, "images": x},
         {"x": "images"}),
        ("default_cam_layer", lambda **k: convlens.default_cam_layer(**k), {"model": clf, "images": x},
         {"x": "images"}),
        ("Classifier.predict", lambda **k: [[p.index for p in r] for r in clf.predict(**k)], {"images": x},
         {"x": "images"}),
        ("Classifier.batch", lambda **k: clf.batch(**k), {"images": x}, {"x": "images"}),
        ("Classifier.logits", lambda **k: clf.logits(**k), {"images": x}, {"x": "images"}),
        ("Classifier.outputs", lambda **k: clf.outputs(**k), {"images": x}, {"x": "images"}),
        ("load_image", lambda **k: np.asarray(convlens.load_image(**k)), {"image": convlens.sample_image_path()},
         {"source": "image"}),
        ("explain", lambda **k: convlens.explain(cache=False, **k).images[0].results["gradcam"].maps,
         {"images": x, "model": clf, "techniques": ["gradcam"], "options": {"gradcam": {"method": "layercam"}}},
         {"image_or_images": "images", "classifier": "model", "methods": "techniques", "settings": "options"}),
    ]


def _old(new_kwargs: dict, old: str, new: str) -> dict:
    value = new_kwargs[new]
    if old == "occlusion":  # the old spelling held occlusion's settings alone
        value = value["occlusion"]
    return {**{k: v for k, v in new_kwargs.items() if k != new}, old: value}


def test_every_old_keyword_warns_and_gives_the_same_result(clf, x):
    for name, call, kwargs, renames in _cases(clf, x):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # the new names never warn
            ref = call(**kwargs)
        for old, new in renames.items():
            with pytest.warns(DeprecationWarning, match=rf"{old}= is deprecated.*use {new}=") as rec:
                got = call(**_old(kwargs, old, new))
            assert _equal(got, ref), (name, old)
            assert any(w.filename == __file__ for w in rec), (name, old)  # points at the caller


def test_serve_and_explain_on_ray_take_the_old_names(clf, x):
    from convlens.parallel import explain_on_ray

    pytest.importorskip("starlette")
    with pytest.warns(DeprecationWarning, match="classifier= is deprecated.*use model="):
        srv = convlens.serve(classifier=clf, images=[x[0]], block=False, port=0)
    srv.stop()
    pytest.importorskip("ray")
    import ray

    if ray.is_initialized():
        pytest.skip("ray is running")
    for kwargs in ({"sources": "in"}, {"images": "in", "make_classifier": tiny}):
        with pytest.warns(DeprecationWarning, match="is deprecated"), pytest.raises(RuntimeError, match="ray.init"):
            explain_on_ray(out="o", shards=2, **kwargs)


def test_per_method_options_are_keyed_by_method_and_the_flat_form_warns(clf, x):
    keyed = convlens.class_sensitivity(clf, x, "occlusion", target=1, other=0, options={"occlusion": {"patch": 8}})
    with pytest.warns(DeprecationWarning, match="key it by the method"):
        flat = convlens.class_sensitivity(clf, x, "occlusion", target=1, other=0, options={"patch": 8})
    assert torch.equal(keyed.spearman, flat.spearman) and keyed.settings["options"] == {"patch": 8}
    other = convlens.class_sensitivity(clf, x, "occlusion", target=1, other=0, options={"occlusion": {"patch": 4}})
    assert not torch.equal(other.maps, keyed.maps)  # the options arrived
    assert method_options("gradcam", {"occlusion": {"patch": 8}}) == {}  # another method's options
    with pytest.raises(ValueError, match="keyed by method"):
        convlens.compare(clf, x, ["gradcam"], options={"patch": 8}, sanity=False, references=())


def test_the_blur_sigma_is_stated_and_set_the_same_way_in_occlusion_and_deletion(clf, x):
    xb = clf.batch(x)
    for sigma, expected in ((None, 8 / 4), (3.0, 3.0)):  # occlusion's default: max(patch) / 4
        occ = convlens.occlusion(clf, x, target=1, patch=8, stride=8, baseline="blur", blur_sigma=sigma)
        by_hand = convlens.occlusion(clf, x, target=1, patch=8, stride=8, baseline=gaussian_blur(xb, expected))
        assert torch.equal(occ.maps, by_hand.maps) and occ.settings["blur_sigma"] == expected
    m = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    for sigma, expected in ((None, 16 / 22.4), (3.0, 3.0)):  # deletion's default: max(H, W) / 22.4
        d = convlens.deletion(clf, x, m, target=1, steps=4, baseline="blur", blur_sigma=sigma)
        by_hand = convlens.deletion(clf, x, m, target=1, steps=4, baseline=gaussian_blur(xb, expected))
        assert torch.allclose(d.scores, by_hand.scores) and d.settings["blur_sigma"] == pytest.approx(expected)
    for bad in (0, -1.0, float("nan"), "wide"):
        with pytest.raises(ValueError, match="blur_sigma must be a positive number"):
            convlens.occlusion(clf, x, target=1, patch=8, stride=8, baseline="blur", blur_sigma=bad)


def test_cli_old_flags_keep_working_with_a_note(tmp_path, capsys, monkeypatch):
    from convlens import cli

    monkeypatch.setattr(cli, "load_classifier", lambda args: convlens.as_classifier(tiny()))
    img = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(img)
    base = ["activations", str(img), "--layers", "2"]
    assert main([*base, "--per-layer", "2", "--pick", "first", "--out", str(tmp_path / "new")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main([*base, "-k", "2", "--channels", "first", "--out", str(tmp_path / "old")]) == 0
    err = capsys.readouterr().err
    assert "-k is deprecated" in err and "use --per-layer" in err and "use --pick first" in err
    _same_files(tmp_path / "new", tmp_path / "old")
    for flags in (["--techniques", "gradcam"], ["--methods", "gradcam"]):
        out = tmp_path / flags[0].strip("-")
        assert main(["explain", str(img), *flags, "--fast", "--no-cache", "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert ("--methods is deprecated" in err and "use --techniques" in err) == (flags[0] == "--methods")
    _same_files(tmp_path / "techniques", tmp_path / "methods", "*.npy")
    assert {p.stem for p in (tmp_path / "methods").rglob("*.npy")} == {"gradcam"}  # the one technique asked for


def _same_files(a, b, pattern="*.[np][pn][gy]"):
    names = sorted(p.relative_to(a) for p in a.rglob(pattern) if p.is_file())
    assert names and names == sorted(p.relative_to(b) for p in b.rglob(pattern) if p.is_file())
    for p in names:
        if p.suffix == ".npy":
            assert np.array_equal(np.load(a / p), np.load(b / p)), p
        else:
            assert (a / p).read_bytes() == (b / p).read_bytes(), p


def test_warnings_from_inside_a_technique_still_point_at_the_caller():
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(-1.0)  # the ReLU's output is 0 everywhere: every map is constant
    x = torch.rand(1, 3, 8, 8)
    for call in (lambda: convlens.activations(net, x, ["1"]), lambda: convlens.grad_cam(net, x, layer="1"),
                 lambda: convlens.occlusion(net, x, patch=4, stride=4)):
        with pytest.warns(RuntimeWarning, match="constant") as rec:
            call()
        assert {w.filename for w in rec if "constant" in str(w.message)} == {__file__}


def test_cli_blur_sigma(tmp_path, capsys, monkeypatch):
    from convlens import cli

    net = convlens.as_classifier(tiny())
    monkeypatch.setattr(cli, "load_classifier", lambda args: net)
    img = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(img)
    args = ["occlusion", str(img), "--patch", "8", "--stride", "8", "--baseline", "blur", "--target", "1"]
    assert main([*args, "--blur-sigma", "3", "--out", str(tmp_path / "o")]) == 0
    saved = [np.load(p) for p in (tmp_path / "o").rglob("*.npy")]
    api = convlens.occlusion(net, net.preprocess(img), target=1, patch=8, stride=8, baseline="blur", blur_sigma=3.0)
    assert any(a.shape == api.maps[0].shape and np.allclose(a, api.maps[0].numpy()) for a in saved)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main([*args, "--blur-sigma", "0", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()
    assert "--blur-sigma is a positive number" in capsys.readouterr().err
