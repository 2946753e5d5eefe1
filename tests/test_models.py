"""Loading models: the offline default, local checkpoints, safety, preprocessing numbers."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skimage_data  # a test dependency
import torch
import torchvision
from PIL import Image

import convlens
from convlens.models import ModelError, read_state_dict


@pytest.mark.parametrize(
    ("name", "label", "probability"),
    [("chelsea", "Egyptian cat", 0.773), ("coffee", "espresso", 0.902), ("grace_hopper", "military uniform", 0.465)],
)
def test_default_model_top1_on_photos(clf, name, label, probability):
    if name == "grace_hopper":
        from matplotlib import cbook

        image = Image.open(cbook.get_sample_data("grace_hopper.jpg"))
    else:
        image = getattr(skimage_data, name)()
    top = clf.predict(clf.preprocess(image), top=5)[0]
    assert top[0].label == label
    assert top[0].probability == pytest.approx(probability, abs=0.01)
    assert [p.probability for p in top] == sorted((p.probability for p in top), reverse=True)
    assert top[0].index == clf.labels.index(label)


def test_default_model_metadata(clf):
    assert clf.name == "efficientnet_lite0"
    assert clf.mean == (0.5, 0.5, 0.5) and clf.std == (0.5, 0.5, 0.5)
    assert clf.size == 224 and clf.interpolation == "bicubic"
    assert len(clf.labels) == 1000 and clf.labels[285] == "Egyptian cat"
    assert sum(p.numel() for p in clf.model.parameters()) == 4_652_008
    assert not clf.model.training and clf.device == torch.device("cpu")


def test_preprocess_numbers(clf):
    white = Image.new("RGB", (50, 80), (255, 0, 128))
    x = clf.preprocess(white)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    # (H, W) kept in that order with the aspect-preserving mode; never swapped
    wide = convlens.Classifier(clf.model, mean=clf.mean, std=clf.std, size=100, resize="shorter")
    assert wide.preprocess(Image.new("RGB", (300, 150))).shape == (1, 3, 100, 200)
    native = convlens.Classifier(clf.model, mean=(0, 0, 0), std=(1, 1, 1), size=None)
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    torch.testing.assert_close(native.preprocess(arr)[0], torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    # a batch: every image at the same size, in order
    batch = clf.preprocess([white, Image.new("RGB", (10, 10))])
    assert batch.shape == (2, 3, 224, 224) and batch[1].max() == -1.0


def test_class_index_names_and_errors(clf):
    assert clf.class_index("Egyptian cat") == 285 == clf.class_index("egyptian CAT") == clf.class_index("285")
    with pytest.raises(ValueError, match="did you mean 'tabby'"):
        clf.class_index("tabbby")
    with pytest.raises(ValueError, match="out of range"):
        clf.class_index(1000)
    # exact names first; a name that fits several classes only case-insensitively is refused, not guessed
    assert clf.class_index("cardigan") == 474 and clf.class_index("Cardigan") == 264
    with pytest.raises(ValueError, match=r"'CARDIGAN' is ambiguous \(264 'Cardigan', 474 'cardigan'\); give the index"):
        clf.class_index("CARDIGAN")
    twice = convlens.Classifier(torch.nn.Identity(), mean=(0,) * 3, std=(1,) * 3, labels=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"'a' is ambiguous \(0 'a', 2 'a'\)"):
        twice.class_index("a")


def test_local_checkpoint_pth_and_safetensors_round_trip(clf, sample_x, tmp_path):
    from safetensors.torch import save_file

    sd = clf.model.state_dict()
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    expected = clf.logits(sample_x)
    for f in ("w.pth", "w.safetensors"):
        other = convlens.load_model(weights=tmp_path / f, device="cpu")
        torch.testing.assert_close(other.logits(sample_x), expected, rtol=0, atol=0)


def test_torchvision_and_timm_names_with_local_weights(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18().eval()
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, tmp_path / "r18.pt")
    clf = convlens.load_model("resnet18", weights=tmp_path / "r18.pt", device="cpu")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(clf.logits(x), ref(x), rtol=0, atol=0)
    assert clf.mean == (0.485, 0.456, 0.406) and clf.labels[0] == "tench"

    import timm

    tref = timm.create_model("resnet10t", pretrained=False).eval()
    torch.save(tref.state_dict(), tmp_path / "t.pth")
    tclf = convlens.load_model("timm:resnet10t", weights=tmp_path / "t.pth", device="cpu")
    torch.testing.assert_close(tclf.logits(x), tref(x), rtol=0, atol=0)
    with pytest.raises(ModelError, match="does not fit"):
        convlens.load_model("resnet34", weights=tmp_path / "r18.pt", device="cpu")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CONVLENS_PWNED']}",))


def test_malicious_checkpoint_does_not_execute(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CONVLENS_PWNED", str(marker))
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Evil()}, evil)
    with pytest.raises(ModelError, match="cannot read weights .*pickled code or objects, which are never run"):
        convlens.load_model("resnet18", weights=evil, device="cpu")
    raw = tmp_path / "raw.pkl.pth"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ModelError):
        read_state_dict(raw)
    assert not marker.exists()


def test_missing_and_corrupt_weights_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        convlens.load_model(weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not really")
    with pytest.raises(ModelError, match="cannot read weights"):
        convlens.load_model(weights=bad)


def test_uncached_weights_without_network_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError) as info:
        convlens.load_model("resnet18", device="cpu")
    msg = str(info.value)
    assert "not cached" in msg and str(Path(tmp_path)) in msg and "--weights" in msg


def test_unknown_names_and_devices():
    with pytest.raises(ModelError, match="did you mean resnet50"):
        convlens.load_model("resnet5O")
    with pytest.raises(ModelError, match="timm has no model"):
        convlens.load_model("timm:not_a_model_xyz")
    with pytest.raises(ModelError, match="device"):
        convlens.load_model(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA"):
            convlens.load_model(device="cuda")


def test_classifier_wraps_any_module_and_predict_sorts():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    net(torch.zeros(1, 3 * 4 * 4))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([0.0, 2.0, 1.0, -1.0]))
    clf = convlens.Classifier(net, mean=(0, 0, 0), std=(1, 1, 1), size=None, labels=list("abcd"))
    preds = clf.predict(torch.zeros(1, 3, 4, 4), top=3)[0]
    assert [p.label for p in preds] == ["b", "c", "a"]
    e = np.exp([0.0, 2.0, 1.0, -1.0])
    assert preds[0].probability == pytest.approx(e[1] / e.sum(), rel=1e-6)
    assert convlens.as_classifier(net).model is net
    with pytest.raises(ValueError, match="expected a"):
        clf.batch(torch.zeros(3, 4))


@pytest.mark.parametrize(
    ("mean", "std"), [(0.5, 0.5), ((0.5, 0.5), (0.5, 0.5)), ((0.5,) * 3, (0.5, 0.0, 0.5)), ("abc", "abc")]
)
def test_classifier_bad_mean_std_is_a_clear_value_error(mean, std):
    """A bare number (mean=0.5, as for a grayscale model) was a TypeError from len()."""
    with pytest.raises(ValueError, match=r"need three values each \(RGB\), e\.g\. mean=\(0\.5, 0\.5, 0\.5\)"):
        convlens.Classifier(torch.nn.Identity(), mean=mean, std=std)


def test_an_integer_tensor_is_read_as_pixels_not_as_a_normalised_batch():
    """torchvision.io.read_image gives uint8 (C, H, W): it was passed to the model as if normalised."""
    from conftest import tiny_classifier

    clf = tiny_classifier()
    img = convlens.sample_image()
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # what read_image returns
    expected = clf.preprocess(img)
    torch.testing.assert_close(clf.batch(pixels), expected)
    torch.testing.assert_close(clf.batch(torch.stack([pixels, pixels])), torch.cat([expected, expected]))
    torch.testing.assert_close(convlens.grad_cam(clf, pixels).maps, convlens.grad_cam(clf, img).maps)
    with pytest.raises(convlens.ImageError, match=r"\[0, 255\]"):
        clf.batch(torch.full((3, 8, 8), 300))
