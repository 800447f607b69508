"""Test data made by the tests: synthetic chest radiographs as real DICOM, FHIR Bundles, multipart bodies."""

from __future__ import annotations

import datetime as dt
import io
import uuid
from typing import Any

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.training.synthetic import render_chest_radiograph, sample_clinical

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _part10(
    sop_class: str, *, sop_uid: str | None, study_uid: str | None, series_uid: str | None, patient_id: str
) -> FileDataset:
    """A Part 10 dataset (Explicit VR Little Endian) of ``sop_class`` with its UIDs (new ones where None)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    return ds


def dx_instance(
    *,
    patient_id: str = "MRN-1001",
    issuer: str | None = "urn:oid:1.2.3.4.5",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    findings: dict[str, bool] | None = None,
    size: int = 512,
    seed: int = 0,
    study_date: dt.date = dt.date(2026, 11, 20),
    modality: str = "DX",
    body_part: str = "CHEST",
    instance_number: int = 1,
) -> bytes:
    """A Part 10 Digital X-Ray object with a procedurally rendered chest radiograph (12 bits stored)."""
    rng = np.random.default_rng(seed)
    pixels = render_chest_radiograph(rng, findings or {"pneumonia": True}, size=size)
    ds = _part10(DX_SOP_CLASS, sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid, patient_id=patient_id)
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.PatientName = "Synthetic^Test"
    ds.PatientBirthDate = "19580301"
    ds.PatientSex = "M"
    ds.StudyDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = "093000"
    ds.AccessionNumber = "ACC" + uuid.uuid4().hex[:8]
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart_related(parts: list[bytes], *, content_type: str = "application/dicom") -> tuple[bytes, str]:
    boundary = "clinfer-" + uuid.uuid4().hex
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


_LOINC = {
    "temperature": ("8310-5", "Body temperature", "Cel"),
    "heart_rate": ("8867-4", "Heart rate", "/min"),
    "respiratory_rate": ("9279-1", "Respiratory rate", "/min"),
    "spo2": ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%"),
    "leukocytes": ("6690-2", "Leukocytes [#/volume] in Blood", "10*3/uL"),
    "crp": ("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "mg/L"),
    "nt_probnp": ("33762-6", "NT-proBNP", "pg/mL"),
    "systolic_bp": ("8480-6", "Systolic blood pressure", "mm[Hg]"),
}


def observation(
    patient_full_url: str, key: str, value: float, *, unit: str | None = None, at: dt.datetime | None = None
) -> dict[str, Any]:
    code, display, canonical = _LOINC[key]
    unit = unit or canonical
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
            "subject": {"reference": patient_full_url},
            "effectiveDateTime": (at or dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)).isoformat(),
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        },
        "request": {"method": "POST", "url": "Observation"},
    }


def patient_bundle(
    *,
    patient_id: str = "MRN-1001",
    issuer: str = "urn:oid:1.2.3.4.5",
    bundle_type: str = "transaction",
    values: dict[str, float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A transaction Bundle: a Patient with its MRN and vitals/labs; CRP sent in mg/dL to exercise conversion."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    if values is None:
        facts = sample_clinical(np.random.default_rng(seed), {"pneumonia": True}, age_years=68.0)
        values = {k: v for k, v in facts.items() if k in _LOINC and v is not None}
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": patient_url,
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": issuer, "value": patient_id}],
                "gender": "male",
                "birthDate": "1958-03-01",
            },
            "request": {"method": "POST", "url": "Patient"},
        }
    ]
    for key, value in values.items():
        if key == "crp":
            entries.append(observation(patient_url, key, round(value / 10.0, 3), unit="mg/dL"))
        else:
            entries.append(observation(patient_url, key, value))
    return {"resourceType": "Bundle", "type": bundle_type, "entry": entries}


def queued_job(runtime: Any) -> tuple[str, str]:
    """A chest radiograph stored and its analysis requested (the caller has stopped ``queue.send``): (its Study
    Instance UID, the id of its cxr-fusion job, queued)."""
    from service.flows import analysis, ingest
    from service.schemas import SYSTEM_PRINCIPAL

    study_uid = generate_uid()
    ingest.store_instance(
        runtime, dx_instance(study_uid=study_uid, size=256), principal=SYSTEM_PRINCIPAL, part=1, protocol="test"
    )
    [job] = analysis.request_analysis(
        runtime, study_instance_uid=study_uid, principal=SYSTEM_PRINCIPAL, trigger="request"
    ).jobs
    return study_uid, str(job.id)


def reported_job_id(runtime: Any) -> str:
    """A chest radiograph stored, analyzed and reported through the stage functions themselves (the caller has
    stopped ``queue.send``): the id of its cxr-fusion job."""
    from service.flows import analysis

    _, job_id = queued_job(runtime)
    analysis.preprocess_job(runtime, job_id)
    analysis.infer_job(runtime, job_id)
    return job_id


def image_instance(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "MRN-1001",
    modality: str = "OT",
) -> bytes:
    """A Part 10 Secondary Capture of exactly these pixels: (rows, columns) unsigned 16-bit grayscale, or
    (rows, columns, 3) 8-bit RGB; ``rescale`` is (slope, intercept), ``window`` (center, width)."""
    secondary_capture = "1.2.840.10008.5.1.4.1.1.7"
    ds = _part10(secondary_capture, sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid, patient_id=patient_id)
    ds.PatientName = "Synthetic^Ramp"
    ds.StudyDate = "20261120"
    ds.Modality = modality
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape[:2]
    if pixels.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
