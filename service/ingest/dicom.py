"""DICOM ingest: parse and validate Part 10 objects, extract metadata, decode pixels.

pydicom lives here (and in the DICOM result writers) only; everything else sees NormalizedInstance and
numpy arrays.

Pixel data is decoded by pydicom 3's own decoder registry (``pydicom.pixels.get_decoder``), which we ask for
its ``pylibjpeg`` plugin wherever that plugin serves the transfer syntax: pylibjpeg-libjpeg for JPEG
baseline, extended and lossless and for JPEG-LS, pylibjpeg-openjpeg for JPEG 2000 (and HTJ2K),
pylibjpeg-rle for RLE. Deflate and big endian are native in pydicom. Why these: they are pure wheels with
no system library to install, they are the decoders pydicom itself documents and tests against, and
naming one plugin means the same object always decodes to the same pixels whatever else is installed
(Pillow, when present, decodes YBR 4:2:2 JPEG baseline up to 3 levels apart and cannot read 12-bit JPEG).
GDCM is not needed: it would only add a second decoder for the same formats, with a native library to ship.

Everything a decoder would allocate is bounded from the header before any decoding: Rows x Columns x
frames against ``max_pixels``, the decoded bytes (x SamplesPerPixel x BitsAllocated) against a byte
budget derived from it, the inflated size of a deflated object, the fragment structure of encapsulated
pixel data, and the size each JPEG / JPEG-LS / JPEG 2000 codestream declares for itself.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import UID

from service.errors import InvalidInput
from service.schemas import NormalizedInstance

# PS3.18 Table 10.5.3-2 / PS3.4 Annex B status codes used as FailureReason
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DOES_NOT_MATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

DECODING_PLUGIN = "pylibjpeg"
"""The pydicom pixel data plugin we decode with wherever it serves the transfer syntax."""

BYTES_PER_PIXEL_BUDGET = 4
"""Decoded bytes allowed per pixel of ``max_pixels``: 16-bit grey, 8-bit colour and float32 all fit."""

_NON_PIXEL_ALLOWANCE = 64 * 1024**2  # bytes of attributes besides pixel data that an inflated object may hold
_INFLATE_CHUNK = 1024**2

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

_BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})
_SAMPLES_PER_PIXEL = frozenset({1, 3, 4})  # 4: the retired ARGB and CMYK
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
# start-of-frame markers of ISO 10918 (all processes but DHT/JPG/DAC) and SOF55 of ISO 14495 (JPEG-LS)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_JPEG_START_OF_SCAN = 0xDA
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JPEG_FAMILY = frozenset(pydicom.uid.JPEGTransferSyntaxes + pydicom.uid.JPEGLSTransferSyntaxes)
_JPEG_2000_FAMILY = frozenset(pydicom.uid.JPEG2000TransferSyntaxes)


def decoded_bytes_limit(max_pixels: int) -> int:
    """The most bytes the pixel data of one object may decode to.

    Args:
        max_pixels: the pixel limit (Rows x Columns x frames) of the deployment.

    Returns:
        ``max_pixels`` x ``BYTES_PER_PIXEL_BUDGET``.
    """
    return max_pixels * BYTES_PER_PIXEL_BUDGET


class DicomRejected(InvalidInput):
    """An object we refuse, with the PS3.18 FailureReason (and DIMSE status) to report."""

    code = "dicom-rejected"

    def __init__(
        self,
        message: str,
        *,
        failure_reason: int,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> None:
        super().__init__(message)
        self.failure_reason = failure_reason
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


class NoPixelData(DicomRejected):
    """The object has no pixel data to decode (a Structured Report, for one)."""


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):  # several values where the standard has one: written as DICOM writes them
        return "\\".join(str(v).strip() for v in value).strip("\\") or None
    return str(value).strip() or None


_INT32 = range(-(2**31), 2**31)  # an IS value's range (PS3.5 6.2); a number beyond it is no valid value


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number in _INT32 else None


def _date(ds: Dataset, keyword: str) -> dt.date | None:
    value = _text(ds, keyword)
    if value is None:
        return None
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _check_uid(value: str | None, keyword: str, **ids: str | None) -> str:
    if not value:
        raise DicomRejected(f"{keyword} is missing", failure_reason=FAILURE_DOES_NOT_MATCH, **ids)
    if len(value) > 64 or not _UID.match(value):
        raise DicomRejected(f"{keyword} {value!r} is not a valid UID", failure_reason=FAILURE_DOES_NOT_MATCH, **ids)
    return value


def decoding_plugin_for(transfer_syntax_uid: str) -> str:
    """The pydicom decoding plugin we use for a transfer syntax: ours where it serves it, else pydicom's choice.

    Args:
        transfer_syntax_uid: the object's Transfer Syntax UID.

    Returns:
        ``"pylibjpeg"``, or ``""`` (pydicom's own choice: the native decoders of uncompressed, deflated
        and big endian pixel data).

    Raises:
        NotImplementedError: pydicom has no decoder at all for the transfer syntax.
    """
    decoder = get_decoder(UID(transfer_syntax_uid))
    return DECODING_PLUGIN if DECODING_PLUGIN in decoder.available_plugins else ""


def _check_inflated_size(data: bytes, limit: int) -> None:
    """Bound a deflated object's inflated size before pydicom inflates it whole (it has no limit of its own).

    Raises:
        DicomRejected: the dataset inflates beyond ``limit`` bytes, or is not a valid deflate stream.
    """
    if data[128:132] != b"DICM":
        return  # not Part 10: dcmread refuses it
    stream = io.BytesIO(data)
    stream.seek(132)
    try:
        file_meta = read_dataset(
            stream,
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=lambda tag, vr, length: tag.group != 0x0002,
        )
        transfer_syntax = str(file_meta.get("TransferSyntaxUID", "") or "")
    except Exception:  # a malformed meta group: dcmread reports it with its own words
        return
    if transfer_syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    compressed = memoryview(data)[stream.tell() :]
    inflated = 0
    try:
        # input in slices, output in bounded chunks: neither side is ever held whole
        for start in range(0, len(compressed), _INFLATE_CHUNK):
            pending: bytes | memoryview = compressed[start : start + _INFLATE_CHUNK]
            while not inflater.eof:
                out = inflater.decompress(pending, _INFLATE_CHUNK)
                inflated += len(out)
                if inflated > limit:
                    raise DicomRejected(
                        f"the deflated dataset inflates beyond the limit of {limit} bytes",
                        failure_reason=FAILURE_OUT_OF_RESOURCES,
                    )
                pending = inflater.unconsumed_tail
                if not pending and len(out) < _INFLATE_CHUNK:
                    break
            if inflater.eof:
                break
    except zlib.error as e:
        raise DicomRejected(
            f"the deflated dataset is not a valid deflate stream: {e}", failure_reason=FAILURE_CANNOT_UNDERSTAND
        ) from e


@dataclass(frozen=True)
class _PixelGeometry:
    """What the Image Pixel module says the pixel data decodes to."""

    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int

    @property
    def pixels(self) -> int:
        return self.rows * self.columns * self.frames

    @property
    def decoded_bytes(self) -> int:
        return (self.pixels * self.samples_per_pixel * self.bits_allocated + 7) // 8


def _pixel_geometry(ds: Dataset, **ids: str | None) -> _PixelGeometry:
    """The Image Pixel module of an object with PixelData, refused when incomplete or implausible."""
    values: dict[str, int] = {}
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        value = _int(ds, keyword)
        if value is None:
            raise DicomRejected(
                f"{keyword} is missing or invalid while PixelData is present",
                failure_reason=FAILURE_DOES_NOT_MATCH,
                **ids,
            )
        values[keyword] = value
    rows, columns, bits_allocated = values["Rows"], values["Columns"], values["BitsAllocated"]
    if not (0 < rows <= 0xFFFF and 0 < columns <= 0xFFFF):
        raise DicomRejected(
            f"Rows {rows} x Columns {columns} is not a plausible image", failure_reason=FAILURE_CANNOT_UNDERSTAND, **ids
        )
    if bits_allocated not in _BITS_ALLOCATED:
        raise DicomRejected(
            f"BitsAllocated {bits_allocated} is not one of {sorted(_BITS_ALLOCATED)}",
            failure_reason=FAILURE_CANNOT_UNDERSTAND,
            **ids,
        )
    samples = _int(ds, "SamplesPerPixel") if "SamplesPerPixel" in ds else 1
    if samples is None or samples not in _SAMPLES_PER_PIXEL:
        raise DicomRejected(
            f"SamplesPerPixel {ds.get('SamplesPerPixel')!r} is not one of {sorted(_SAMPLES_PER_PIXEL)}",
            failure_reason=FAILURE_CANNOT_UNDERSTAND,
            **ids,
        )
    frames = 1
    raw_frames = ds.get("NumberOfFrames")
    if raw_frames not in (None, ""):
        parsed_frames = _int(ds, "NumberOfFrames")
        if parsed_frames is None or parsed_frames < 0:
            raise DicomRejected(
                f"NumberOfFrames {raw_frames!r} is not a number of frames",
                failure_reason=FAILURE_CANNOT_UNDERSTAND,
                **ids,
            )
        frames = parsed_frames or 1  # 0 read as 1, as pydicom does
    return _PixelGeometry(rows, columns, frames, samples, bits_allocated)


def _encapsulated_items(pixel_data: bytes, **ids: str | None) -> list[tuple[int, int]]:
    """(offset of the value, length) of each item of encapsulated pixel data, the Basic Offset Table first."""
    items: list[tuple[int, int]] = []
    position, end = 0, len(pixel_data)
    while position + 8 <= end:
        group, element, length = struct.unpack_from("<HHL", pixel_data, position)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == 0xFFFFFFFF or position + 8 + length > end:
            raise DicomRejected(
                f"encapsulated PixelData is malformed at byte {position}: item tag {tag:08X}, length {length}"
                f" of {end - position - 8} bytes left",
                failure_reason=FAILURE_CANNOT_UNDERSTAND,
                **ids,
            )
        items.append((position + 8, length))
        position += 8 + length
    if not items:
        raise DicomRejected(
            "encapsulated PixelData has no Basic Offset Table item", failure_reason=FAILURE_CANNOT_UNDERSTAND, **ids
        )
    return items


def _check_encapsulation(ds: Dataset, geometry: _PixelGeometry, **ids: str | None) -> None:
    """Refuse encapsulated pixel data whose frames cannot be told apart: fewer fragments than frames, offset
    tables that do not give one offset per frame inside the data."""
    element = ds["PixelData"]
    if not element.is_undefined_length:
        raise DicomRejected(
            "PixelData in a compressed transfer syntax is not encapsulated",
            failure_reason=FAILURE_CANNOT_UNDERSTAND,
            **ids,
        )
    pixel_data: bytes = element.value
    items = _encapsulated_items(pixel_data, **ids)
    (table_at, table_length), fragments = items[0], items[1:]
    frames = geometry.frames
    if not fragments:
        raise DicomRejected("encapsulated PixelData holds no fragment", failure_reason=FAILURE_CANNOT_UNDERSTAND, **ids)
    if len(fragments) < frames:
        raise DicomRejected(
            f"encapsulated PixelData holds {len(fragments)} fragments for {frames} frames",
            failure_reason=FAILURE_CANNOT_UNDERSTAND,
            **ids,
        )
    fragments_span = sum(8 + length for _, length in fragments)
    offsets: list[int] = []
    if "ExtendedOffsetTable" in ds:
        table = bytes(ds.ExtendedOffsetTable or b"")
        offsets = list(struct.unpack(f"<{len(table) // 8}Q", table[: len(table) // 8 * 8]))
        what = "Extended Offset Table"
        if len(bytes(ds.get("ExtendedOffsetTableLengths") or b"")) != 8 * len(offsets):
            raise DicomRejected(
                "the Extended Offset Table Lengths do not match the Extended Offset Table",
                failure_reason=FAILURE_CANNOT_UNDERSTAND,
                **ids,
            )
    elif table_length:
        if table_length % 4:
            raise DicomRejected(
                f"the Basic Offset Table is {table_length} bytes long, not a multiple of 4",
                failure_reason=FAILURE_CANNOT_UNDERSTAND,
                **ids,
            )
        offsets = list(struct.unpack_from(f"<{table_length // 4}L", pixel_data, table_at))
        what = "Basic Offset Table"
    if offsets and (
        len(offsets) != frames
        or offsets[0] != 0
        or any(b <= a for a, b in zip(offsets, offsets[1:], strict=False))
        or offsets[-1] >= fragments_span
    ):
        raise DicomRejected(
            f"the {what} does not give one increasing offset inside the data for each of {frames} frames",
            failure_reason=FAILURE_CANNOT_UNDERSTAND,
            **ids,
        )


def _check_pixel_data(ds: Dataset, transfer_syntax: str, *, max_pixels: int, **ids: str | None) -> None:
    """Refuse, before anything is decoded, pixel data we could not decode or that would not fit."""
    uid = UID(transfer_syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as e:
        raise DicomRejected(
            f"no installed decoder handles the pixel data of transfer syntax {uid} ({uid.name})",
            failure_reason=FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
            **ids,
        ) from e
    if not decoder.is_available:
        raise DicomRejected(
            f"the decoders of transfer syntax {uid} ({uid.name}) are not installed",
            failure_reason=FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
            **ids,
        )
    geometry = _pixel_geometry(ds, **ids)
    if geometry.pixels > max_pixels:
        raise DicomRejected(
            f"image of {geometry.rows}x{geometry.columns}x{geometry.frames} pixels exceeds the limit of {max_pixels}",
            failure_reason=FAILURE_OUT_OF_RESOURCES,
            **ids,
        )
    limit = decoded_bytes_limit(max_pixels)
    if geometry.decoded_bytes > limit:
        raise DicomRejected(
            f"pixel data decodes to {geometry.decoded_bytes} bytes, beyond the limit of {limit}",
            failure_reason=FAILURE_OUT_OF_RESOURCES,
            **ids,
        )
    if uid.is_encapsulated:
        _check_encapsulation(ds, geometry, **ids)
        return
    if ds["PixelData"].is_undefined_length:
        raise DicomRejected(
            f"PixelData is encapsulated in the uncompressed transfer syntax {uid}",
            failure_reason=FAILURE_CANNOT_UNDERSTAND,
            **ids,
        )
    actual, expected = len(ds.PixelData), geometry.decoded_bytes
    if _text(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        expected = expected * 2 // 3  # two chroma samples shared by each pair of pixels (PS3.3 C.7.6.3.1.2)
    if actual < expected:
        raise DicomRejected(
            f"PixelData holds {actual} bytes, {expected} expected from Rows, Columns, BitsAllocated,"
            " SamplesPerPixel, PhotometricInterpretation and NumberOfFrames (truncated object?)",
            failure_reason=FAILURE_CANNOT_UNDERSTAND,
            **ids,
        )


@dataclass(frozen=True)
class ParsedInstance:
    meta: NormalizedInstance
    dataset: Dataset


def parse_instance(data: bytes, *, max_pixels: int) -> ParsedInstance:
    """Parse and validate one DICOM Part 10 object.

    Args:
        data: the whole file, preamble included.
        max_pixels: refuse images whose Rows x Columns x frames exceeds this, or whose decoded bytes exceed
            ``decoded_bytes_limit(max_pixels)`` (checked before any decode).

    Returns:
        The metadata we keep in rows and the parsed dataset.

    Raises:
        DicomRejected: not DICOM (0xC000); missing or invalid identifying attributes (0xA900); pixel data in
            a transfer syntax no installed decoder handles (0xC122); truncated or implausible pixel data
            (0xC000); too large (0xA700).
    """
    _check_inflated_size(data, decoded_bytes_limit(max_pixels) + _NON_PIXEL_ALLOWANCE)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as e:
        raise DicomRejected(f"not a DICOM Part 10 object: {e}", failure_reason=FAILURE_CANNOT_UNDERSTAND) from e
    except Exception as e:  # pydicom raises many types on malformed input (struct, value, EOF, ...)
        raise DicomRejected(f"cannot parse the DICOM object: {e}", failure_reason=FAILURE_CANNOT_UNDERSTAND) from e
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(getattr(file_meta, "TransferSyntaxUID", "") or "")
    sop_class = _text(ds, "SOPClassUID") or (str(getattr(file_meta, "MediaStorageSOPClassUID", "")) or None)
    sop_instance = _text(ds, "SOPInstanceUID")
    ids = {"sop_class_uid": sop_class, "sop_instance_uid": sop_instance}
    try:
        _check_uid(sop_instance, "SOPInstanceUID", **ids)
        _check_uid(sop_class, "SOPClassUID", **ids)
        _check_uid(_text(ds, "StudyInstanceUID"), "StudyInstanceUID", **ids)
        _check_uid(_text(ds, "SeriesInstanceUID"), "SeriesInstanceUID", **ids)
        _check_uid(transfer_syntax, "TransferSyntaxUID", **ids)
        rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
        frames = _int(ds, "NumberOfFrames") or 1
        if "PixelData" in ds:
            _check_pixel_data(ds, transfer_syntax, max_pixels=max_pixels, **ids)
        elif rows and columns and rows * columns * frames > max_pixels:
            raise DicomRejected(
                f"image of {rows}x{columns}x{frames} pixels exceeds the limit of {max_pixels}",
                failure_reason=FAILURE_OUT_OF_RESOURCES,
                **ids,
            )
        meta = NormalizedInstance(
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(sop_instance),
            sop_class_uid=str(sop_class),
            transfer_syntax_uid=transfer_syntax,
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            patient_birth_date=_date(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"),
            study_date=_date(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"),
            study_description=_text(ds, "StudyDescription"),
            modality=_text(ds, "Modality"),
            body_part_examined=(_text(ds, "BodyPartExamined") or "").upper() or None,
            series_description=_text(ds, "SeriesDescription"),
            series_number=_int(ds, "SeriesNumber"),
            instance_number=_int(ds, "InstanceNumber"),
            view_position=_text(ds, "ViewPosition"),
            rows=rows,
            columns=columns,
            photometric_interpretation=_text(ds, "PhotometricInterpretation"),
            number_of_frames=frames,
            manufacturer=_text(ds, "Manufacturer"),
        )
    except DicomRejected:
        raise
    except Exception as e:  # a malformed element surfaces lazily while we read attributes
        raise DicomRejected(
            f"cannot read the DICOM attributes: {e}", failure_reason=FAILURE_CANNOT_UNDERSTAND, **ids
        ) from e
    return ParsedInstance(meta=meta, dataset=ds)


def _codestream_size(frame: bytes, transfer_syntax: UID) -> tuple[int, int, int] | None:
    """(rows, columns, components) that a frame's JPEG, JPEG-LS or JPEG 2000 codestream declares.

    Returns:
        None for other encodings (RLE: its decoder sizes its output from the DICOM header).

    Raises:
        ValueError: a JPEG-family frame without a readable frame header.
    """
    if transfer_syntax in _JPEG_2000_FAMILY:
        at = frame.find(_J2K_SOC_SIZ)  # at 0, or after the boxes of a JP2 file some writers wrap it in
        if at < 0 or at + 42 > len(frame):
            raise ValueError("no JPEG 2000 SIZ marker segment")
        # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz
        fields = struct.unpack_from(">HHIIIIIIIIH", frame, at + 4)
        width, height, x_origin, y_origin, components = fields[2], fields[3], fields[4], fields[5], fields[10]
        return height - y_origin, width - x_origin, components
    if transfer_syntax not in _JPEG_FAMILY:
        return None
    if frame[:2] != b"\xff\xd8":
        raise ValueError("the frame does not start with a JPEG SOI marker")
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {position}")
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_SOF:
            if position + 10 > len(frame):
                break
            _, _, lines, samples_per_line, components = struct.unpack_from(">HBHHB", frame, position + 2)
            if lines == 0:
                raise ValueError("the JPEG frame header leaves its number of lines to a DNL marker")
            return lines, samples_per_line, components
        if marker == _JPEG_START_OF_SCAN:
            break
        position += 2 + int.from_bytes(frame[position + 2 : position + 4], "big")
    raise ValueError("no JPEG frame header before the first scan")


def _frame_array(ds: Dataset, meta: NormalizedInstance, index: int) -> np.ndarray:
    """Decode one frame as pydicom's pixel_array does, after checking what its codestream would allocate."""
    ids = {"sop_class_uid": meta.sop_class_uid, "sop_instance_uid": meta.sop_instance_uid}
    if "PixelData" not in ds:
        raise NoPixelData("the object has no PixelData", failure_reason=FAILURE_DOES_NOT_MATCH, **ids)
    transfer_syntax = UID(meta.transfer_syntax_uid)
    frames = meta.number_of_frames
    if not 0 <= index < frames:
        raise DicomRejected(
            f"frame {index} asked of an object of {frames} frames", failure_reason=FAILURE_DOES_NOT_MATCH, **ids
        )
    try:
        plugin = decoding_plugin_for(transfer_syntax)
        if transfer_syntax.is_encapsulated:
            rows, columns = meta.rows or 0, meta.columns or 0
            samples = _int(ds, "SamplesPerPixel") or 1
            extended = (
                (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
                if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds
                else None
            )
            frame = get_frame(ds.PixelData, index, number_of_frames=frames, extended_offsets=extended)
            declared = _codestream_size(frame, transfer_syntax)
            if declared is not None and declared[0] * declared[1] * declared[2] > rows * columns * samples:
                raise DicomRejected(
                    f"frame {index} declares {declared[0]}x{declared[1]} pixels of {declared[2]} components,"
                    f" more than the header's {rows}x{columns} of {samples}",
                    failure_reason=FAILURE_CANNOT_UNDERSTAND,
                    **ids,
                )
        array = pydicom.pixels.pixel_array(ds, index=index, decoding_plugin=plugin)
    except DicomRejected:
        raise
    except NotImplementedError as e:
        raise DicomRejected(
            f"cannot decode transfer syntax {transfer_syntax} ({transfer_syntax.name}): {e}",
            failure_reason=FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
            **ids,
        ) from e
    except MemoryError as e:
        raise DicomRejected(
            "not enough memory to decode the frame", failure_reason=FAILURE_OUT_OF_RESOURCES, **ids
        ) from e
    except Exception as e:  # decoders raise RuntimeError, ValueError, struct and codec errors on bad data
        raise DicomRejected(
            f"cannot decode the pixel data: {e}", failure_reason=FAILURE_CANNOT_UNDERSTAND, **ids
        ) from e
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def decode_frame(data: bytes, *, max_pixels: int, index: int | None = None) -> np.ndarray:
    """The stored values of one frame, exactly as pydicom's ``pixel_array`` gives them with our plugin.

    Only that frame is decoded, never the whole volume. Colour is returned as pydicom returns it (YBR
    converted to RGB); big-endian values come back in native byte order.

    Args:
        data: the whole Part 10 object.
        max_pixels: the limits of ``parse_instance``.
        index: the frame, 0-based; None for the middle frame (``NumberOfFrames // 2``).

    Returns:
        (rows, columns) or (rows, columns, samples) array.

    Raises:
        DicomRejected: refused by ``parse_instance``, no PixelData or no such frame (0xA900), a decoder
            that is not installed (0xC122), data the decoder cannot read (0xC000).
    """
    parsed = parse_instance(data, max_pixels=max_pixels)
    frames = parsed.meta.number_of_frames
    return _frame_array(parsed.dataset, parsed.meta, frames // 2 if index is None else index)


@dataclass(frozen=True)
class DecodedImage:
    """One frame in modality units (Modality LUT or Rescale Slope/Intercept applied) with what windowing needs.

    When the object has no window but a VOI LUT Sequence, the VOI LUT is already applied: ``pixels`` are its
    output and ``window`` spans its output range, so windowing maps it linearly onto [0, 1].

    A colour image (decoded with ``colour=True``) has ``photometric_interpretation`` RGB, ``pixels`` of shape
    (rows, columns, 3) scaled to [0, 1] (YBR converted to RGB, a palette applied) and no window.
    """

    pixels: np.ndarray
    photometric_interpretation: str
    window: tuple[float, float] | None
    voi_lut_applied: bool = False
    voi_lut_function: str = "LINEAR"
    """the object's VOI LUT Function (PS3.3 C.11.2.1.3) for its window: LINEAR, LINEAR_EXACT or SIGMOID"""


# attributes of the Modality LUT and VOI LUT modules (and what pydicom's LUT functions read beside them)
_LUT_KEYWORDS = (
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
# functional groups of enhanced multi-frame objects that carry the same attributes per frame
_FRAME_LUT_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def _frame_luts(ds: Dataset, index: int) -> Dataset:
    """The Modality and VOI LUT attributes that apply to one frame: the top level, then the shared functional
    groups, then the frame's own (an enhanced multi-frame object keeps them there)."""
    luts = Dataset()
    luts.file_meta = ds.file_meta  # pydicom reads OW LUT Data with the transfer syntax's byte order
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            luts[keyword] = ds[keyword]
    groups: list[Dataset] = []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for keyword in _FRAME_LUT_GROUPS:
            if group.get(keyword):
                for element in group[keyword][0]:
                    luts[element.tag] = element
    return luts


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if math.isfinite(c) and math.isfinite(w) and w > 0 else None


def _apply_voi_lut(pixels: np.ndarray, luts: Dataset) -> tuple[np.ndarray, tuple[float, float]]:
    """Map modality values through the first VOI LUT; returns its output and the window spanning its range.

    Not pydicom's ``apply_voi``: it indexes with the LUT's own dtype, which wraps a LUT of more than 256
    entries of 8 bits (a common display curve) back to its start.
    """
    item = luts.VOILUTSequence[0]
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    entries, bits = (entries & 0xFFFF) or 2**16, bits & 0xFFFF  # always US, even where read as SS; 0 means 65536
    if not 8 <= bits <= 16:
        raise ValueError(f"{bits} bits per VOI LUT entry; 8 to 16 expected")
    data = item.LUTData
    if isinstance(data, bytes | bytearray):  # OW: 16-bit words in the transfer syntax's byte order
        order = "<" if UID(luts.file_meta.TransferSyntaxUID).is_little_endian else ">"
        table = np.frombuffer(data, dtype=f"{order}u2").astype(np.float32)
    else:
        table = np.atleast_1d(np.asarray(data, dtype=np.float32))
    if len(table) < entries:
        raise ValueError(f"VOI LUT Data holds {len(table)} entries, its descriptor {entries}")
    index = np.clip(np.rint(pixels) - first_mapped, 0, entries - 1).astype(np.intp)
    top = float(2**bits - 1)
    return table[index], (top / 2.0, top)


def _modality_values(array: np.ndarray, luts: Dataset) -> np.ndarray:
    """Stored values in modality units, float32: a Modality LUT Sequence by pydicom, Rescale Slope/Intercept here
    in float32 (pydicom's float64 product, cast down to float32 afterwards, cost four times as much for values
    that are the same within float32 rounding)."""
    if luts.get("ModalityLUTSequence") or "RescaleSlope" not in luts or "RescaleIntercept" not in luts:
        return np.asarray(apply_modality_lut(array, luts), dtype=np.float32)
    slope, intercept = float(luts.RescaleSlope), float(luts.RescaleIntercept)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ValueError(f"RescaleSlope {slope} and RescaleIntercept {intercept} must be finite numbers")
    pixels = array.astype(np.float32)
    if slope != 1.0:
        pixels *= np.float32(slope)
    if intercept != 0.0:
        pixels += np.float32(intercept)
    return pixels


# photometric interpretations decoded as colour (pydicom converts YBR to RGB; a palette is applied here)
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})


def _colour_values(array: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """A decoded colour frame as RGB in [0, 1], float32."""
    if photometric == "PALETTE COLOR":
        array = np.asarray(apply_color_lut(array, ds))
        top = float(np.iinfo(array.dtype).max) if array.dtype.kind == "u" else float(array.max() or 1)
    else:
        top = float(2 ** (_int(ds, "BitsStored") or 8) - 1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a frame of three samples per pixel, got shape {array.shape}")
    pixels = array.astype(np.float32)
    pixels *= np.float32(1.0 / top)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return pixels


def decode_image(
    data: bytes, *, max_pixels: int, index: int | None = None, colour: bool = False, voi_lut: bool = True
) -> DecodedImage:
    """Decode the pixels of one grayscale image (the middle frame of a multi-frame object unless ``index``).

    The Modality LUT Sequence or Rescale Slope/Intercept is applied (per frame for enhanced multi-frame
    objects). The first window (Window Center/Width) is passed on for windowing; an object without one but
    with a VOI LUT Sequence gets its VOI LUT applied here. MONOCHROME1 is inverted later, by windowing.

    Args:
        data: the whole Part 10 object.
        max_pixels: the limits of ``parse_instance``.
        index: the frame, 0-based; None for the middle frame (``NumberOfFrames // 2``).
        colour: admit colour images too (RGB, YBR, PALETTE COLOR), returned as RGB in [0, 1]; for display.
        voi_lut: apply the VOI LUT Sequence of an object without a window; False for a caller that windows the
            modality values itself (a window asked for by a viewer replaces the object's VOI).

    Raises:
        NoPixelData: the object has no pixel data (a DicomRejected).
        DicomRejected: a colour image (unless ``colour``), no such frame, a transfer syntax we cannot decode,
            or too large.
    """
    parsed = parse_instance(data, max_pixels=max_pixels)
    ds = parsed.dataset
    ids = {"sop_class_uid": parsed.meta.sop_class_uid, "sop_instance_uid": parsed.meta.sop_instance_uid}
    if "PixelData" not in ds:
        raise NoPixelData("the object has no PixelData", failure_reason=FAILURE_DOES_NOT_MATCH, **ids)
    photometric = (parsed.meta.photometric_interpretation or "").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and not (colour and photometric in _COLOUR):
        raise DicomRejected(
            f"PhotometricInterpretation {photometric or '(none)'} is not supported; "
            + ("grayscale, RGB, YBR or PALETTE COLOR images only" if colour else "grayscale images only"),
            failure_reason=FAILURE_DOES_NOT_MATCH,
            **ids,
        )
    index = parsed.meta.number_of_frames // 2 if index is None else index
    array = _frame_array(ds, parsed.meta, index)
    if photometric in _COLOUR:
        try:
            return DecodedImage(_colour_values(array, ds, photometric), "RGB", None)
        except Exception as e:  # a malformed palette (descriptor, data) or an unexpected shape
            raise DicomRejected(
                f"cannot read the colour image: {e}", failure_reason=FAILURE_CANNOT_UNDERSTAND, **ids
            ) from e
    if array.ndim != 2:
        raise DicomRejected(
            f"expected a 2-D frame, got shape {array.shape}", failure_reason=FAILURE_DOES_NOT_MATCH, **ids
        )
    try:
        luts = _frame_luts(ds, index)
        pixels = _modality_values(array, luts)
        window = _first_window(luts)
        if window is None and voi_lut and luts.get("VOILUTSequence"):
            pixels, window = _apply_voi_lut(pixels, luts)
            return DecodedImage(pixels, photometric, window, voi_lut_applied=True)
        function = str(luts.get("VOILUTFunction") or "LINEAR").strip().upper()
    except Exception as e:  # a malformed LUT (descriptor, data, depth) surfaces here
        raise DicomRejected(
            f"cannot apply the Modality or VOI LUT: {e}", failure_reason=FAILURE_CANNOT_UNDERSTAND, **ids
        ) from e
    return DecodedImage(pixels=pixels, photometric_interpretation=photometric, window=window, voi_lut_function=function)
