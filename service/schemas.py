"""Pydantic types that cross layers."""

from __future__ import annotations

import datetime as dt
import enum

from pydantic import BaseModel, Field


class JobState(enum.StrEnum):
    queued = "queued"
    preprocessing = "preprocessing"
    inferring = "inferring"
    succeeded = "succeeded"
    failed = "failed"


class JobStage(enum.StrEnum):
    """Where a job is, or where it failed."""

    enqueue = "enqueue"
    preprocess = "preprocess"
    infer = "infer"
    postprocess = "postprocess"
    store = "store"


class StudyStatus(enum.StrEnum):
    receiving = "receiving"
    analyzing = "analyzing"
    reported = "reported"
    no_route = "no-route"
    failed = "failed"


class NormalizedInstance(BaseModel):
    """The metadata of one DICOM instance that the service keeps in rows (no pixel data, no names)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    patient_birth_date: dt.date | None = None
    patient_sex: str | None = None
    study_date: dt.date | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    view_position: str | None = None
    rows: int | None = None
    columns: int | None = None
    photometric_interpretation: str | None = None
    number_of_frames: int = 1
    manufacturer: str | None = None


class PatientIdentifier(BaseModel):
    system: str = Field(default="", description="FHIR identifier system or DICOM IssuerOfPatientID; '' if none")
    value: str


class PatientFacts(BaseModel):
    """A FHIR Patient reduced to what we join and compute on."""

    resource_id: str
    identifiers: list[PatientIdentifier]
    gender: str | None = None
    birth_date: dt.date | None = None


class ObservationFact(BaseModel):
    """One Observation value (or one component value of a panel): its LOINC code, value, unit, time and status.

    ``value``/``ucum_unit`` are in the canonical UCUM unit of the LOINC code where ingest has one (for search and
    comparison), else as sent. Models do not read them: pre-processing converts ``original_value`` from
    ``original_unit`` to the unit of each model's manifest.
    """

    resource_id: str = Field(description='the Observation id; "<id>#<LOINC>" for a further component of a panel')
    patient_ref: str = Field(description="the Bundle's reference to its subject (fullUrl, Patient/id, or identifier)")
    loinc: str
    value: float
    ucum_unit: str
    original_value: float
    original_unit: str
    effective_at: dt.datetime | None
    status: str


class ConditionFact(BaseModel):
    resource_id: str
    patient_ref: str
    system: str | None
    code: str | None
    display: str | None
    clinical_status: str | None
    onset_at: dt.datetime | None


class ClinicalValue(BaseModel):
    """A clinical input as it was fed to a model, and the Observation it came from."""

    feature: str
    loinc: str | None = None
    value: float | None = Field(description="in the manifest's unit (`unit`), converted from the original")
    unit: str | None
    effective_at: dt.datetime | None = None
    missing: bool
    reason: str | None = Field(default=None, description="why missing: no value, outside lookback, unconvertible")
    source: str | None = Field(default=None, description='the resource that supplied the value: "Observation/<id>"')
    original_value: float | None = Field(default=None, description="the value as the Observation sent it")
    original_unit: str | None = Field(default=None, description="the unit the Observation sent it in")


class ClinicalContext(BaseModel):
    """The clinical data of one patient, available at one study date."""

    gender: str | None = None
    birth_date: dt.date | None = None
    observations: list[ObservationFact] = Field(default_factory=list)


class FindingResult(BaseModel):
    code: str
    system: str = "http://snomed.info/sct"
    display: str
    probability: float
    threshold: float
    positive: bool


class ModelIdentity(BaseModel):
    name: str
    version: str
    sha256: str
    execution_provider: str
    intended_use: str


class Findings(BaseModel):
    """What post-processing returns for one study and one model."""

    model: ModelIdentity
    findings: list[FindingResult]
    clinical_inputs: list[ClinicalValue]
    missing_inputs: list[str]
    source_sop_instance_uid: str


class Principal(BaseModel):
    """Who is acting: a token's subject and role, or the service itself."""

    subject: str
    role: str | None = None
    scopes: frozenset[str] = frozenset()
    source_address: str | None = None
    patient: str | None = Field(default=None, description="FHIR Patient id of a SMART patient-level launch")


SYSTEM_PRINCIPAL = Principal(subject="clinfer", role="system")
