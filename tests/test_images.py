"""Every image mode becomes the right RGB; every bad file gives an ImageError a person understands."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import convlens
from convlens import ImageError, load_image


def rgb(img: Image.Image) -> np.ndarray:
    out = load_image(img)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_modes_become_rgb_with_the_right_values():
    assert rgb(Image.new("L", (2, 2), 77))[0, 0].tolist() == [77, 77, 77]
    assert rgb(Image.new("1", (2, 2), 1))[0, 0].tolist() == [255, 255, 255]
    assert rgb(Image.new("CMYK", (2, 2), (0, 255, 0, 0)))[0, 0].tolist() == [255, 0, 255]
    # transparency is composited on white: half-transparent black -> mid grey
    assert rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))[0, 0].tolist() == [127, 127, 127]
    assert rgb(Image.new("LA", (2, 2), (0, 0)))[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert rgb(pal)[0, 0].tolist() == [10, 20, 30]
    pal.info["transparency"] = 1
    assert rgb(pal)[0, 0].tolist() == [255, 255, 255]
    # 16-bit greyscale is scaled, not clipped to white
    sixteen = Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16))
    assert sixteen.mode.startswith("I")
    assert rgb(sixteen)[0, 0].tolist() == [128, 128, 128]
    assert rgb(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)))[0, 0].tolist() == [128, 128, 128]


def test_png_16bit_file_round_trip(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16)).save(path)
    assert np.asarray(load_image(path)).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=100)
    out = load_image(path)
    assert out.size == (20, 40)
    assert np.asarray(out)[3, 16].tolist()[2] > 200  # the blue corner moved to the top right
    assert np.asarray(out)[3, 3].tolist()[0] > 200


def test_sources_path_bytes_file_and_arrays(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(path)
    for source in (path, str(path), path.read_bytes(), open(path, "rb")):  # noqa: SIM115
        assert np.asarray(load_image(source))[0, 0].tolist() == [1, 2, 3]
    hwc = np.zeros((4, 5, 3), np.uint8)
    hwc[..., 1] = 9
    assert np.asarray(load_image(hwc))[1, 2].tolist() == [0, 9, 0]
    chw = np.moveaxis(hwc, -1, 0)
    assert load_image(chw).size == (5, 4)
    assert np.asarray(load_image(np.ones((2, 2), np.float64)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(np.full((2, 2), 65535, np.uint16)))[0, 0, 0] == 255
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(np.full((2, 2), 3.0))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((2, 2), np.nan))
    with pytest.raises(ImageError, match="must be"):
        load_image(np.zeros((2, 2, 5), np.uint8))


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:700]


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[:2000]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"hello, I am a text file\n", "not an image"),
        (_truncated_jpeg(), "truncated or corrupt"),
        (_truncated_png(), "truncated or corrupt"),
    ],
)
def test_bad_files_raise_image_error(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_url_says_to_download_it_first(tmp_path):
    with pytest.raises(ImageError, match="a URL, not a file; download the image"):
        load_image("https://example.com/cat.jpg")
    (tmp_path / "http:").mkdir()
    (tmp_path / "http:" / "x.png").write_bytes(b"")  # a local path that only looks like one is read as a file
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "http:" / "x.png")


def test_folder_and_wrong_type():
    with pytest.raises(ImageError, match="folder"):
        load_image(".")
    with pytest.raises(ImageError, match="cannot read an image from int"):
        load_image(3)  # type: ignore[arg-type]


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (12_000, 9_000)).save(path, optimize=True)  # 108 Mpx in a few kB
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match="too large|Mpx"):
        load_image(path)


def test_sample_image_is_bundled_and_offline():
    img = convlens.sample_image()
    assert img.mode == "RGB" and img.size == (451, 300)
    assert convlens.sample_image_path().name == "chelsea.jpg"
