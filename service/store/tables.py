"""SQLAlchemy 2 tables. Uniqueness lives here, as database constraints."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite hands back naive values otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dict[str, Any] | None: JSON}


# SQLite only auto-increments INTEGER PRIMARY KEY; BigInteger elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64), unique=True, comment="FHIR Patient.id")
    gender: Mapped[str | None] = mapped_column(String(16))
    birth_date: Mapped[dt.date | None] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)

    identifiers: Mapped[list[PatientIdentifier]] = relationship(back_populates="patient")


class PatientIdentifier(Base):
    __tablename__ = "patient_identifiers"
    __table_args__ = (UniqueConstraint("system", "value", name="uq_patient_identifier"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    system: Mapped[str] = mapped_column(String(255), default="", comment="'' when the identifier has no system")
    value: Mapped[str] = mapped_column(String(255))

    patient: Mapped[Patient] = relationship(back_populates="identifiers")


class FhirResource(Base):
    """Every FHIR resource taken in, as received (ids assigned), for read and search."""

    __tablename__ = "fhir_resources"
    __table_args__ = (UniqueConstraint("resource_type", "resource_id", name="uq_fhir_resource"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="SET NULL"), index=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    deleted: Mapped[bool] = mapped_column(default=False, server_default=false(), comment="read answers 410 Gone")
    origin: Mapped[str] = mapped_column(
        String(16), default="received", server_default="received", comment="received | result (ours: read-only)"
    )


class FhirResourceVersion(Base):
    """Every version of every FHIR resource (vread, history); the current one is also in fhir_resources."""

    __tablename__ = "fhir_resource_versions"
    __table_args__ = (UniqueConstraint("resource_type", "resource_id", "version", name="uq_fhir_resource_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any] | None] = mapped_column(JSON, comment="None for a deletion")
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)


class FhirSearchValue(Base):
    """One search parameter value of a current FHIR resource, extracted on write (token, reference, string, date)."""

    __tablename__ = "fhir_search_values"
    __table_args__ = (
        Index("ix_fhir_search_token", "param", "value"),
        Index("ix_fhir_search_date", "param", "date_start"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    resource_pk: Mapped[int] = mapped_column(ForeignKey("fhir_resources.id", ondelete="CASCADE"), index=True)
    param: Mapped[str] = mapped_column(String(64))
    system: Mapped[str | None] = mapped_column(String(255))
    value: Mapped[str | None] = mapped_column(String(255), comment="token code, reference Type/id, lower-case string")
    date_start: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    date_end: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="SET NULL"), index=True)
    dicom_patient_id: Mapped[str | None] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    last_instance_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    analysis_requested_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    order_resource_id: Mapped[str | None] = mapped_column(
        String(64), comment="the FHIR ServiceRequest ordering its AI read, when one is linked"
    )
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str | None] = mapped_column(String(16))
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    view_position: Mapped[str | None] = mapped_column(String(16))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16), comment="DIMSE sender; None for STOW-RS")
    origin: Mapped[str] = mapped_column(
        String(16), default="received", server_default="received", comment="received | result (ours: SR, heatmap)"
    )
    blob_key: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Observation(Base):
    """A normalized clinical observation (value in the canonical UCUM unit when known)."""

    __tablename__ = "observations"
    __table_args__ = (UniqueConstraint("resource_id", name="uq_observation_resource"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    resource_id: Mapped[str] = mapped_column(String(80), comment="Observation id, or <id>#<LOINC> for a component")
    loinc: Mapped[str] = mapped_column(String(16), index=True)
    value: Mapped[float] = mapped_column(Float)
    ucum_unit: Mapped[str] = mapped_column(String(32))
    original_value: Mapped[float] = mapped_column(Float)
    original_unit: Mapped[str] = mapped_column(String(32))
    effective_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(String(32))


class Condition(Base):
    __tablename__ = "conditions"
    __table_args__ = (UniqueConstraint("resource_id", name="uq_condition_resource"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    resource_id: Mapped[str] = mapped_column(String(64))
    system: Mapped[str | None] = mapped_column(String(255))
    code: Mapped[str | None] = mapped_column(String(64))
    display: Mapped[str | None] = mapped_column(String(255))
    clinical_status: Mapped[str | None] = mapped_column(String(32))
    onset_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)


class Job(Base):
    """One analysis of one study by one model version: the source of truth for the pipeline."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "model_name", "model_version", "revision", name="uq_job_study_model_revision"),
        Index("ix_jobs_state_updated", "state", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    revision: Mapped[int] = mapped_column(
        Integer, default=1, server_default="1", comment="1, then +1 for each analysis of new instances (amendment)"
    )
    rule: Mapped[str | None] = mapped_column(String(64), comment="the routing rule that created the job")
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), comment="the instance the model reads")
    destinations: Mapped[list[Any]] = mapped_column(
        JSON, default=list, server_default=text("'[]'"), comment="where its results are pushed"
    )
    state: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str] = mapped_column(String(16), default="enqueue")
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    timings: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, comment="per-stage timestamps (epoch seconds) and durations, for latency breakdowns"
    )
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class Report(Base):
    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("study_id", "model_name", "model_version", name="uq_report_study_model"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="SET NULL"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    model_sha256: Mapped[str] = mapped_column(String(64))
    execution_provider: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="preliminary", comment="preliminary | amended")
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    source_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    clinical_inputs: Mapped[list[Any]] = mapped_column(JSON)
    missing_inputs: Mapped[list[Any]] = mapped_column(JSON)
    intended_use: Mapped[str] = mapped_column(Text)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), comment="the DICOM SR of this version")
    heatmap_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), comment="its Secondary Capture")
    dicom_state: Mapped[str | None] = mapped_column(
        String(16), comment="DICOM results of the current version: pending | stored | failed; None: not made"
    )
    dicom_error: Mapped[str | None] = mapped_column(Text)
    dicom_requested_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)

    findings: Mapped[list[Finding]] = relationship(back_populates="report", order_by="Finding.position")


class Finding(Base):
    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("report_id", "code", name="uq_finding_report_code"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    system: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(String(32))
    display: Mapped[str] = mapped_column(String(128))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column()

    report: Mapped[Report] = relationship(back_populates="findings")


class ReportVersion(Base):
    """Every version of a report as it was issued (the current one included): the report's history."""

    __tablename__ = "report_versions"
    __table_args__ = (UniqueConstraint("report_id", "version", name="uq_report_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    findings: Mapped[dict[str, Any]] = mapped_column(JSON, comment="schemas.Findings as JSON")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)


class Delivery(Base):
    """One push of one report version's DICOM results to one destination, retried with back-off."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("report_id", "report_version", "destination", name="uq_delivery"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    report_version: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending", comment="pending | delivered | failed")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class AuditHead(Base):
    """The chain's head: one row, locked by every append so that appends are serialized."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_hash: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class AuditEvent(Base):
    """Append-only, hash-chained audit log shaped after FHIR AuditEvent / IHE BALP."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(1), comment="FHIR AuditEvent.action: C R U D E")
    outcome: Mapped[str] = mapped_column(String(2), comment="FHIR AuditEvent.outcome: 0 4 8 12")
    actor: Mapped[str] = mapped_column(String(255))
    actor_role: Mapped[str | None] = mapped_column(String(32))
    source_address: Mapped[str | None] = mapped_column(String(64))
    entity_type: Mapped[str | None] = mapped_column(String(32))
    entity_ref: Mapped[str | None] = mapped_column(String(255), index=True)
    patient_ref: Mapped[str | None] = mapped_column(String(255), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
