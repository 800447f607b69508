"""DICOM ingest: parse and validate Part 10 objects, extract metadata, decode pixels.

pydicom lives here (and in the DICOM result writers) only; everything else sees NormalizedInstance and
numpy arrays.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from service.errors import InvalidInput
from service.schemas import NormalizedInstance

# PS3.18 Table 10.5.3-2 / PS3.4 Annex B status codes used as FailureReason
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DOES_NOT_MATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

_UNCOMPRESSED = {
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
}


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


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


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


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    bits = _int(ds, "BitsAllocated")
    if not rows or not columns or not bits:
        return None
    samples = _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    total_bits = rows * columns * samples * frames * bits
    return (total_bits + 7) // 8


@dataclass(frozen=True)
class ParsedInstance:
    meta: NormalizedInstance
    dataset: Dataset


def parse_instance(data: bytes, *, max_pixels: int) -> ParsedInstance:
    """Parse and validate one DICOM Part 10 object.

    Args:
        data: the whole file, preamble included.
        max_pixels: refuse images whose Rows x Columns x frames exceeds this (checked before any decode).

    Returns:
        The metadata we keep in rows and the parsed dataset.

    Raises:
        DicomRejected: not DICOM, missing or invalid identifying attributes, truncated pixel data, too large.
    """
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
        if rows and columns and rows * columns * frames > max_pixels:
            raise DicomRejected(
                f"image of {rows}x{columns}x{frames} pixels exceeds the limit of {max_pixels}",
                failure_reason=FAILURE_OUT_OF_RESOURCES,
                **ids,
            )
        if "PixelData" in ds and transfer_syntax in _UNCOMPRESSED:
            expected = _expected_pixel_bytes(ds)
            actual = len(ds.PixelData)
            if expected is not None and actual < expected:
                raise DicomRejected(
                    f"PixelData holds {actual} bytes, {expected} expected from Rows, Columns, BitsAllocated,"
                    " SamplesPerPixel and NumberOfFrames (truncated object?)",
                    failure_reason=FAILURE_CANNOT_UNDERSTAND,
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


@dataclass(frozen=True)
class DecodedImage:
    """One frame in modality units (Rescale Slope/Intercept applied) with what windowing needs."""

    pixels: np.ndarray
    photometric_interpretation: str
    window: tuple[float, float] | None


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError):
        return None
    return (c, w) if w > 0 else None


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode the pixels of one grayscale image (the middle frame of a multi-frame object).

    Raises:
        DicomRejected: no pixel data, colour image, a transfer syntax we cannot decode, or too large.
    """
    parsed = parse_instance(data, max_pixels=max_pixels)
    ds = parsed.dataset
    ids = {"sop_class_uid": parsed.meta.sop_class_uid, "sop_instance_uid": parsed.meta.sop_instance_uid}
    if "PixelData" not in ds:
        raise DicomRejected("the object has no PixelData", failure_reason=FAILURE_DOES_NOT_MATCH, **ids)
    photometric = (parsed.meta.photometric_interpretation or "").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomRejected(
            f"PhotometricInterpretation {photometric or '(none)'} is not supported; grayscale images only",
            failure_reason=FAILURE_DOES_NOT_MATCH,
            **ids,
        )
    frames = parsed.meta.number_of_frames
    try:
        if frames > 1:
            array = pydicom.pixels.pixel_array(ds, index=frames // 2)
        else:
            array = ds.pixel_array
        pixels = apply_modality_lut(array, ds).astype(np.float32)
    except (NotImplementedError, RuntimeError) as e:
        raise DicomRejected(
            f"cannot decode transfer syntax {parsed.meta.transfer_syntax_uid}: {e}",
            failure_reason=FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
            **ids,
        ) from e
    except Exception as e:
        raise DicomRejected(
            f"cannot decode the pixel data: {e}", failure_reason=FAILURE_CANNOT_UNDERSTAND, **ids
        ) from e
    if pixels.ndim != 2:
        raise DicomRejected(
            f"expected a 2-D frame, got shape {pixels.shape}", failure_reason=FAILURE_DOES_NOT_MATCH, **ids
        )
    return DecodedImage(pixels=pixels, photometric_interpretation=photometric, window=_first_window(ds))
