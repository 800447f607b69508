"""DICOM results: the AI findings as a Structured Report and the heatmap as a Secondary Capture image.

The SR is a Comprehensive SR whose content follows TID 1500 "Measurement Report":

- the observer is a device (TID 1004): the model, with a Device Observer UID derived from its name, version
  and sha256, so that every report of one model version names the same device;
- one TID 1501 measurement group per finding: the finding's code (``Finding``), a qualitative evaluation
  ``<finding> = Present | Absent`` (SNOMED CT, CID 240), the probability (``Probability``, UCUM ``1``) and the
  decision threshold (``Threshold Value``), the algorithm (TID 4019, family ``Artificial Intelligence``) and
  the source image;
- the source image in the Image Library (TID 1600) and in the evidence sequence;
- a ``Qualitative Evaluations`` container (TID 1500 row 12) whose ``Comment`` states that the content is
  AI-generated and not verified by a clinician, with the model's sha256 and intended use, and one
  ``Clinical Information`` text per clinical input the model was given (value, unit, effective time, or
  why it was missing).

The document is COMPLETE, UNVERIFIED and PRELIMINARY. A report that replaces an earlier one names it in the
Predecessor Documents Sequence.

The Secondary Capture is the source image windowed to 8 bits with the heatmap blended over it as a colour
overlay, RGB, at most :data:`MAX_SC_SIDE` pixels on its longest side, in the source's study and naming the
source in its Source Image and Referenced Image Sequences.

Both builders are pure: the same arguments give the same object, byte for byte (every UID they make is
derived from their arguments, every date and time is ``content_datetime``). This module is the only place
in results that imports highdicom.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import io
import math
from collections.abc import Iterator, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import RE_VALID_UID, UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, DT, TM

from service.errors import InvalidInput
from service.inference.preprocess import resize_bilinear
from service.schemas import ClinicalValue, FindingResult, Findings, ModelIdentity

MANUFACTURER = "clinfer"
SR_SERIES_NUMBER = 9001
SC_SERIES_NUMBER = 9002
MAX_SC_SIDE = 1024
# The heatmap is blended with an opacity proportional to its value: cold regions leave the image untouched.
HEATMAP_MAX_OPACITY = 0.5

AI_STATEMENT_PREFIX = "AI-generated content, not verified by a clinician."

# FHIR code system URIs -> DICOM Coding Scheme Designators.
CODING_SCHEME_DESIGNATORS = {
    "http://snomed.info/sct": "SCT",
    "http://loinc.org": "LN",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
    "http://radlex.org": "RADLEX",
    "http://www.radlex.org": "RADLEX",
}

# Concepts not in pydicom's dictionary under a usable name.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
# CID 100 "Quantitative Diagnostic Imaging Procedures".
_PROCEDURES = {
    "CR": codes.LN.XRUnspecifiedBodyRegion,
    "DX": codes.LN.XRUnspecifiedBodyRegion,
    "CT": codes.LN.CTUnspecifiedBodyRegion,
}
_PROCEDURE_FALLBACK = codes.SCT.ImagingProcedure

# Type 2 attributes of the Patient and General Study modules that highdicom reads from the evidence.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_MAX_LO = 64


def build_findings_sr(
    source: Dataset,
    findings: Findings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    content_datetime: dt.datetime,
    predecessor: tuple[str, str, str, str] | None = None,
    series_number: int = SR_SERIES_NUMBER,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
) -> Dataset:
    """Build the Comprehensive SR (TID 1500) that carries one model's findings on one image.

    Patient and study attributes come from ``source``; the SR belongs to the source's study, in a series of
    its own (modality SR).

    Args:
        source: The image the model read, as received (pixel data not needed).
        findings: The model's identity, its coded findings and the clinical inputs it was given;
            ``findings.source_sop_instance_uid`` must be the source's SOP Instance UID.
        series_instance_uid: Series Instance UID of the SR series (not the source's series).
        sop_instance_uid: SOP Instance UID of the SR.
        instance_number: Instance Number of the SR (1 or more).
        content_datetime: When the findings were made; aware. Written in the source's Timezone Offset From
            UTC when it has one, else in UTC (without an offset, since the study's own times have none).
        predecessor: ``(study_instance_uid, series_instance_uid, sop_class_uid, sop_instance_uid)`` of the
            SR this one amends, or None for a first report.
        series_number: Series Number of the SR series.
        institution_name: Institution Name of the equipment (clinfer's site), if known.
        institutional_department_name: Its department, if known (only with ``institution_name``).

    Returns:
        The SR as a highdicom ``ComprehensiveSR`` (a pydicom Dataset with file meta); see :func:`to_part10`.

    Raises:
        InvalidInput: An argument is missing, malformed or inconsistent (the message names it).
    """
    _check_source(source)
    _check_findings(findings, source)
    _check_new_instance(source, series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid)
    _check_positive(instance_number, "instance_number")
    _check_positive(series_number, "series_number")
    _check_aware(content_datetime)
    previous_versions = _predecessor_dataset(predecessor, sop_instance_uid=sop_instance_uid)
    _check_long_string(institution_name, "institution_name")
    _check_long_string(institutional_department_name, "institutional_department_name")
    if institutional_department_name is not None and institution_name is None:
        raise InvalidInput("'institutional_department_name' needs 'institution_name'")

    model = findings.model
    evidence = _evidence(source)
    when, offset = _local_content_datetime(content_datetime, source)
    with _refused_by_highdicom("SR"):
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_observer_uid(model),
                name=model.name,
                manufacturer_name=MANUFACTURER,
                model_name=model.name,
            ),
        )
        groups = [_finding_group(finding, model=model, source=evidence) for finding in findings.findings]
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=_procedure_reported(source),
            imaging_measurements=groups,
            referenced_images=_image_library(evidence),
        )
        # TID 1500 row 12: document-level qualitative evaluations (CODE or TEXT), which highdicom does not build.
        statements = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        statements.ContentSequence = hd.sr.ContentSequence(
            [_text(codes.DCM.Comment, ai_statement(model))]
            + [_text(codes.LN.ClinicalInformation, _clinical_input_text(value)) for value in findings.clinical_inputs]
        )
        report[0].ContentSequence.append(statements)

        sr = hd.sr.ComprehensiveSR(
            evidence=[evidence],
            content=report[0],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=institution_name,
            institutional_department_name=institutional_department_name,
            previous_versions=previous_versions,
            series_description=_lo(f"AI findings: {model.name} {model.version}"),
            manufacturer_model_name=model.name,
            software_versions=model.version,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    _stamp_creation(sr, when, offset)
    return sr


def build_heatmap_sc(
    source: Dataset,
    heatmap: np.ndarray,
    *,
    finding_display: str,
    model: ModelIdentity,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    content_datetime: dt.datetime,
    series_number: int = SC_SERIES_NUMBER,
    institution_name: str | None = None,
) -> Dataset:
    """Build a Secondary Capture image: the source image with one finding's heatmap blended over it.

    The source is rendered as a viewer would show it (modality LUT, its first window or else its full range,
    MONOCHROME1 inverted), reduced so that its longest side is at most :data:`MAX_SC_SIDE` pixels; the
    heatmap is stretched over the whole image (the model read the whole image, resized) and blended as a
    jet-like colour overlay whose opacity grows with the heatmap's value.

    Args:
        source: The image the model read, with its pixel data (MONOCHROME1 or MONOCHROME2; the middle frame of
            a multi-frame image).
        heatmap: 2-D float array in [0, 1], of any size (for example 8 x 8 or 256 x 256).
        finding_display: The finding the heatmap explains, as displayed (``Pleural effusion``).
        model: The model that made the heatmap.
        series_instance_uid: Series Instance UID of the SC series (not the source's series).
        sop_instance_uid: SOP Instance UID of the SC image.
        instance_number: Instance Number of the image (1 or more).
        content_datetime: When the heatmap was made; aware (written as for :func:`build_findings_sr`).
        series_number: Series Number of the SC series.
        institution_name: Institution Name of the equipment (clinfer's site), if known.

    Returns:
        The image as a highdicom ``SCImage`` (a pydicom Dataset with file meta); see :func:`to_part10`.

    Raises:
        InvalidInput: An argument is missing, malformed or inconsistent (the message names it), or the
            source's pixels cannot be decoded.
    """
    _check_source(source)
    if "PixelData" not in source:
        raise InvalidInput("'source' has no PixelData")
    heat = _check_heatmap(heatmap)
    if not isinstance(finding_display, str) or not finding_display.strip():
        raise InvalidInput("'finding_display' must be a non-empty string")
    _check_model(model, "model")
    _check_new_instance(source, series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid)
    _check_positive(instance_number, "instance_number")
    _check_positive(series_number, "series_number")
    _check_aware(content_datetime)
    _check_long_string(institution_name, "institution_name")

    gray = _display_image(source)
    rows, columns = gray.shape
    overlay = resize_bilinear(heat, rows, columns)
    rgb = _blend(gray, overlay)

    evidence = _evidence(source)
    when, offset = _local_content_datetime(content_datetime, source)
    with _refused_by_highdicom("Secondary Capture"):
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=evidence,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            # Replaced below: highdicom accepts single letters only, DICOM also combinations such as "FL".
            patient_orientation=("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=_lo(f"AI heatmap: {finding_display} ({model.name} {model.version})"),
            manufacturer_model_name=model.name,
            software_versions=model.version,
            institution_name=institution_name,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    # SCImage.from_ref_dataset copies a few patient and study attributes only; the SR carries all of those modules
    # (the issuer of the patient ID among them), and both objects of a study must file under the same patient.
    sc.copy_patient_and_study_information(evidence)
    sc.PatientOrientation = _patient_orientation(source)
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    # SC Equipment: made on a workstation (by software), not captured from a video or film interface.
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = model.name
    sc.SecondaryCaptureDeviceSoftwareVersions = model.version
    sc.DateOfSecondaryCapture = DA(when.date())
    sc.TimeOfSecondaryCapture = TM(when.time())
    sc.BurnedInAnnotation = "NO"
    if source.get("LossyImageCompression") == "01":
        # Derived from a lossy image: the derived image is lossy too (PS3.3 C.7.6.1.1.5).
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                sc[keyword] = source[keyword]
    else:
        sc.LossyImageCompression = "00"
    sc.ImageComments = (
        f"{AI_STATEMENT_PREFIX} Heatmap of '{finding_display}' from the model {model.name} version "
        f"{model.version} (sha256 {model.sha256}), blended over the source image; it shows where the model "
        f"looked, not a segmentation. Intended use: {model.intended_use}"
    )
    sc.DerivationDescription = (
        f"AI-generated: {model.name} {model.version} heatmap for '{finding_display}' overlaid on the windowed "
        "source image"
    )[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    related = Dataset()
    related.ReferencedSOPClassUID = source.SOPClassUID
    related.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.ReferencedImageSequence = [related]
    _stamp_creation(sc, when, offset)
    return sc


def to_part10(dataset: Dataset) -> bytes:
    """Encode a dataset as a DICOM Part 10 file in Explicit VR Little Endian.

    The File Meta Information is made from the dataset's SOP Class and SOP Instance UIDs (keeping an
    implementation class UID and version the dataset already carries). The dataset itself is not changed.

    Args:
        dataset: A dataset with SOPClassUID and SOPInstanceUID and native (not encapsulated) pixel data, if any.

    Returns:
        The 128-byte preamble, ``DICM``, the File Meta Information and the dataset.

    Raises:
        InvalidInput: The dataset has no SOP Class or SOP Instance UID, or encapsulated pixel data.
    """
    if not isinstance(dataset, Dataset):
        raise InvalidInput(f"'dataset' must be a pydicom Dataset, got {type(dataset).__name__}")
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not dataset.get(keyword):
            raise InvalidInput(f"'dataset' has no {keyword}")
    old_meta = getattr(dataset, "file_meta", None)
    old_syntax = old_meta.get("TransferSyntaxUID") if old_meta is not None else None
    if "PixelData" in dataset and old_syntax is not None and UID(old_syntax).is_encapsulated:
        raise InvalidInput(f"'dataset' has encapsulated pixel data ({old_syntax}); decompress it first")
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(dataset.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = UID(dataset.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if old_meta is not None and "ImplementationClassUID" in old_meta:
        meta.ImplementationClassUID = old_meta.ImplementationClassUID
        if "ImplementationVersionName" in old_meta:
            meta.ImplementationVersionName = old_meta.ImplementationVersionName
    else:
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    out = dataset.copy()
    out.file_meta = meta
    out.preamble = b"\x00" * 128
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def device_observer_uid(model: ModelIdentity) -> str:
    """The Device Observer UID of a model version: the same for every report of that name, version and sha256."""
    return str(generate_uid(entropy_srcs=["clinfer model", model.name, model.version, model.sha256]))


def ai_statement(model: ModelIdentity) -> str:
    """The text that labels an SR's content as AI-generated (starts with :data:`AI_STATEMENT_PREFIX`)."""
    return (
        f"{AI_STATEMENT_PREFIX} The findings, probabilities and thresholds in this report were produced "
        f"automatically by the model {model.name} version {model.version} (sha256 {model.sha256}, execution "
        f"provider {model.execution_provider}). A finding is reported present when its probability reaches its "
        f"decision threshold. Intended use: {model.intended_use}"
    )


# --- SR content ---------------------------------------------------------------------------------------------


def _finding_group(
    finding: FindingResult, *, model: ModelIdentity, source: Dataset
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = _finding_concept(finding)
    # Stable across amendments: the same finding of the same model on the same image keeps its tracking UID.
    tracking_uid = generate_uid(
        entropy_srcs=["clinfer finding", str(source.SOPInstanceUID), model.name, finding.system, finding.code]
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        manufacturer=MANUFACTURER,
        family=codes.DCM.ArtificialIntelligence,
        parameters=[f"sha256={model.sha256}", f"execution provider={model.execution_provider}"],
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=_lo(finding.display), uid=tracking_uid),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=codes.DCM.Probability, value=finding.probability, unit=NO_UNITS),
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=finding.threshold, unit=NO_UNITS),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=codes.SCT.Present if finding.positive else codes.SCT.Absent)
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _finding_concept(finding: FindingResult) -> hd.sr.CodedConcept:
    designator = CODING_SCHEME_DESIGNATORS.get(finding.system.rstrip("/"), None)
    if designator is None and finding.system in CODING_SCHEME_DESIGNATORS.values():
        designator = finding.system
    if designator is None:
        raise InvalidInput(
            f"'findings': finding {finding.code!r} has code system {finding.system!r}, which has no DICOM "
            f"coding scheme designator (known: {', '.join(sorted(CODING_SCHEME_DESIGNATORS))})"
        )
    return hd.sr.CodedConcept(value=finding.code, scheme_designator=designator, meaning=_lo(finding.display))


def _image_library(evidence: Dataset) -> list[Dataset] | None:
    """The source for the Image Library (TID 1600), or None when it lacks the geometry highdicom describes it by.

    The library is optional (TID 1500 row 5, U); without it, each measurement group and the evidence sequence
    still name the source. highdicom needs Patient Orientation and Imager Pixel Spacing of a radiograph, Pixel
    Spacing, Image Orientation/Position (Patient) and Slice Thickness of a cross-sectional image.
    """
    try:
        hd.sr.ImageLibrary([evidence])
    except (AttributeError, TypeError, ValueError):
        return None
    return [evidence]


def _procedure_reported(source: Dataset) -> hd.sr.CodedConcept:
    code = _PROCEDURES.get(str(source.get("Modality", "")).upper(), _PROCEDURE_FALLBACK)
    return hd.sr.CodedConcept.from_code(code)


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name,
        value=value,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _clinical_input_text(value: ClinicalValue) -> str:
    code = f" [LOINC {value.loinc}]" if value.loinc else ""
    if value.missing or value.value is None:
        return f"{value.feature}{code}: missing ({value.reason or 'no value'}); masked, not used by the model"
    unit = f" {value.unit}" if value.unit else ""
    when = f", effective {_iso(value.effective_at)}" if value.effective_at is not None else ""
    return f"{value.feature}{code} = {value.value:.6g}{unit}{when}"


def _predecessor_dataset(
    predecessor: tuple[str, str, str, str] | None, *, sop_instance_uid: str
) -> list[Dataset] | None:
    if predecessor is None:
        return None
    if not isinstance(predecessor, tuple) or len(predecessor) != 4:
        raise InvalidInput(
            "'predecessor' must be a tuple (study_instance_uid, series_instance_uid, sop_class_uid, sop_instance_uid)"
        )
    names = ("study_instance_uid", "series_instance_uid", "sop_class_uid", "sop_instance_uid")
    for name, uid in zip(names, predecessor, strict=True):
        _check_uid(uid, f"predecessor {name}")
    if predecessor[3] == sop_instance_uid:
        raise InvalidInput("'predecessor' names the SR being built: its sop_instance_uid equals 'sop_instance_uid'")
    previous = Dataset()
    previous.StudyInstanceUID, previous.SeriesInstanceUID, previous.SOPClassUID, previous.SOPInstanceUID = predecessor
    return [previous]


# --- SC pixels ----------------------------------------------------------------------------------------------


def _display_image(source: Dataset) -> np.ndarray:
    """The source frame as displayed, float in [0, 1], longest side at most MAX_SC_SIDE."""
    photometric = str(source.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidInput(f"'source' has PhotometricInterpretation {photometric or '(none)'}; grayscale images only")
    frames = int(source.get("NumberOfFrames", 1) or 1)
    try:
        stored = pydicom.pixels.pixel_array(source, index=frames // 2) if frames > 1 else source.pixel_array
        values = np.asarray(apply_modality_lut(stored, source), dtype=np.float64)
    except Exception as e:  # pydicom raises many types for undecodable pixel data
        raise InvalidInput(f"'source' pixel data cannot be decoded: {e}") from e
    if values.ndim != 2:
        raise InvalidInput(f"'source' frame must be 2-D, got shape {values.shape}")
    image = _window(values, source)
    if photometric == "MONOCHROME1" or source.get("PresentationLUTShape") == "INVERSE":
        image = 1.0 - image
    return _shrink(image, MAX_SC_SIDE)


def _window(values: np.ndarray, source: Dataset) -> np.ndarray:
    """Apply the first VOI window (PS3.3 C.11.2.1.2), or the full range when there is none."""
    window = _first_window(source)
    if window is None:
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros_like(values)
        return (values - low) / (high - low)
    center, width = window
    function = str(source.get("VOILUTFunction", "LINEAR")).strip().upper()
    if function == "SIGMOID":
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first_window(source: Dataset) -> tuple[float, float] | None:
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    try:
        c = float(center[0] if isinstance(center, MultiValue) else center)
        w = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
        return None
    return c, w


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """Reduce by an integer factor with area averaging until the longest side fits (edges padded by repetition)."""
    factor = math.ceil(max(image.shape) / max_side)
    if factor <= 1:
        return image
    rows, columns = (math.ceil(n / factor) for n in image.shape)
    padded = np.pad(image, ((0, rows * factor - image.shape[0]), (0, columns * factor - image.shape[1])), mode="edge")
    return np.asarray(padded.reshape(rows, factor, columns, factor).mean(axis=(1, 3)))


def _jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: blue (0) -> cyan -> yellow -> red (1), as float RGB in [0, 1]."""
    v = values[..., None]
    centers = np.array([0.75, 0.5, 0.25])  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * v - 4.0 * centers), 0.0, 1.0)


def _blend(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    opacity = HEATMAP_MAX_OPACITY * np.clip(heat, 0.0, 1.0)[..., None]
    rgb = gray[..., None] * (1.0 - opacity) + _jet(heat) * opacity
    return np.asarray(np.rint(np.clip(rgb, 0.0, 1.0) * 255.0), dtype=np.uint8)


def _patient_orientation(source: Dataset) -> list[str]:
    """The source's Patient Orientation, else one derived from Image Orientation (Patient), else empty."""
    orientation = source.get("PatientOrientation")
    if orientation is not None and isinstance(orientation, MultiValue) and len(orientation) == 2:
        return [str(v) for v in orientation]
    cosines = source.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        return [
            _direction_letters([float(v) for v in cosines[:3]]),
            _direction_letters([float(v) for v in cosines[3:]]),
        ]
    return []  # Type 2C: present and empty


def _direction_letters(direction: Sequence[float]) -> str:
    # Patient coordinates are LPS: +x towards the patient's left, +y posterior, +z head.
    letters = [("L", "R"), ("P", "A"), ("H", "F")]
    order = sorted(range(3), key=lambda axis: -abs(direction[axis]))
    return (
        "".join(letters[axis][0 if direction[axis] > 0 else 1] for axis in order if abs(direction[axis]) > 0.25) or "L"
    )


# --- shared -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _refused_by_highdicom(what: str) -> Iterator[None]:
    """Turn highdicom's refusals (of a source attribute it cannot carry over, a too-long string) into ours."""
    try:
        yield
    except (AttributeError, TypeError, ValueError) as e:
        raise InvalidInput(f"cannot build the {what} from this source and these arguments: {e}") from e


def _evidence(source: Dataset) -> Dataset:
    """A copy of the source's attributes without its pixel data, with empty Type 2 patient and study attributes
    added where the source lacks them (highdicom reads them unconditionally)."""
    evidence = Dataset()
    for element in source:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            # Copies: highdicom adds the evidence's elements themselves to the objects it builds, which the
            # builders then change; the caller's dataset must not change with them.
            evidence.add(copy.deepcopy(element))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    if evidence.PatientSex not in (None, "", "M", "F", "O"):
        evidence.PatientSex = None  # a value outside the enumeration (often "U"): unknown, which Type 2 allows
    if "SpecificCharacterSet" in evidence:
        # The copied values are decoded text already, and what is built is written in UTF-8 (_stamp_creation).
        # Carried as it came, an ISO 2022 set's empty first value (the default repertoire, as Japanese and Korean
        # sites send it) is refused by highdicom.
        evidence.SpecificCharacterSet = "ISO_IR 192"
    return evidence


def _local_content_datetime(content_datetime: dt.datetime, source: Dataset) -> tuple[dt.datetime, str | None]:
    offset = source.get("TimezoneOffsetFromUTC")
    if offset:
        text = str(offset).strip()
        try:
            sign = -1 if text[0] == "-" else 1
            hours, minutes = int(text[1:3]), int(text[3:5])
        except (IndexError, ValueError):
            return content_datetime.astimezone(dt.UTC), None
        zone = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
        return content_datetime.astimezone(zone), text
    return content_datetime.astimezone(dt.UTC), None


def _stamp_creation(dataset: Dataset, when: dt.datetime, offset: str | None) -> None:
    # Our texts (intended use, finding names, clinical values) and the source's names may hold any character:
    # written as UTF-8 (ISO_IR 192), nothing is replaced on encoding.
    dataset.SpecificCharacterSet = "ISO_IR 192"
    # highdicom stamps the wall clock; the content time keeps the object reproducible.
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when.replace(tzinfo=None))
    if offset is not None:
        dataset.TimezoneOffsetFromUTC = offset


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _lo(text: str) -> str:
    """Fit a Long String (at most 64 characters)."""
    text = " ".join(text.split())
    return text if len(text) <= _MAX_LO else text[: _MAX_LO - 3] + "..."


# --- argument checks ----------------------------------------------------------------------------------------


def _check_source(source: object) -> None:
    if not isinstance(source, Dataset):
        raise InvalidInput(f"'source' must be a pydicom Dataset, got {type(source).__name__}")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        _check_uid(source.get(keyword), f"source {keyword}")
    if not source.get("Modality"):
        raise InvalidInput("'source' has no Modality")
    if not source.get("Rows") or not source.get("Columns"):
        raise InvalidInput("'source' is not an image: it has no Rows and Columns")


def _check_findings(findings: object, source: Dataset) -> None:
    if not isinstance(findings, Findings):
        raise InvalidInput(f"'findings' must be a Findings, got {type(findings).__name__}")
    _check_model(findings.model, "findings.model")
    if not findings.findings:
        raise InvalidInput("'findings' has no findings")
    if findings.source_sop_instance_uid != source.SOPInstanceUID:
        raise InvalidInput(
            f"'findings' were made on {findings.source_sop_instance_uid}, not on the source {source.SOPInstanceUID}"
        )
    seen: set[tuple[str, str]] = set()
    for index, finding in enumerate(findings.findings):
        where = f"'findings.findings[{index}]'"
        if not finding.code.strip() or not finding.display.strip():
            raise InvalidInput(f"{where} needs a code and a display")
        if (finding.system, finding.code) in seen:
            raise InvalidInput(f"{where} repeats code {finding.code!r}")
        seen.add((finding.system, finding.code))
        for name in ("probability", "threshold"):
            number = getattr(finding, name)
            if not (math.isfinite(number) and 0.0 <= number <= 1.0):
                raise InvalidInput(f"{where} {name} must be in [0, 1], got {number!r}")
        _finding_concept(finding)


def _check_model(model: object, name: str) -> None:
    if not isinstance(model, ModelIdentity):
        raise InvalidInput(f"'{name}' must be a ModelIdentity, got {type(model).__name__}")
    _check_long_string(model.name, f"{name}.name")
    _check_long_string(model.version, f"{name}.version")


def _check_new_instance(source: Dataset, *, series_instance_uid: str, sop_instance_uid: str) -> None:
    _check_uid(series_instance_uid, "series_instance_uid")
    _check_uid(sop_instance_uid, "sop_instance_uid")
    if series_instance_uid == source.SeriesInstanceUID:
        raise InvalidInput("'series_instance_uid' is the source's series; results need a series of their own")
    if sop_instance_uid == source.SOPInstanceUID:
        raise InvalidInput("'sop_instance_uid' is the source's SOP Instance UID")
    if series_instance_uid == sop_instance_uid:
        raise InvalidInput("'series_instance_uid' and 'sop_instance_uid' must differ")


def _check_long_string(value: object, name: str) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_LO or "\\" in value:
        raise InvalidInput(f"'{name}' must be 1 to {_MAX_LO} characters without a backslash, got {value!r}")


def _check_uid(value: object, name: str) -> None:
    if not isinstance(value, str) or len(value) > 64 or RE_VALID_UID.fullmatch(value) is None:
        raise InvalidInput(f"'{name}' must be a valid DICOM UID, got {value!r}")


def _check_positive(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInput(f"'{name}' must be an int of at least 1, got {value!r}")


def _check_aware(value: object) -> None:
    if not isinstance(value, dt.datetime):
        raise InvalidInput(f"'content_datetime' must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput("'content_datetime' must be timezone-aware (UTC)")


def _check_heatmap(heatmap: object) -> np.ndarray:
    if not isinstance(heatmap, np.ndarray):
        raise InvalidInput(f"'heatmap' must be a numpy array, got {type(heatmap).__name__}")
    if heatmap.ndim != 2 or min(heatmap.shape) < 1:
        raise InvalidInput(f"'heatmap' must be a non-empty 2-D array, got shape {heatmap.shape}")
    if not np.issubdtype(heatmap.dtype, np.floating):
        raise InvalidInput(f"'heatmap' must be a float array, got dtype {heatmap.dtype}")
    if not np.isfinite(heatmap).all():
        raise InvalidInput("'heatmap' has NaN or infinite values")
    low, high = float(heatmap.min()), float(heatmap.max())
    if low < -1e-6 or high > 1.0 + 1e-6:
        raise InvalidInput(f"'heatmap' values must be in [0, 1], got [{low:.6g}, {high:.6g}]")
    return np.clip(heatmap.astype(np.float32), 0.0, 1.0)
