"""A seeded synthetic cohort written as real DICOM Part 10 files and FHIR R4 transaction Bundles.

One cohort drives the tests, the demo and the benchmark, so it exercises what real senders vary: CR and DX
objects, MONOCHROME1 and MONOCHROME2, modality LUTs other than identity, VOI windows present or absent, PA and
AP views, vital signs and labs in non-canonical UCUM units (°F, mg/dL, 10*9/L, ng/L), SpO2 under either LOINC
code, systolic pressure alone or inside a blood-pressure panel, and a few values older than the model's
lookback windows. Everything follows from the seed: the same seed gives byte-identical files and the same UIDs.

Images, findings and clinical values come from :mod:`service.training.synthetic`; this module only packages
them. It writes with pydicom and validates with fhir.resources because it is a DICOM and FHIR *sender*, like a
modality or an EHR: the service's own ingest (``service.ingest``) stays the only reader.

Layout written by :func:`generate_cohort`::

    out_dir/dicom/<patient_id>/<sop_instance_uid>.dcm
    out_dir/fhir/<patient_id>.json
    out_dir/labels.csv      patient_id, study_instance_uid, the five findings (0/1), modality, photometric, view
    out_dir/cohort.json     seed, n, size, generator version, issuer and counts

Nothing here is fit for clinical use.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from service.errors import InvalidInput
from service.inference.preprocess import age_in_years
from service.training.synthetic import (
    FINDINGS,
    MAX_PIXEL_VALUE,
    render_chest_radiograph,
    sample_clinical,
    sample_findings,
)

GENERATOR_VERSION = "clinfer-cohort/1"
# HL7's arc for examples (2.16.840.1.113883.19): no real assigning authority can own these identifiers.
ISSUER = "urn:oid:2.16.840.1.113883.19.5"
MIN_COHORT_IMAGE_SIZE = 1024
MIN_CASE_IMAGE_SIZE = 64

CR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
DX_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
SOP_CLASS_UIDS = {"CR": CR_SOP_CLASS_UID, "DX": DX_SOP_CLASS_UID}
MODALITIES = ("CR", "DX")
PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
VIEW_POSITIONS = ("PA", "AP")
MANUFACTURER = "clinfer synthetic"

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
SNOMED_SYSTEM = "http://snomed.info/sct"
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_TEST_DATA_TAG = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "code": "HTEST",
    "display": "test health data",
}

_STUDY_EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
# An older result from an earlier encounter: beyond every lookback window of cxr-fusion (at most 720 h).
_STALE_DAYS = (31.0, 90.0)
_FRESH_HOURS = (0.25, 6.0)

# Shares of the variations. About half of the temperatures, CRPs, leukocyte counts and NT-proBNPs arrive in the
# other unit of use, which puts roughly a quarter of all observations in a unit the ingest has to convert.
P_DX = 0.55
P_MONOCHROME1 = 0.3
P_AP = 0.25
P_CR_IDENTITY_LUT = 0.5
P_CR_WINDOW = 0.65
P_SECOND_WINDOW = 0.25
P_OTHER_UNIT = 0.5
P_STALE = 0.06
P_SPO2_ARTERIAL = 0.2
P_BLOOD_PRESSURE_PANEL = 0.3

# CR Modality LUTs other than identity: (slope, intercept). Stored values are (modality value - intercept) / slope
# of a modality value in 0..4095, so every pair here keeps them in 0..4095 (12 bits) with slope >= 1; a slope
# below 1 would need more than 12 bits for the same modality values. DX For Presentation has no choice: its
# DX Image Module fixes slope 1 and intercept 0.
_CR_MODALITY_LUTS: tuple[tuple[float, float], ...] = ((2.0, 0.0), (2.0, -1024.0), (1.5, -1024.0), (1.25, 0.0))


@dataclass(frozen=True)
class _ObservationKind:
    loinc: str
    display: str
    category: str
    ucum_unit: str  # canonical, as service.training.synthetic.sample_clinical returns it
    other_unit: str | None = None  # another unit of use a sender might pick


# Other unit -> (scale, offset) with other = canonical * scale + offset.
_OTHER_UNITS: dict[str, tuple[float, float]] = {
    "[degF]": (9.0 / 5.0, 32.0),
    "mg/dL": (0.1, 0.0),
    "10*9/L": (1.0, 0.0),
    "ng/L": (1.0, 0.0),
}
_UNIT_DISPLAY = {
    "Cel": "°C",
    "[degF]": "°F",
    "/min": "/min",
    "%": "%",
    "10*3/uL": "10^3/µL",
    "10*9/L": "10^9/L",
    "mg/L": "mg/L",
    "mg/dL": "mg/dL",
    "pg/mL": "pg/mL",
    "ng/L": "ng/L",
    "mm[Hg]": "mmHg",
}

OBSERVATION_KINDS: dict[str, _ObservationKind] = {
    "temperature": _ObservationKind("8310-5", "Body temperature", "vital-signs", "Cel", "[degF]"),
    "heart_rate": _ObservationKind("8867-4", "Heart rate", "vital-signs", "/min"),
    "respiratory_rate": _ObservationKind("9279-1", "Respiratory rate", "vital-signs", "/min"),
    "spo2": _ObservationKind("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "vital-signs", "%"),
    "leukocytes": _ObservationKind(
        "6690-2", "Leukocytes [#/volume] in Blood by Automated count", "laboratory", "10*3/uL", "10*9/L"
    ),
    "crp": _ObservationKind(
        "1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "laboratory", "mg/L", "mg/dL"
    ),
    "nt_probnp": _ObservationKind(
        "33762-6",
        "Natriuretic peptide.B prohormone N-Terminal [Mass/volume] in Serum or Plasma",
        "laboratory",
        "pg/mL",
        "ng/L",
    ),
    "systolic_bp": _ObservationKind("8480-6", "Systolic blood pressure", "vital-signs", "mm[Hg]"),
}
_SPO2_ARTERIAL = ("2708-6", "Oxygen saturation in Arterial blood")
_BLOOD_PRESSURE_PANEL = ("85354-9", "Blood pressure panel with all children optional")
_DIASTOLIC = ("8462-4", "Diastolic blood pressure")
# ViewCodeSequence (CID 4010 "DX View"): SNOMED CT code and meaning per ViewPosition.
_VIEW_CODES = {"PA": ("399066004", "postero-anterior"), "AP": ("399348003", "antero-posterior")}
# (SNOMED CT code, display): a history the film does not show.
_HEART_FAILURE = ("84114007", "Heart failure")
_COPD = ("13645005", "Chronic obstructive lung disease")


@dataclass(frozen=True)
class PatientCase:
    """One synthetic patient: a chest radiograph as a Part 10 object and a FHIR transaction Bundle.

    Attributes:
        index: Position of the patient in its cohort.
        patient_id: DICOM PatientID and FHIR Patient.identifier.value, e.g. ``MRN-000123``.
        issuer: DICOM IssuerOfPatientID and FHIR Patient.identifier.system.
        study_instance_uid: The study's UID.
        series_instance_uid: The series' UID.
        sop_instance_uid: The object's UID.
        modality: ``CR`` or ``DX``.
        photometric_interpretation: ``MONOCHROME1`` or ``MONOCHROME2``.
        view_position: ``PA`` or ``AP``.
        study_at: StudyDate and StudyTime as an aware UTC datetime.
        birth_date: PatientBirthDate and Patient.birthDate.
        findings: The ground truth, one boolean per name of ``synthetic.FINDINGS``.
        clinical: The values as sampled, in canonical UCUM units (None: not sent).
        ucum_units: For each value sent, the UCUM unit it was sent in.
        stale: Names of the values sent with an effective time outside every lookback window.
        dicom: The Part 10 object (Explicit VR Little Endian).
        bundle: The FHIR R4 transaction Bundle, validated with the R4B models.
    """

    index: int
    patient_id: str
    issuer: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    photometric_interpretation: str
    view_position: str
    study_at: dt.datetime
    birth_date: dt.date
    findings: dict[str, bool]
    clinical: dict[str, Any]
    ucum_units: dict[str, str]
    stale: frozenset[str]
    dicom: bytes
    bundle: dict[str, Any]


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`generate_cohort` wrote.

    Attributes:
        out_dir: The cohort's folder.
        seed: The seed it was generated from.
        n: Number of patients (one study, one image and one Bundle each).
        size: Rows and columns of every image.
        dicom_dir: ``out_dir/dicom``.
        fhir_dir: ``out_dir/fhir``.
        labels_csv: ``out_dir/labels.csv``.
        cohort_json: ``out_dir/cohort.json``.
        counts: Patients per modality, photometric interpretation, view and positive finding; observations
            sent, sent in a non-canonical unit, and sent outside the lookback windows; conditions sent.
        seconds: Wall-clock time taken.
    """

    out_dir: Path
    seed: int
    n: int
    size: int
    dicom_dir: Path
    fhir_dir: Path
    labels_csv: Path
    cohort_json: Path
    counts: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class _Acquisition:
    """What the modality chose, all drawn whatever is overridden so that overrides leave the rest alone."""

    modality: str
    photometric_interpretation: str
    view_position: str
    cr_lut: tuple[float, float]
    cr_window: bool
    windows: list[tuple[float, float]]  # centre, width in MONOCHROME2 modality values; the first is the default
    kvp: int
    study_at: dt.datetime
    accession_number: str


def make_patient_case(
    rng_or_seed: np.random.Generator | int,
    *,
    index: int,
    size: int = 1024,
    modality: str | None = None,
    photometric_interpretation: str | None = None,
) -> PatientCase:
    """Build one synthetic patient in memory: findings, image, clinical values, a Part 10 object and a Bundle.

    With a seed the patient depends only on ``(seed, index)``, so patients can be made in any order. The image,
    the acquisition, the clinical values and the Bundle each draw from a stream of their own, so forcing the
    modality or the photometric interpretation leaves the patient, the image and the Bundle unchanged (the
    SOP Instance UID, and with the modality the Series Instance UID, change with them).

    Args:
        rng_or_seed: A non-negative seed, or a generator to draw from.
        index: The patient's position in its cohort; gives PatientID ``MRN-<index, 6 digits>``.
        size: Rows and columns of the image (at least 64; cohorts use at least 1024).
        modality: Force ``CR`` or ``DX`` instead of drawing it.
        photometric_interpretation: Force ``MONOCHROME1`` or ``MONOCHROME2`` instead of drawing it.

    Returns:
        The patient, its Part 10 object and its validated transaction Bundle.

    Raises:
        InvalidInput: An argument is out of range.
    """
    _non_negative(index, "index")
    if isinstance(rng_or_seed, np.random.Generator):
        rng = rng_or_seed
    else:
        rng = np.random.default_rng([_non_negative(int(rng_or_seed), "seed"), index])
    if size < MIN_CASE_IMAGE_SIZE:
        raise InvalidInput(f"'size' must be at least {MIN_CASE_IMAGE_SIZE}, got {size}")
    if modality is not None and modality not in MODALITIES:
        raise InvalidInput(f"'modality' must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if photometric_interpretation is not None and photometric_interpretation not in PHOTOMETRIC_INTERPRETATIONS:
        raise InvalidInput(
            f"'photometric_interpretation' must be one of {', '.join(PHOTOMETRIC_INTERPRETATIONS)},"
            f" got {photometric_interpretation!r}"
        )

    image_rng, acquisition_rng, clinical_rng, fhir_rng = rng.spawn(4)
    findings = sample_findings(image_rng)
    pixels = render_chest_radiograph(image_rng, findings, size=size)
    clinical = sample_clinical(clinical_rng, findings)
    acquisition = _draw_acquisition(acquisition_rng, pixels)
    uid_token = acquisition_rng.bytes(16).hex()
    chosen_modality = modality or acquisition.modality
    chosen_photometric = photometric_interpretation or acquisition.photometric_interpretation

    patient_id = f"MRN-{index:06d}"
    birth_date = acquisition.study_at.date() - dt.timedelta(days=round(float(clinical["age"]) * 365.2425))
    study_instance_uid = generate_uid(entropy_srcs=[GENERATOR_VERSION, uid_token, "study"])
    series_instance_uid = generate_uid(entropy_srcs=[GENERATOR_VERSION, uid_token, "series", chosen_modality])
    sop_instance_uid = generate_uid(
        entropy_srcs=[GENERATOR_VERSION, uid_token, "instance", chosen_modality, chosen_photometric]
    )
    dicom = _part10(
        pixels,
        acquisition,
        modality=chosen_modality,
        photometric_interpretation=chosen_photometric,
        patient_id=patient_id,
        sex=str(clinical["sex"]),
        birth_date=birth_date,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
    )
    bundle, ucum_units, stale = _bundle(
        fhir_rng,
        findings=findings,
        clinical=clinical,
        patient_id=patient_id,
        birth_date=birth_date,
        study_at=acquisition.study_at,
    )
    # Every Bundle we hand out is valid R4 (checked with the R4B models, wire-compatible for these resources).
    Bundle.model_validate(bundle)
    return PatientCase(
        index=index,
        patient_id=patient_id,
        issuer=ISSUER,
        study_instance_uid=str(study_instance_uid),
        series_instance_uid=str(series_instance_uid),
        sop_instance_uid=str(sop_instance_uid),
        modality=chosen_modality,
        photometric_interpretation=chosen_photometric,
        view_position=acquisition.view_position,
        study_at=acquisition.study_at,
        birth_date=birth_date,
        findings=findings,
        clinical=clinical,
        ucum_units=ucum_units,
        stale=stale,
        dicom=dicom,
        bundle=bundle,
    )


def generate_cohort(out_dir: Path, *, n: int, seed: int = 0, size: int = 1024, progress: bool = True) -> CohortSummary:
    """Write ``n`` synthetic patients as DICOM files and FHIR Bundles, with their labels.

    Args:
        out_dir: Folder to write; created if missing, refused if it holds anything.
        n: Number of patients (at least 1).
        seed: Non-negative seed; the same seed, n and size give byte-identical files.
        size: Rows and columns of the images (at least 1024).
        progress: Print progress lines to stderr.

    Returns:
        Counts and paths of what was written.

    Raises:
        InvalidInput: An argument is out of range, or ``out_dir`` is not an empty folder.
    """
    started = time.perf_counter()
    if n < 1:
        raise InvalidInput(f"'n' must be at least 1, got {n}")
    _non_negative(seed, "seed")
    if size < MIN_COHORT_IMAGE_SIZE:
        raise InvalidInput(f"'size' must be at least {MIN_COHORT_IMAGE_SIZE}, got {size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInput(f"'out_dir' {out_dir} must be an empty folder or not exist yet")
    dicom_dir, fhir_dir = out_dir / "dicom", out_dir / "fhir"
    fhir_dir.mkdir(parents=True)

    counts: dict[str, int] = {
        "patients": 0,
        "observations": 0,
        "observations_in_other_units": 0,
        "observations_outside_lookback": 0,
        "conditions": 0,
        **{f"modality_{modality}": 0 for modality in MODALITIES},
        **{f"photometric_{photometric}": 0 for photometric in PHOTOMETRIC_INTERPRETATIONS},
        **{f"view_{view}": 0 for view in VIEW_POSITIONS},
        **{f"finding_{name}": 0 for name in FINDINGS},
    }
    labels: list[list[str]] = []
    step = max(1, n // 10)
    for index in range(n):
        case = make_patient_case(seed, index=index, size=size)
        patient_dir = dicom_dir / case.patient_id
        patient_dir.mkdir(parents=True)
        (patient_dir / f"{case.sop_instance_uid}.dcm").write_bytes(case.dicom)
        (fhir_dir / f"{case.patient_id}.json").write_text(
            json.dumps(case.bundle, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        labels.append(
            [case.patient_id, case.study_instance_uid]
            + [str(int(case.findings[name])) for name in FINDINGS]
            + [case.modality, case.photometric_interpretation, case.view_position]
        )
        counts["patients"] += 1
        counts[f"modality_{case.modality}"] += 1
        counts[f"photometric_{case.photometric_interpretation}"] += 1
        counts[f"view_{case.view_position}"] += 1
        for name in FINDINGS:
            counts[f"finding_{name}"] += int(case.findings[name])
        counts["observations"] += len(case.ucum_units)
        counts["observations_in_other_units"] += sum(
            unit != OBSERVATION_KINDS[key].ucum_unit for key, unit in case.ucum_units.items()
        )
        counts["observations_outside_lookback"] += len(case.stale)
        counts["conditions"] += sum(entry["resource"]["resourceType"] == "Condition" for entry in case.bundle["entry"])
        if progress and ((index + 1) % step == 0 or index + 1 == n):
            print(f"cohort: {index + 1}/{n} patients", file=sys.stderr, flush=True)

    labels_csv = out_dir / "labels.csv"
    with labels_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["patient_id", "study_instance_uid", *FINDINGS, "modality", "photometric", "view"])
        writer.writerows(labels)
    counts = dict(sorted(counts.items()))
    cohort_json = out_dir / "cohort.json"
    description = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "issuer": ISSUER,
        "counts": counts,
    }
    cohort_json.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return CohortSummary(
        out_dir=out_dir,
        seed=seed,
        n=n,
        size=size,
        dicom_dir=dicom_dir,
        fhir_dir=fhir_dir,
        labels_csv=labels_csv,
        cohort_json=cohort_json,
        counts=counts,
        seconds=time.perf_counter() - started,
    )


def _non_negative(value: int, name: str) -> int:
    if value < 0:
        raise InvalidInput(f"'{name}' must be a non-negative integer, got {value}")
    return value


def _draw_acquisition(rng: np.random.Generator, pixels: np.ndarray) -> _Acquisition:
    # Every draw happens whatever the outcome of the others, so that forcing one choice changes nothing else.
    modality = "DX" if rng.random() < P_DX else "CR"
    photometric = "MONOCHROME1" if rng.random() < P_MONOCHROME1 else "MONOCHROME2"
    view = "AP" if rng.random() < P_AP else "PA"
    identity_lut = rng.random() < P_CR_IDENTITY_LUT
    lut_choice = int(rng.integers(len(_CR_MODALITY_LUTS)))
    cr_window = bool(rng.random() < P_CR_WINDOW)
    second_window = rng.random() < P_SECOND_WINDOW
    centre_shift, width_scale, narrow_scale = rng.uniform(-0.05, 0.05), rng.uniform(0.9, 1.25), rng.uniform(0.5, 0.7)
    kvp = int(rng.choice([80, 85, 90])) if view == "AP" else int(rng.choice([110, 115, 120, 125]))
    study_at = _STUDY_EPOCH + dt.timedelta(minutes=int(rng.integers(0, 365 * 24 * 60)))
    accession_number = f"ACC{int(rng.integers(0, 10**10)):010d}"

    # A window as the modality would store it: around the body's range of values.
    low, high = (float(v) for v in np.percentile(pixels[::4, ::4], (1.0, 99.5)))
    centre = round((low + high) / 2.0 + centre_shift * (high - low))
    width = max(2, round((high - low) * width_scale))
    windows = [(float(centre), float(width))]
    if second_window:
        windows.append((float(centre), float(max(2, round(width * narrow_scale)))))
    return _Acquisition(
        modality=modality,
        photometric_interpretation=photometric,
        view_position=view,
        cr_lut=(1.0, 0.0) if identity_lut else _CR_MODALITY_LUTS[lut_choice],
        cr_window=cr_window,
        windows=windows,
        kvp=kvp,
        study_at=study_at,
        accession_number=accession_number,
    )


def _part10(
    pixels: np.ndarray,
    acquisition: _Acquisition,
    *,
    modality: str,
    photometric_interpretation: str,
    patient_id: str,
    sex: str,
    birth_date: dt.date,
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> bytes:
    """The Part 10 object of one image: CR, or DX For Presentation with what its IOD requires."""
    monochrome1 = photometric_interpretation == "MONOCHROME1"
    # Modality values: the rendering (bright = dense) for MONOCHROME2; inverted for MONOCHROME1, where the lowest
    # value displays white, so that both display the same.
    values = MAX_PIXEL_VALUE - pixels.astype(np.float64) if monochrome1 else pixels.astype(np.float64)
    slope, intercept = acquisition.cr_lut if modality == "CR" else (1.0, 0.0)
    stored = np.rint((values - intercept) / slope).astype("<u2")
    if modality == "DX" or acquisition.cr_window:
        windows = [(MAX_PIXEL_VALUE - c if monochrome1 else c, w) for c, w in acquisition.windows]
    else:
        windows = []
    rows, columns = pixels.shape
    study_date = acquisition.study_at.strftime("%Y%m%d")
    study_time = acquisition.study_at.strftime("%H%M%S")
    view = acquisition.view_position

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SOP_CLASS_UIDS[modality])
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SOPClassUID = SOP_CLASS_UIDS[modality]
    ds.SOPInstanceUID = sop_instance_uid
    ds.TimezoneOffsetFromUTC = "+0000"
    # Patient
    ds.PatientName = f"Synthetic^Patient{patient_id.removeprefix('MRN-')}"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = ISSUER
    ds.PatientBirthDate = birth_date.strftime("%Y%m%d")
    ds.PatientSex = {"male": "M", "female": "F"}.get(sex, "O")
    # General Study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = acquisition.accession_number
    ds.StudyID = acquisition.accession_number[-6:]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"XR CHEST {view}"
    ds.PatientAge = f"{int(age_in_years(birth_date, acquisition.study_at.date())):03d}Y"
    # General Series (+ CR Series / DX Series)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = study_date
    ds.SeriesTime = study_time
    ds.SeriesDescription = f"CHEST {view}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "cohort"
    ds.SoftwareVersions = GENERATOR_VERSION
    # General Image
    ds.InstanceNumber = 1
    ds.ContentDate = study_date
    ds.ContentTime = study_time
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = study_time
    ds.PatientOrientation = ["L", "F"]  # displayed facing the patient: the patient's left on the image's right
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    # Acquisition
    ds.KVP = str(acquisition.kvp)
    ds.DistanceSourceToDetector = "1000" if view == "AP" else "1800"
    ds.ImagerPixelSpacing = [f"{430.0 / rows:.6f}", f"{430.0 / columns:.6f}"]  # a 43 cm detector
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]  # DX: value 3 present and empty
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        # MONOCHROME2 values grow with density, that is with less X-ray intensity at the detector.
        ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.ImageLaterality = "U"  # the chest is not a paired body part
        ds.PositionerType = "COLUMN"
        view_code = Dataset()
        view_code.CodeValue, view_code.CodeMeaning = _VIEW_CODES[view]
        view_code.CodingSchemeDesignator = "SCT"
        ds.ViewCodeSequence = [view_code]
        region = Dataset()
        region.CodeValue = "43799004"
        region.CodingSchemeDesignator = "SCT"
        region.CodeMeaning = "Chest"
        ds.AnatomicRegionSequence = [region]
        ds.AcquisitionContextSequence = []
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric_interpretation
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # Modality LUT
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "US"
    # VOI LUT (required for DX For Presentation)
    if windows:
        ds.WindowCenter = [f"{c:g}" for c, _ in windows]
        ds.WindowWidth = [f"{w:g}" for _, w in windows]
        ds.WindowCenterWidthExplanation = ["STANDARD", "NARROW"][: len(windows)]
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"

    buffer = io.BytesIO()
    # enforce_file_format: the 128-byte preamble, "DICM" and the File Meta Information (Part 10).
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _bundle(
    rng: np.random.Generator,
    *,
    findings: dict[str, bool],
    clinical: dict[str, Any],
    patient_id: str,
    birth_date: dt.date,
    study_at: dt.datetime,
) -> tuple[dict[str, Any], dict[str, str], frozenset[str]]:
    """The transaction Bundle of one patient, the UCUM unit each value was sent in, and the stale ones.

    Entries are PUTs with ids drawn from the seed, so sending a cohort twice updates rather than duplicates.
    """
    patient_uuid = _uuid(rng)
    patient_url = f"urn:uuid:{patient_uuid}"
    entries: list[dict[str, Any]] = [
        _entry(
            "Patient",
            patient_uuid,
            {
                "identifier": [
                    {
                        "use": "usual",
                        "type": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                    "code": "MR",
                                    "display": "Medical record number",
                                }
                            ]
                        },
                        "system": ISSUER,
                        "value": patient_id,
                    }
                ],
                "name": [
                    {"use": "official", "family": "Synthetic", "given": [f"Patient{patient_id.removeprefix('MRN-')}"]}
                ],
                "gender": clinical["sex"],
                "birthDate": birth_date.isoformat(),
            },
        )
    ]
    ucum_units: dict[str, str] = {}
    stale: set[str] = set()
    for key, kind in OBSERVATION_KINDS.items():
        # Drawn for every kind, sent or not, so that one missing value does not shift the others.
        resource_uuid = _uuid(rng)
        other_unit = rng.random() < P_OTHER_UNIT
        is_stale = rng.random() < P_STALE
        fresh_hours, stale_days = rng.uniform(*_FRESH_HOURS), rng.uniform(*_STALE_DAYS)
        arterial = rng.random() < P_SPO2_ARTERIAL
        panel = rng.random() < P_BLOOD_PRESSURE_PANEL
        diastolic_offset = rng.normal(0.0, 6.0)
        value = clinical.get(key)
        if value is None:
            continue
        unit = kind.other_unit if other_unit and kind.other_unit is not None else kind.ucum_unit
        effective = study_at - (dt.timedelta(days=stale_days) if is_stale else dt.timedelta(hours=fresh_hours))
        loinc, display = _SPO2_ARTERIAL if key == "spo2" and arterial else (kind.loinc, kind.display)
        quantity = _quantity(float(value), kind.ucum_unit, unit)
        resource: dict[str, Any] = {
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": _OBSERVATION_CATEGORY,
                            "code": kind.category,
                            "display": "Vital Signs" if kind.category == "vital-signs" else "Laboratory",
                        }
                    ]
                }
            ],
            "code": _loinc_concept(loinc, display),
            "subject": {"reference": patient_url},
            "effectiveDateTime": effective.isoformat(timespec="seconds"),
        }
        if key == "systolic_bp" and panel:
            # Many EHRs send systolic pressure only inside the blood-pressure panel.
            diastolic = float(min(round(float(value) * 0.62 + diastolic_offset), float(value) - 15.0))
            resource["code"] = _loinc_concept(*_BLOOD_PRESSURE_PANEL)
            resource["component"] = [
                {"code": _loinc_concept(loinc, display), "valueQuantity": quantity},
                {"code": _loinc_concept(*_DIASTOLIC), "valueQuantity": _quantity(diastolic, "mm[Hg]", "mm[Hg]")},
            ]
        else:
            resource["valueQuantity"] = quantity
        entries.append(_entry("Observation", resource_uuid, resource))
        ucum_units[key] = unit
        if is_stale:
            stale.add(key)

    heart_failure_probability = 0.45 if findings.get("cardiomegaly") or findings.get("pulmonary_edema") else 0.03
    for (code, display), probability in ((_HEART_FAILURE, heart_failure_probability), (_COPD, 0.08)):
        resource_uuid = _uuid(rng)
        present = rng.random() < probability
        years_before = rng.uniform(0.5, 10.0)
        if not present:
            continue
        onset = max(
            study_at - dt.timedelta(days=years_before * 365.2425),
            dt.datetime.combine(birth_date, dt.time(0), tzinfo=dt.UTC) + dt.timedelta(days=18 * 365),
        )
        entries.append(
            _entry(
                "Condition",
                resource_uuid,
                {
                    "clinicalStatus": _concept("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
                    "verificationStatus": _concept(
                        "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"
                    ),
                    "category": [
                        _concept(
                            "http://terminology.hl7.org/CodeSystem/condition-category",
                            "problem-list-item",
                            "Problem List Item",
                        )
                    ],
                    "code": _concept(SNOMED_SYSTEM, code, display),
                    "subject": {"reference": patient_url},
                    "onsetDateTime": onset.date().isoformat(),
                },
            )
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, ucum_units, frozenset(stale)


def _uuid(rng: np.random.Generator) -> uuid.UUID:
    return uuid.UUID(bytes=rng.bytes(16), version=4)


def _entry(resource_type: str, resource_uuid: uuid.UUID, body: dict[str, Any]) -> dict[str, Any]:
    resource_id = str(resource_uuid)
    return {
        "fullUrl": f"urn:uuid:{resource_id}",
        "resource": {"resourceType": resource_type, "id": resource_id, "meta": {"tag": [_TEST_DATA_TAG]}, **body},
        "request": {"method": "PUT", "url": f"{resource_type}/{resource_id}"},
    }


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display is not None:
        coding["display"] = display
    return {"coding": [coding]}


def _loinc_concept(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": LOINC_SYSTEM, "code": code, "display": display}], "text": display}


def _quantity(canonical: float, canonical_unit: str, unit: str) -> dict[str, Any]:
    """A valueQuantity in ``unit`` that converts back to ``canonical`` exactly (to 1e-9, relative)."""
    if unit == canonical_unit:
        value = canonical
    else:
        scale, offset = _OTHER_UNITS[unit]
        exact = canonical * scale + offset
        # The fewest decimals that still convert back: 98.96 °F rather than 98.96000000000001 °F.
        value = next(
            (
                rounded
                for rounded in (round(exact, digits) for digits in range(10))
                if math.isclose((rounded - offset) / scale, canonical, rel_tol=1e-9, abs_tol=1e-12)
            ),
            exact,
        )
    sent: float | int = int(value) if float(value).is_integer() and abs(value) < 1e15 else value
    return {"value": sent, "unit": _UNIT_DISPLAY[unit], "system": UCUM_SYSTEM, "code": unit}
