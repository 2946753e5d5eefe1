"""Short reprs and notebook pictures of results (convlens.display), checked by value."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import convlens
from convlens.display import PNG_SIGNATURE, WIDTH, caption, figure_png, rich_display, short, summary_lines
from convlens.plotting import ResultFigure


def _png(data: bytes) -> np.ndarray:
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def _check_repr(text: str) -> list[str]:
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and all(len(line) <= WIDTH for line in lines), text
    assert "tensor(" not in text and "array(" not in text
    return lines


@pytest.fixture(scope="module")
def cam(clf, sample_x):
    return convlens.grad_cam(clf, sample_x)


def test_short_values() -> None:
    assert short(torch.zeros(3, 7, 7)) == "(3, 7, 7)"
    assert short(np.zeros((2, 5))) == "(2, 5)"
    assert short(list(range(20))) == "[0, 1, 2, … (20)]"
    assert short((56, 56)) == "(56, 56)"
    assert short(0.123456) == "0.1235" and short(True) == "True" and short(None) == "None"
    assert short("/opt/venv/lib/site-packages/pkg/weights.pth") == "weights.pth"
    assert short(Path("/somewhere/else/model.safetensors")) == "model.safetensors"
    assert short("relative/name.jpg") == "relative/name.jpg"
    assert short({"a": 1, "b": 2, "c": 3, "d": 4}) == "{a=1, b=2, c=3, …}"


def test_saliency_repr_and_png(cam) -> None:
    head, shapes, settings = _check_repr(repr(cam))
    assert head == f"Saliency: gradcam at {cam.layer} for Egyptian cat [285]"
    assert shapes == "maps (1, 224, 224), raw (1, 7, 7); float32 on cpu"
    assert settings.startswith("settings: ") and "layer_shape=(1280, 7, 7)" in settings
    assert str(cam) == repr(cam)
    with_caption = _png(cam._repr_png_())
    without = _png(figure_png(cam.plot(index=0)))
    # the same figure, plus one caption line underneath: same width class, a little taller
    assert 600 <= with_caption.shape[1] <= 1400 and with_caption.shape[0] > without.shape[0] >= 250
    assert with_caption.std() > 20
    assert caption(cam) == f"gradcam · {cam.layer} · Egyptian cat [285] · image_index=[0], layer_shape=(1280, 7, 7)"


def test_several_rows_are_summarised_not_listed(clf, sample_x) -> None:
    cam = convlens.grad_cam(clf, sample_x, top=5)
    head = _check_repr(repr(cam))[0]
    labels = [f"{lab} [{i}]" for lab, i in zip(cam.labels, cam.target)]
    assert head.endswith(f"for {', '.join(labels[:3])}, … (5 rows)")
    assert cam._display_caption().endswith("showing row 0 of 5: .plot(index=i) for the others")


def test_occlusion_caption_keeps_the_knobs(clf, sample_x) -> None:
    occ = convlens.occlusion(clf, sample_x, patch=112, stride=112)
    assert _check_repr(repr(occ))[0] == "Saliency: occlusion for Egyptian cat [285]"
    text = caption(occ)
    assert "patch=(112, 112), stride=(112, 112)" in text and "starts" not in text


def test_activations_repr_and_png(clf, sample_x) -> None:
    acts = convlens.activations(clf, sample_x, ["blocks.0", "blocks.6"])
    head, shapes, _ = _check_repr(repr(acts))
    assert head == "Activations: 2 layers for 1 image"
    assert shapes == "maps (C, h, w): blocks.0 (16, 112, 112), blocks.6 (320, 7, 7)"
    img = _png(acts._repr_png_())
    assert img.shape[1] >= 400 and img.std() > 20


def test_feature_images_repr_and_png(clf) -> None:
    fv = convlens.feature_visualization(clf, "blocks.2", [0, 5], steps=4, size=48)
    head, body, settings = _check_repr(repr(fv))
    assert head == "FeatureImages: channel objective at blocks.2, units [0, 5]"
    assert body.startswith("images (2, 3, 48, 48) float32 on cpu; objective ")
    assert body.endswith(", ".join(f"{float(v):.3g}" for v in fv.objective))
    assert "steps=4" in settings and "size=48" in settings
    assert fv._display_caption().startswith("channel objective at blocks.2 · 4 steps, size 48")
    assert _png(fv._repr_png_()).shape[1] >= 200


def test_plot_returns_a_figure_that_shows_itself(cam) -> None:
    fig = cam.plot(index=0)
    assert isinstance(fig, ResultFigure) and isinstance(fig, Figure)
    img = _png(fig._repr_png_())
    assert img.shape[1] >= 600 and img.std() > 20
    assert fig.canvas.manager is None  # not a pyplot figure: nothing global keeps or re-shows it


def test_report_repr_names_the_weights_file_only(clf) -> None:
    report = convlens.explain(convlens.sample_image_path(), clf, fast=True, techniques=("gradcam",))
    assert report.weights and Path(report.weights).is_absolute()
    folder = str(Path(report.weights).parent)
    lines = _check_repr(repr(report))
    assert lines[0] == f"Report: efficientnet_lite0 ({Path(report.weights).name}) on cpu; gradcam, fast"
    assert lines[1] == "1 image: chelsea.jpg: Egyptian cat [285]"
    assert lines[2].startswith("no errors; ")
    assert folder not in repr(report) and folder not in report._repr_html_()
    assert not hasattr(report, "_repr_png_")  # the report shows itself as HTML
    im_lines = _check_repr(repr(report.images[0]))
    assert im_lines[0] == "ImageExplanation: chelsea.jpg 451x300 px, target Egyptian cat [285] (top-1 Egyptian cat "\
        f"{100 * report.images[0].predictions[0].probability:.1f}%)"


# -- what another result class gets from one line ------------------------------------------------
@rich_display
@dataclass(frozen=True, eq=False)
class _Curve:
    scores: torch.Tensor
    method: str
    layer: str | None
    target: list[int]
    labels: list[str] = field(default_factory=list)
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)
    auc: float = 0.0
    hidden: torch.Tensor | None = field(default=None, repr=False)
    settings: dict = field(default_factory=dict)

    def plot(self) -> Figure:
        fig = ResultFigure(figsize=(5, 3))
        fig.subplots().plot(self.scores[0].numpy())
        return fig


@rich_display
@dataclass
class _HtmlOnly:
    table: torch.Tensor

    def plot(self) -> Figure:
        return ResultFigure()

    def _repr_html_(self) -> str:
        return "<table></table>"


def test_rich_display_on_a_new_result_class() -> None:
    curve = _Curve(
        scores=torch.linspace(1, 0, 50).repeat(2, 1),
        method="deletion",
        layer="blocks.6",
        target=[285, 281],
        labels=["Egyptian cat", "tabby"],
        per_layer={f"l{i}": torch.zeros(2, 4) for i in range(3)},
        auc=0.123456,
        hidden=torch.zeros(1000),
        settings={"steps": 50, "weights": "/usr/lib/python3/site-packages/x/w.pth"},
    )
    lines = _check_repr(repr(curve))
    assert lines == [
        "_Curve: deletion at blocks.6 for Egyptian cat [285], tabby [281]",
        "scores (2, 50), per_layer: 3 × [l0 (2, 4), l1 (2, 4), …]; float32 on cpu",
        "auc=0.1235; settings: steps=50, weights=w.pth",
    ]
    assert summary_lines(curve) == lines
    assert _png(curve._repr_png_()).shape[1] >= 300
    assert "_repr_png_" not in vars(_HtmlOnly)  # its own HTML is its picture
    assert _check_repr(repr(_HtmlOnly(torch.zeros(3, 3)))) == ["_HtmlOnly", "table (3, 3); float32 on cpu"]
    # the device is the tensors' own (meta tensors stand in for a GPU here)
    assert repr(_HtmlOnly(torch.zeros(3, 3, dtype=torch.float16, device="meta"))).endswith("float16 on meta")


def test_metric_results_show_themselves(clf, sample_x, cam) -> None:
    """Deletion curves, class sensitivity and the sanity check: a short repr and a picture."""
    results = [
        convlens.deletion(clf, sample_x, cam, steps=4),
        convlens.class_sensitivity(clf, sample_x),
        convlens.sanity_check(clf, sample_x, stages=["classifier"]),
    ]
    for r in results:
        lines = _check_repr(repr(r))
        assert lines[0].startswith(type(r).__name__)
        pixels = _png(r._repr_png_())
        assert pixels.shape[0] >= 150 and pixels.shape[1] >= 300 and pixels.std() > 10
