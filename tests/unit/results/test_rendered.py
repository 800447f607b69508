"""Rendering one frame as a viewer shows it: VOI (PS3.3 C.11.2.1.2) on known values, MONOCHROME1, colour,
viewport, and the query values of PS3.18 8.3.5.1 refused with a clear message."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInput, NotAcceptable
from service.results import rendered
from tests.factories import image_instance

MAX_PIXELS = 4096 * 4096

# one row per stored value 0..1023, 8 columns wide: a ramp whose every value is known
RAMP = np.repeat(np.arange(1024, dtype=np.uint16)[:, None], 8, axis=1)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 with an output range of 0..255, rounded as a display would."""
    out = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    return np.rint(out * 255.0).astype(np.int16)


def test_the_objects_window_applies_to_modality_values() -> None:
    data = image_instance(RAMP, rescale=(2.0, -100.0), window=(500.0, 401.0))
    image = Image.open(io.BytesIO(rendered.render(data, max_pixels=MAX_PIXELS)))
    assert image.format == "PNG" and image.mode == "L" and image.size == (8, 1024)
    expected = linear(RAMP[:, 0] * 2.0 - 100.0, 500.0, 401.0)
    got = np.asarray(image)[:, 0].astype(np.int16)
    assert np.abs(got - expected).max() <= 1
    assert got[0] == 0 and got[-1] == 255  # below and above the window
    assert 0 < got[300] < 255  # modality 500, the centre: mid-grey
    assert abs(int(got[300]) - 128) <= 1


def test_a_window_asked_for_replaces_the_objects() -> None:
    data = image_instance(RAMP, window=(500.0, 401.0))
    window = rendered.parse_window("100,51,linear")
    got = decoded(rendered.render(data, max_pixels=MAX_PIXELS, window=window))[:, 0].astype(np.int16)
    assert np.abs(got - linear(RAMP[:, 0].astype(np.float64), 100.0, 51.0)).max() <= 1
    assert got[74] == 0 and got[126] == 255


def test_linear_exact_and_sigmoid() -> None:
    data = image_instance(RAMP)
    exact = decoded(rendered.render(data, max_pixels=MAX_PIXELS, window=rendered.parse_window("512,256,linear-exact")))
    values = RAMP[:, 0].astype(np.float64)
    expected = np.rint(np.clip((values - 512) / 256 + 0.5, 0, 1) * 255)
    assert np.abs(exact[:, 0] - expected).max() <= 1
    sigmoid = decoded(rendered.render(data, max_pixels=MAX_PIXELS, window=rendered.parse_window("512,256,sigmoid")))
    expected = np.rint(255 / (1 + np.exp(-4 * (values - 512) / 256)))
    assert np.abs(sigmoid[:, 0] - expected).max() <= 1


def test_without_a_window_the_full_range_is_shown() -> None:
    data = image_instance(RAMP[100:300])
    got = decoded(rendered.render(data, max_pixels=MAX_PIXELS))[:, 0]
    assert got[0] == 0 and got[-1] == 255
    assert np.all(np.diff(got.astype(np.int16)) >= 0)


def test_monochrome1_is_inverted() -> None:
    two = decoded(rendered.render(image_instance(RAMP, window=(512, 1024)), max_pixels=MAX_PIXELS))
    one = decoded(
        rendered.render(image_instance(RAMP, window=(512, 1024), photometric="MONOCHROME1"), max_pixels=MAX_PIXELS)
    )
    assert np.array_equal(one.astype(np.int16), 255 - two.astype(np.int16))
    assert one[0, 0] == 255 and one[-1, 0] == 0


def test_rgb_is_kept_as_it_is() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    image = Image.open(io.BytesIO(rendered.render(image_instance(pixels), max_pixels=MAX_PIXELS)))
    assert image.mode == "RGB" and image.size == (30, 20)
    assert np.array_equal(np.asarray(image), pixels)


def test_viewport_reduces_keeping_the_aspect_ratio_and_never_enlarges() -> None:
    data = image_instance(np.zeros((300, 600), dtype=np.uint16))
    fit = rendered.render(data, max_pixels=MAX_PIXELS, viewport=rendered.parse_viewport("200,200"))
    assert Image.open(io.BytesIO(fit)).size == (200, 100)
    tall = rendered.render(data, max_pixels=MAX_PIXELS, viewport=rendered.parse_viewport(",60"))
    assert Image.open(io.BytesIO(tall)).size == (120, 60)
    larger = rendered.render(data, max_pixels=MAX_PIXELS, viewport=rendered.parse_viewport("2000,2000"))
    assert Image.open(io.BytesIO(larger)).size == (600, 300)


def test_jpeg() -> None:
    data = image_instance(RAMP, window=(512, 1024))
    image = Image.open(io.BytesIO(rendered.render(data, max_pixels=MAX_PIXELS, media_type=rendered.JPEG, quality=95)))
    assert image.format == "JPEG" and image.size == (8, 1024)
    png = decoded(rendered.render(data, max_pixels=MAX_PIXELS))
    assert np.abs(np.asarray(image).astype(np.int16) - png.astype(np.int16)).mean() < 3


@pytest.mark.parametrize(
    "text",
    ["", "40", "40,400,log", "a,400", "40,0,linear", "40,0.5,linear", "40,-3,sigmoid", "nan,400", "1,2,3,4"],
)
def test_bad_windows_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="window"):
        rendered.parse_window(text)


@pytest.mark.parametrize("text", ["", ",", "0,10", "10", "10,4097", "-5,5", "1.5,2", "10,10,0,0,5,5", "a,b"])
def test_bad_viewports_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="viewport"):
        rendered.parse_viewport(text)


@pytest.mark.parametrize("text", ["0", "101", "x", "-1", "9.5"])
def test_bad_qualities_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="quality"):
        rendered.parse_quality(text)


def test_an_object_without_pixels_is_not_acceptable() -> None:
    import pydicom

    data = image_instance(RAMP)
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(NotAcceptable, match="no pixel data"):
        rendered.render(buffer.getvalue(), max_pixels=MAX_PIXELS)


def test_a_large_image_fitted_to_a_viewport_is_reduced_before_its_values_are_windowed() -> None:
    """Found in review: every step ran on the full image (float32 copies of it, then 8 bits, then Pillow's), so a
    render took about 8.5 times the stored object's size at its peak (4096 x 4096 here); reduced by whole blocks
    first, it takes about 4."""
    pixels = (np.arange(4096 * 4096, dtype=np.uint32) % 4096).astype(np.uint16).reshape(4096, 4096)
    data = image_instance(pixels, window=(2048, 4096))
    tracemalloc.start()
    try:
        out = rendered.render(data, max_pixels=16384**2, viewport=rendered.Viewport(512, 512))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert Image.open(io.BytesIO(out)).size == (512, 512)
    assert peak < 5 * len(data), peak / len(data)
