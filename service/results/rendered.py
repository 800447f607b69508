"""Rendered images (DICOMweb, PS3.18 8.3.5 and 10.4): one frame of a stored instance as PNG or JPEG, the way a
viewer shows it.

The pixels are decoded by the DICOM ingest (``dicom.decode_image``: the same decoders, limits, Modality LUT and
VOI attributes the models read), then:

- grayscale: the VOI of the request's ``window`` (center, width and function), else the object's first window
  (with its VOI LUT Function) or its VOI LUT, else its full range; MONOCHROME1 inverted, so that bright means
  dense as on any viewer;
- colour (RGB, YBR, PALETTE COLOR; our heatmap Secondary Capture is RGB): kept as it is, scaled to 8 bits;
- ``viewport``: reduced to fit inside the viewport, keeping the aspect ratio (never enlarged), with Pillow's
  Lanczos filter: a bilinear resize without a low-pass filter aliases at the arbitrary factors a viewport asks
  for (the inference pre-processing resizes only by the factors its manifests fix).

This module is the only place that imports Pillow.
"""

from __future__ import annotations

import dataclasses
import io
import re
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.errors import InvalidInput, NotAcceptable
from service.ingest import dicom

PNG = "image/png"
JPEG = "image/jpeg"
MEDIA_TYPES = (PNG, JPEG)
"""What we render to, the default first."""
MAX_VIEWPORT = 4096
# a window's center and width are modality values (Hounsfield units, stored values): bounded so that the float32
# arithmetic below stays finite
MAX_WINDOW = 1e9
MIN_EXACT_WIDTH = 1e-6
_DIGITS = re.compile(r"[0-9]{1,6}")  # ASCII digits only: str.isdigit admits "²", which int() refuses
DEFAULT_JPEG_QUALITY = 90
_RENDERING = threading.BoundedSemaphore(2)  # renders at once in this process

# PS3.18 8.3.5.1.4 function names -> PS3.3 C.11.2.1.3 VOI LUT Function
VOI_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2) in modality units."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class Viewport:
    """The box the image must fit in; a side left out (None) does not bound it."""

    width: int | None
    height: int | None


def parse_window(text: str) -> Window:
    """``center,width[,function]`` (PS3.18 8.3.5.1.4); the function is linear when left out.

    Raises:
        InvalidInput: not two numbers and a known function, or a width the function does not allow.
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise InvalidInput(f"window {text[:60]!r} must be center,width,function (for example 40,400,linear)")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError as e:
        raise InvalidInput(f"window {text[:60]!r}: center and width must be numbers") from e
    if not (abs(center) <= MAX_WINDOW and 0 < abs(width) <= MAX_WINDOW):  # NaN fails too
        raise InvalidInput(f"window {text[:60]!r}: center and width must be finite, within ±{MAX_WINDOW:g}")
    name = parts[2].lower() if len(parts) == 3 else "linear"
    function = VOI_FUNCTIONS.get(name)
    if function is None:
        raise InvalidInput(f"window function {parts[2][:20]!r} is not one of {', '.join(VOI_FUNCTIONS)}")
    if width < 1 if function == "LINEAR" else width < MIN_EXACT_WIDTH:
        raise InvalidInput(
            f"window width {width:g} is too small: at least 1 for linear, {MIN_EXACT_WIDTH:g} for linear-exact and"
            " sigmoid"
        )
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    """``vw,vh`` (PS3.18 8.3.5.1.3): each 1 to MAX_VIEWPORT pixels, one of them may be left empty.

    Raises:
        InvalidInput: anything else (the cropping form ``vw,vh,sx,sy,sw,sh`` is not supported).
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not any(parts):
        raise InvalidInput(f"viewport {text[:60]!r} must be vw,vh (pixels; one of them may be empty)")
    sides: list[int | None] = []
    for part in parts:
        if not part:
            sides.append(None)
            continue
        if not _DIGITS.fullmatch(part) or not 1 <= int(part) <= MAX_VIEWPORT:
            raise InvalidInput(f"viewport {text[:60]!r}: each side must be a whole number from 1 to {MAX_VIEWPORT}")
        sides.append(int(part))
    return Viewport(sides[0], sides[1])


def parse_quality(text: str) -> int:
    """``quality`` (PS3.18 8.3.5.1.2): 1 to 100, for lossy media types.

    Raises:
        InvalidInput: not a whole number in that range.
    """
    if not _DIGITS.fullmatch(text.strip()) or not 1 <= int(text) <= 100:
        raise InvalidInput(f"quality {text[:20]!r} must be a whole number from 1 to 100")
    return int(text)


def render(
    data: bytes,
    *,
    max_pixels: int,
    media_type: str = PNG,
    window: Window | None = None,
    viewport: Viewport | None = None,
    quality: int = DEFAULT_JPEG_QUALITY,
    frame: int = 0,
) -> bytes:
    """Render one frame (the first unless ``frame``, 0-based) of a Part 10 object.

    Args:
        data: the whole Part 10 object, as stored.
        max_pixels: the decoding limits of ``dicom.parse_instance``.
        media_type: PNG or JPEG.
        window: the VOI to apply to a grayscale image instead of the object's own.
        viewport: the box to fit the image in.
        quality: JPEG quality, 1 to 100.

    Returns:
        The encoded image.

    Raises:
        NotAcceptable: the object has no pixel data (a Structured Report) or its pixels cannot be rendered
            (a transfer syntax or photometric interpretation we cannot decode); the message says which.
        InvalidInput: a media type other than PNG or JPEG.
    """
    if media_type not in MEDIA_TYPES:
        raise InvalidInput(f"cannot render as {media_type}; one of {', '.join(MEDIA_TYPES)}")
    with _RENDERING:  # a few at a time: a large image's decoded values take several times its stored size
        return _render(
            data,
            max_pixels=max_pixels,
            media_type=media_type,
            window=window,
            viewport=viewport,
            quality=quality,
            frame=frame,
        )


def _render(
    data: bytes,
    *,
    max_pixels: int,
    media_type: str,
    window: Window | None,
    viewport: Viewport | None,
    quality: int,
    frame: int,
) -> bytes:
    try:
        decoded = dicom.decode_image(data, max_pixels=max_pixels, index=frame, colour=True, voi_lut=window is None)
    except dicom.NoPixelData as e:
        raise NotAcceptable(
            f"instance {e.sop_instance_uid} (SOP class {e.sop_class_uid}) has no pixel data: there is no image to"
            " render; retrieve it as application/dicom instead"
        ) from e
    except dicom.DicomRejected as e:
        raise NotAcceptable(f"instance {e.sop_instance_uid} cannot be rendered: {e.message}") from e
    if viewport is not None:  # reduced by whole blocks first: the arithmetic below then runs on the small image
        rows, columns = decoded.pixels.shape[:2]
        target = fitted_size(columns, rows, viewport)
        block = min(columns // target[0], rows // target[1])
        if block >= 2:
            decoded = dataclasses.replace(decoded, pixels=_block_means(decoded.pixels, block))
    if decoded.photometric_interpretation == "RGB":
        display = decoded.pixels
    else:
        display = displayed_values(decoded, window)
    # an object's own window may still be extreme: what overflows is clipped, never cast undefined
    display = np.nan_to_num(display, nan=0.0, posinf=1.0, neginf=0.0)
    eight_bits = np.rint(display * np.float32(255.0)).astype(np.uint8)
    image = Image.fromarray(eight_bits)  # L for 2-D, RGB for three samples per pixel
    if viewport is not None:
        image = _fit(image, viewport)
    out = io.BytesIO()
    if media_type == JPEG:
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _block_means(pixels: np.ndarray, block: int) -> np.ndarray:
    """The image reduced ``block`` times in each direction by averaging ``block`` x ``block`` squares (the last
    partial row and column of blocks left out), float32."""
    rows, columns = pixels.shape[0] // block * block, pixels.shape[1] // block * block
    shape = (rows // block, block, columns // block, block, *pixels.shape[2:])
    means: np.ndarray = pixels[:rows, :columns].reshape(shape).mean(axis=(1, 3), dtype=np.float32)
    return means


def displayed_values(decoded: dicom.DecodedImage, window: Window | None) -> np.ndarray:
    """A grayscale image's values as displayed, float32 in [0, 1]: VOI (PS3.3 C.11.2.1.2), then MONOCHROME1
    inverted."""
    values = decoded.pixels
    if window is None and decoded.window is not None:
        center, width = decoded.window
        function = "LINEAR" if decoded.voi_lut_applied else decoded.voi_lut_function
        window = Window(center, width, function if function in VOI_FUNCTIONS.values() else "LINEAR")
    if window is None:  # no VOI at all: the full range
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if high <= low:
            out = np.zeros(values.shape, dtype=np.float32)
        else:
            out = np.subtract(values, np.float32(low), dtype=np.float32)
            out *= np.float32(1.0 / (high - low))
    elif window.function == "SIGMOID":
        out = np.subtract(values, np.float32(window.center), dtype=np.float32)
        out *= np.float32(-4.0 / window.width)
        np.exp(out, out=out)
        out += np.float32(1.0)
        np.reciprocal(out, out=out)
    elif window.function == "LINEAR_EXACT":
        out = np.subtract(values, np.float32(window.center), dtype=np.float32)
        out *= np.float32(1.0 / window.width)
        out += np.float32(0.5)
    elif window.width <= 1:  # LINEAR with a width of 1: a threshold
        out = (values > window.center - 0.5).astype(np.float32)
    else:  # LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5)
        out = np.subtract(values, np.float32(window.center - 0.5), dtype=np.float32)
        out *= np.float32(1.0 / (window.width - 1.0))
        out += np.float32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    if decoded.photometric_interpretation == "MONOCHROME1":
        np.subtract(np.float32(1.0), out, out=out)
    return out


def fitted_size(width: int, height: int, viewport: Viewport) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` image reduced to fit the viewport, aspect ratio kept, never larger."""
    scale = 1.0
    if viewport.width is not None:
        scale = min(scale, viewport.width / width)
    if viewport.height is not None:
        scale = min(scale, viewport.height / height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fit(image: Image.Image, viewport: Viewport) -> Image.Image:
    size = fitted_size(image.width, image.height, viewport)
    if size == image.size:
        return image
    # reducing_gap: a large reduction first by whole-block averaging, then Lanczos (the same look, a fraction
    # of the time on a 3000-pixel radiograph)
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
