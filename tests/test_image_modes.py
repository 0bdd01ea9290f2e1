"""ImageSet.load turns every PIL mode into 8-bit RGB by the documented rule (ptcl.data.base).

Each test writes a small image with PIL into tmp_path (or builds one in memory where no
file format stores the mode) and checks the exact pixel values that come back.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptcl.data.base import ImageSet
from ptcl.errors import DataError


def load_file(path: Path) -> np.ndarray:
    """The RGB array ``ImageSet.load`` returns for one image file."""
    img = ImageSet([str(path)], np.zeros(1), ["x"], "fp").load(0)
    assert img.mode == "RGB"
    return np.asarray(img)


def load_array(a: np.ndarray) -> np.ndarray:
    """The RGB array ``ImageSet.load`` returns for one in-memory sample."""
    img = ImageSet(a[None], np.zeros(1), ["x"], "fp").load(0)
    assert img.mode == "RGB"
    return np.asarray(img)


def convert(img: Image.Image) -> np.ndarray:
    from ptcl.data.base import to_rgb  # imported here so the file tests run on any version

    out = to_rgb(img, "mem.png")
    assert out.mode == "RGB"
    return np.asarray(out)


def grey(v: np.ndarray) -> np.ndarray:
    """(H, W) levels as the (H, W, 3) RGB array of a grey image."""
    return np.repeat(np.asarray(v, dtype=np.uint8)[..., None], 3, axis=2)


def on_white(rgb: list[int], a: int) -> list[int]:
    """The documented compositing rule, computed in exact rational arithmetic."""
    return [int(np.floor((c * a + 255 * (255 - a)) / 255 + 0.5)) for c in rgb]


# 16-bit values whose /257 lies just below or above .5, and both ends.
V16 = np.array([[0, 128, 129, 385, 386, 32896, 65407, 65535]], dtype=np.uint16)
E16 = np.array([[0, 0, 1, 1, 2, 128, 255, 255]], dtype=np.uint8)  # round(v / 257)


# --------------------------------------------------------------------------- 16/32-bit grey


def test_issue_16bit_png_gradient_is_not_white(tmp_path: Path) -> None:
    grad = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    Image.fromarray(grad).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    out = load_file(tmp_path / "g16.png")
    np.testing.assert_array_equal(out, grey(np.arange(256).reshape(16, 16)))
    assert (out == 255).mean() < 0.01  # was 99.6% white


def test_16bit_png_rounds_value_over_257(tmp_path: Path) -> None:
    Image.fromarray(V16).save(tmp_path / "v.png")
    np.testing.assert_array_equal(load_file(tmp_path / "v.png"), grey(E16))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16bit_tiff_modes(tmp_path: Path, mode: str) -> None:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    Image.frombytes(mode, V16.shape[::-1], V16.astype(dtype).tobytes()).save(tmp_path / "v.tif")
    np.testing.assert_array_equal(load_file(tmp_path / "v.tif"), grey(E16))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_16bit_modes_in_memory(mode: str) -> None:
    dtype = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
    img = Image.frombytes(mode, V16.shape[::-1], V16.astype(dtype).tobytes())
    assert img.mode == mode
    np.testing.assert_array_equal(convert(img), grey(E16))


def test_16bit_array_samples() -> None:
    np.testing.assert_array_equal(load_array(V16), grey(E16))
    np.testing.assert_array_equal(load_array(V16.astype(">u2")), grey(E16))  # I;16B


def test_32bit_int_read_as_16bit(tmp_path: Path) -> None:
    """Mode I: how older Pillow opens a 16-bit PNG; its 0..65535 values map like I;16."""
    Image.fromarray(V16.astype(np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(load_file(tmp_path / "i.tif"), grey(E16))
    np.testing.assert_array_equal(load_array(V16.astype(np.int32)), grey(E16))


@pytest.mark.parametrize("bad", [-1, 65536, 2**31 - 1])
def test_32bit_int_out_of_range_rejected(tmp_path: Path, bad: int) -> None:
    Image.fromarray(np.array([[0, bad]], dtype=np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(DataError, match=r"mode I .*outside 0\.\.65535") as ei:
        load_file(tmp_path / "i.tif")
    assert str(tmp_path / "i.tif") in str(ei.value) and "\n" not in str(ei.value)


def test_float_unit_range_scaled(tmp_path: Path) -> None:
    f = np.array([[0.0, 0.1, 0.5001, 0.998, 1.0]], dtype=np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    expect = grey([[0, 26, 128, 254, 255]])  # round(255 * v)
    np.testing.assert_array_equal(load_file(tmp_path / "f.tif"), expect)
    np.testing.assert_array_equal(load_array(f), expect)


def test_float_byte_range_kept(tmp_path: Path) -> None:
    f = np.array([[0.0, 1.4, 1.6, 100.2, 254.7, 255.0]], dtype=np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_file(tmp_path / "f.tif"), grey([[0, 1, 2, 100, 255, 255]]))


@pytest.mark.parametrize("bad", [-0.5, 255.5, 1e6, float("nan"), float("inf")])
def test_float_out_of_range_rejected(tmp_path: Path, bad: float) -> None:
    Image.fromarray(np.array([[0.0, 0.5, bad]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match="mode F") as ei:
        load_file(tmp_path / "f.tif")
    assert str(tmp_path / "f.tif") in str(ei.value) and "\n" not in str(ei.value)


# --------------------------------------------------------------------------- transparency


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    px = [(200, 100, 50, 255), (200, 100, 50, 128), (0, 0, 0, 0), (10, 20, 30, 1)]
    Image.frombytes("RGBA", (4, 1), bytes(c for p in px for c in p)).save(tmp_path / "a.png")
    expect = [[on_white(list(p[:3]), p[3]) for p in px]]
    assert expect[0][:3] == [[200, 100, 50], [227, 177, 152], [255, 255, 255]]
    np.testing.assert_array_equal(load_file(tmp_path / "a.png"), np.array(expect, np.uint8))
    rgba = np.array([px], dtype=np.uint8)
    np.testing.assert_array_equal(load_array(rgba), np.array(expect, np.uint8))  # (H, W, 4)


def test_la_composited_on_white(tmp_path: Path) -> None:
    px = [(30, 255), (30, 100), (30, 0)]
    Image.frombytes("LA", (3, 1), bytes(c for p in px for c in p)).save(tmp_path / "la.png")
    expect = [[on_white([30] * 3, a) for _, a in px]]
    np.testing.assert_array_equal(load_file(tmp_path / "la.png"), np.array(expect, np.uint8))


PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255]


def _p_image() -> Image.Image:
    p = Image.new("P", (3, 1))
    p.putpalette(PALETTE)
    p.putdata([0, 1, 2])
    return p


def test_palette_without_transparency(tmp_path: Path) -> None:
    _p_image().save(tmp_path / "p.png")
    expect = [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    np.testing.assert_array_equal(load_file(tmp_path / "p.png"), np.array(expect, np.uint8))


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_transparent_index_is_white(tmp_path: Path, fmt: str) -> None:
    _p_image().save(tmp_path / f"p.{fmt}", transparency=1)  # green is the transparent index
    expect = [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]
    np.testing.assert_array_equal(load_file(tmp_path / f"p.{fmt}"), np.array(expect, np.uint8))


def test_palette_alpha_table_composited(tmp_path: Path) -> None:
    _p_image().save(tmp_path / "p.png", transparency=bytes([255, 128, 0]))
    expect = [[[255, 0, 0], on_white([0, 255, 0], 128), [255, 255, 255]]]
    np.testing.assert_array_equal(load_file(tmp_path / "p.png"), np.array(expect, np.uint8))


def test_pa_composited_on_white(tmp_path: Path) -> None:
    pa = Image.new("PA", (3, 1))
    pa.putpalette(PALETTE)
    pa.putdata([(0, 255), (1, 128), (2, 0)])
    pa.save(tmp_path / "pa.tif")
    assert Image.open(tmp_path / "pa.tif").mode == "PA"
    expect = [[[255, 0, 0], on_white([0, 255, 0], 128), [255, 255, 255]]]
    np.testing.assert_array_equal(load_file(tmp_path / "pa.tif"), np.array(expect, np.uint8))


def test_colour_key_transparency(tmp_path: Path) -> None:
    """A PNG tRNS colour key on L, RGB and 16-bit grey images makes those pixels white."""
    Image.fromarray(np.array([[0, 100, 200]], np.uint8)).save(tmp_path / "l.png", transparency=100)
    np.testing.assert_array_equal(load_file(tmp_path / "l.png"), grey([[0, 255, 200]]))

    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(1, 2, 3))
    expect = np.array([[[255, 255, 255], [4, 5, 6]]], np.uint8)
    np.testing.assert_array_equal(load_file(tmp_path / "rgb.png"), expect)

    Image.fromarray(V16).save(tmp_path / "g16.png", transparency=385)
    np.testing.assert_array_equal(
        load_file(tmp_path / "g16.png"), grey([[0, 0, 1, 255, 2, 128, 255, 255]])
    )


def test_premultiplied_modes_in_memory() -> None:
    la = Image.frombytes("La", (3, 1), bytes([100, 128, 0, 0, 50, 255]))
    np.testing.assert_array_equal(convert(la), grey([[227, 255, 50]]))  # c + 255 - a
    rgba = Image.frombytes("RGBa", (2, 1), bytes([100, 50, 0, 128, 0, 0, 0, 0]))
    np.testing.assert_array_equal(convert(rgba), np.array([[[227, 177, 127], [255] * 3]]))


# --------------------------------------------------------------------------- 8-bit modes


def test_one_bit(tmp_path: Path) -> None:
    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(load_file(tmp_path / "b.png"), grey([[255, 0, 255]]))


def test_l_and_rgb_png_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    c = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "l.png")
    Image.fromarray(c).save(tmp_path / "c.png")
    np.testing.assert_array_equal(load_file(tmp_path / "l.png"), grey(g))
    np.testing.assert_array_equal(load_file(tmp_path / "c.png"), c)
    np.testing.assert_array_equal(load_array(g), grey(g))
    np.testing.assert_array_equal(load_array(c), c)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_bit_identical_to_pillow_convert(tmp_path: Path, mode: str) -> None:
    """Ordinary JPEGs keep exactly the pixels of Pillow's convert("RGB") (measured results)."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    rgb.convert(mode).save(tmp_path / "x.jpg", quality=90)
    with Image.open(tmp_path / "x.jpg") as img:
        assert img.mode == mode
        expect = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(load_file(tmp_path / "x.jpg"), expect)


def test_cmyk(tmp_path: Path) -> None:
    px = [(0, 0, 0, 0), (255, 0, 0, 0), (100, 50, 0, 128), (0, 0, 0, 255)]
    Image.frombytes("CMYK", (4, 1), bytes(c for p in px for c in p)).save(tmp_path / "k.tif")
    assert Image.open(tmp_path / "k.tif").mode == "CMYK"
    expect = [[[255, 255, 255], [0, 255, 255], [77, 102, 127], [0, 0, 0]]]  # (255-C)(255-K)/255
    np.testing.assert_array_equal(load_file(tmp_path / "k.tif"), np.array(expect, np.uint8))


def test_ycbcr(tmp_path: Path) -> None:
    px = [(128, 128, 128), (76, 85, 255), (255, 128, 128)]
    Image.frombytes("YCbCr", (3, 1), bytes(c for p in px for c in p)).save(tmp_path / "y.tif")
    assert Image.open(tmp_path / "y.tif").mode == "YCbCr"
    expect = [[[128, 128, 128], [254, 0, 0], [255, 255, 255]]]  # ITU-R BT.601 (JPEG)
    np.testing.assert_array_equal(load_file(tmp_path / "y.tif"), np.array(expect, np.uint8))


def test_lab(tmp_path: Path) -> None:
    px = [(0, 0, 0), (128, 0, 0), (255, 0, 0)]  # Pillow's LAB: a*, b* as signed bytes
    Image.frombytes("LAB", (3, 1), bytes(c for p in px for c in p)).save(tmp_path / "lab.tif")
    with Image.open(tmp_path / "lab.tif") as img:
        assert img.mode == "LAB"
        expect = np.asarray(img.convert("RGB"))
    out = load_file(tmp_path / "lab.tif")
    np.testing.assert_array_equal(out, expect)  # Pillow's LAB -> sRGB
    cie = np.array([[[0] * 3, [119] * 3, [255] * 3]])  # L* = 0, 50.2, 100 in sRGB
    assert np.abs(out.astype(int) - cie).max() <= 1


def test_hsv_and_rgbx_in_memory() -> None:
    hsv = Image.frombytes("HSV", (3, 1), bytes([0, 255, 255, 85, 255, 255, 0, 0, 77]))
    np.testing.assert_array_equal(convert(hsv), np.array([[[255, 0, 0], [0, 255, 0], [77] * 3]]))
    rgbx = Image.frombytes("RGBX", (1, 1), bytes([1, 2, 3, 9]))
    np.testing.assert_array_equal(convert(rgbx), np.array([[[1, 2, 3]]]))


def test_unknown_mode_rejected() -> None:
    from ptcl.data.base import to_rgb

    fake = types.SimpleNamespace(mode="BGR;24", info={}, palette=None)
    with pytest.raises(DataError, match=r"mem\.png: unsupported image mode 'BGR;24'"):
        to_rgb(fake, "mem.png")  # type: ignore[arg-type]


def test_non_image_file_names_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(DataError, match="corrupt or unreadable image file .*x.png"):
        load_file(tmp_path / "x.png")
