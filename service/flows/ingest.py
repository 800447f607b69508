"""Ingest flows: DICOM instances and FHIR Bundles made durable, joined to patients and audited."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from service import metrics
from service.errors import InvalidInput
from service.flows import orders
from service.flows.runtime import Runtime
from service.ingest import dicom
from service.schemas import NormalizedInstance, Principal
from service.store import audit, clinical, db, studies
from service.store.tables import Patient, Study

log = logging.getLogger(__name__)

FAILURE_DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.4 C.4.2.1.4: same SOP Instance UID, different content


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    new: bool


@dataclass(frozen=True)
class FailedInstance:
    part: int
    failure_reason: int
    message: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    transient: bool = False
    """the database or the blob store failed (not the object): the same object may be stored on a later try"""


@dataclass
class StoreOutcome:
    stored: list[StoredInstance] = field(default_factory=list)
    failed: list[FailedInstance] = field(default_factory=list)


def _link_study(session: Session, study: Study) -> Patient | None:
    """Join a study to the patient its DICOM PatientID (+ issuer) identifies; returns that patient, if any."""
    if study.patient_id is not None:
        return None
    patient = _patient_of_dicom_id(session, study.dicom_patient_id, study.issuer_of_patient_id)
    if patient is not None:
        study.patient_id = patient.id
    return patient


def _patient_of_dicom_id(session: Session, patient_id: str | None, issuer: str | None) -> Patient | None:
    """The patient a DICOM PatientID (+ IssuerOfPatientID) identifies, if any."""
    if not patient_id:
        return None
    return clinical.find_patient_by_identifier(session=session, system=issuer, value=patient_id)


class _NewStudyPatient:
    """The same rule for a study being created (``studies.add_instance``'s ``patient_of_new_study``): the patient
    goes in the study's INSERT, and is held here for the audit that follows."""

    def __init__(self, session: Session, meta: NormalizedInstance) -> None:
        self.session, self.meta = session, meta
        self.patient: Patient | None = None

    def __call__(self) -> Patient | None:
        meta = self.meta
        # before looking for its patient here and its order (orders.order_for_new_study) after the INSERT
        keys = studies.link_keys(
            patient_ids=[meta.patient_id],
            accession_numbers=[meta.accession_number],
            study_uids=[meta.study_instance_uid],
        )
        db.serialize_on(self.session, keys)
        self.patient = _patient_of_dicom_id(self.session, meta.patient_id, meta.issuer_of_patient_id)
        return self.patient

    def of(self, study: Study) -> Patient | None:
        """The patient found, when the study is the one created with it (not one another request made first)."""
        return self.patient if self.patient is not None and self.patient.id == study.patient_id else None


def _stored_before(
    stored_sha256: str, meta: NormalizedInstance, sha256: str, *, part: int, protocol: str
) -> StoredInstance | FailedInstance:
    """The answer for an object whose SOP Instance UID is stored already (with ``stored_sha256``): a duplicate when
    the bytes are the same, else a refusal (the stored object stays as it is)."""
    if stored_sha256 == sha256:
        metrics.INGEST_INSTANCES.labels(protocol, "duplicate").inc()
        return StoredInstance(
            meta.sop_class_uid, meta.sop_instance_uid, meta.study_instance_uid, meta.series_instance_uid, new=False
        )
    metrics.INGEST_INSTANCES.labels(protocol, "rejected").inc()
    return FailedInstance(
        part,
        FAILURE_DUPLICATE_SOP_INSTANCE,
        "an instance with this SOP Instance UID and different content is already stored",
        meta.sop_class_uid,
        meta.sop_instance_uid,
    )


def _failed(meta: NormalizedInstance, error: Exception, *, part: int, protocol: str) -> FailedInstance:
    """The answer for an object that could not be stored: when the database or the disk failed for a moment,
    "Refused: Out of Resources" (0xA700), which senders try again later; otherwise a processing failure."""
    metrics.INGEST_INSTANCES.labels(protocol, "failed").inc()
    if db.is_transient(error):
        return FailedInstance(
            part,
            dicom.FAILURE_OUT_OF_RESOURCES,
            "the instance could not be stored for now (the database or the disk is unavailable); send it again",
            meta.sop_class_uid,
            meta.sop_instance_uid,
            transient=True,
        )
    return FailedInstance(
        part, dicom.FAILURE_PROCESSING, "the instance could not be stored", meta.sop_class_uid, meta.sop_instance_uid
    )


def _blob_committed(runtime: Runtime, sop_instance_uid: str, blob_key: str) -> bool:
    try:
        with runtime.sessions() as session:
            stored = studies.get_instance(session=session, sop_instance_uid=sop_instance_uid)
            return stored is not None and stored.blob_key == blob_key
    except Exception:  # the database is unreachable: keep the file (an orphan costs space, a lost object more)
        log.warning("cannot tell whether instance %s is stored; its file is kept", sop_instance_uid)
        return True


def store_instance(
    runtime: Runtime,
    data: bytes,
    *,
    principal: Principal,
    part: int,
    protocol: str,
    study_instance_uid: str | None = None,
    calling_ae_title: str | None = None,
    origin: str = "received",
) -> StoredInstance | FailedInstance:
    """Make one DICOM object durable (blob written, rows committed, audit appended) before it is acknowledged.

    Args:
        runtime: the process's resources.
        data: the Part 10 object.
        principal: who sent it.
        part: its position in the request (1-based), for the failure report.
        protocol: "stow-rs" or "dimse", for metrics and audit.
        study_instance_uid: when the request targets one study, objects of another study are refused.
        calling_ae_title: the DIMSE sender, kept for routing rules.
        origin: "received", or "result" for the DICOM results we make ourselves (they never start an analysis).
    """
    try:
        parsed = dicom.parse_instance(data, max_pixels=runtime.settings.max_decoded_pixels)
    except dicom.DicomRejected as e:
        metrics.INGEST_INSTANCES.labels(protocol, "rejected").inc()
        return FailedInstance(part, e.failure_reason, e.message, e.sop_class_uid, e.sop_instance_uid)
    meta = parsed.meta
    if study_instance_uid is not None and meta.study_instance_uid != study_instance_uid:
        metrics.INGEST_INSTANCES.labels(protocol, "rejected").inc()
        return FailedInstance(
            part,
            dicom.FAILURE_DOES_NOT_MATCH,
            f"StudyInstanceUID {meta.study_instance_uid} does not match the target study {study_instance_uid}",
            meta.sop_class_uid,
            meta.sop_instance_uid,
        )
    sha256 = hashlib.sha256(data).hexdigest()
    # named by its content too: two requests storing different objects under one SOP Instance UID at the same
    # moment never write the same file, so the one whose row is committed keeps the bytes its sha256 describes
    blob_key = (
        f"instances/{meta.study_instance_uid}/{meta.series_instance_uid}/{meta.sop_instance_uid}.{sha256[:16]}.dcm"
    )
    with runtime.sessions() as session:  # one session: the duplicate check, then (after the blob) the rows
        try:
            existing = studies.get_instance(session=session, sop_instance_uid=meta.sop_instance_uid)
            if existing is None:
                runtime.blobs.put_bytes(blob_key, data)  # in memory already: written in one call
        except Exception as e:  # nothing written (the blob store writes a file whole or not at all)
            log.exception("storing instance of part %d failed", part)
            return _failed(meta, e, part=part, protocol=protocol)
        if existing is not None:
            return _stored_before(existing.sha256, meta, sha256, part=part, protocol=protocol)
        new_study_patient = _NewStudyPatient(session, meta)
        try:
            instance, new = studies.add_instance(
                session=session,
                meta=meta,
                blob_key=blob_key,
                size_bytes=len(data),
                sha256=sha256,
                calling_ae_title=calling_ae_title,
                origin=origin,
                checked_absent=True,
                patient_of_new_study=new_study_patient,
            )
            if not new:  # stored meanwhile by another request: the same object, or a conflicting one
                stored_key, stored_sha256 = instance.blob_key, instance.sha256
                session.rollback()
                if stored_key != blob_key:
                    runtime.blobs.delete(blob_key)  # ours alone: the committed row names another file
                return _stored_before(stored_sha256, meta, sha256, part=part, protocol=protocol)
            study = studies.study_of(session=session, instance=instance)
            # held, so that the audit below finds it without a SELECT
            patient = new_study_patient.of(study) or _link_study(session, study)
            if origin == "received":
                orders.order_for_new_study(session, study)
            audit.append(
                session=session,
                principal=principal,
                event_type="dicom.store",
                action="C",
                entity_type="ImagingStudy",
                entity_ref=f"study:{meta.study_instance_uid}",
                patient_ref=f"Patient/{patient.resource_id}"
                if patient is not None
                else clinical.patient_reference(session=session, patient_id=study.patient_id),
                detail={
                    "protocol": protocol,
                    "sop_instance_uid": meta.sop_instance_uid,
                    "sop_class_uid": meta.sop_class_uid,
                    "bytes": len(data),
                },
            )
            session.commit()
        except Exception as e:
            # nothing half-written: the rows roll back, so the blob must go too, unless a row another request
            # committed names it (the same object, stored at the same moment); when such a row is committed
            # while the file goes, the file is written again (here, or by that request: below)
            session.rollback()
            if not isinstance(e, studies.SeriesOfAnotherStudy):
                log.exception("storing instance of part %d failed", part)
            if not _blob_committed(runtime, meta.sop_instance_uid, blob_key):
                runtime.blobs.delete(blob_key)
                if _blob_committed(runtime, meta.sop_instance_uid, blob_key):
                    runtime.blobs.put_bytes(blob_key, data)
            if isinstance(e, studies.SeriesOfAnotherStudy):
                metrics.INGEST_INSTANCES.labels(protocol, "rejected").inc()
                return FailedInstance(
                    part, dicom.FAILURE_CANNOT_UNDERSTAND, e.message, meta.sop_class_uid, meta.sop_instance_uid
                )
            return _failed(meta, e, part=part, protocol=protocol)
    if not runtime.blobs.exists(blob_key):  # removed by a failed store of the same object at the same moment
        runtime.blobs.put_bytes(blob_key, data)
    metrics.INGEST_INSTANCES.labels(protocol, "stored").inc()
    metrics.INGEST_BYTES.labels(protocol).inc(len(data))
    return StoredInstance(
        meta.sop_class_uid, meta.sop_instance_uid, meta.study_instance_uid, meta.series_instance_uid, new=True
    )


def store_instances(
    runtime: Runtime,
    parts: Iterable[tuple[int, bytes | str]],
    *,
    principal: Principal,
    protocol: str,
    study_instance_uid: str | None = None,
) -> StoreOutcome:
    """Store each part on its own: a bad part fails alone, the good ones of the same request are kept.

    A part given as a str is one that could not be read as DICOM at all (the str says why).
    """
    outcome = StoreOutcome()
    for part, data in parts:
        if isinstance(data, str):
            outcome.failed.append(FailedInstance(part, dicom.FAILURE_CANNOT_UNDERSTAND, data))
            metrics.INGEST_INSTANCES.labels(protocol, "rejected").inc()
            continue
        result = store_instance(
            runtime, data, principal=principal, part=part, protocol=protocol, study_instance_uid=study_instance_uid
        )
        (outcome.stored if isinstance(result, StoredInstance) else outcome.failed).append(result)  # type: ignore[arg-type]
    return outcome


# --- FHIR ---------------------------------------------------------------------------------------------------


def upsert_patient(session: Session, facts: Any) -> Patient:
    """Find the patient by resource id or any identifier; create it when new. Identifiers never move patients."""
    patient, stored = clinical.patient_and_identifier_rows(
        session=session, resource_id=facts.resource_id, identifiers=facts.identifiers
    )
    if patient is None:
        matches = {row.patient_id for row in stored.values()}
        if len(matches) > 1:
            raise InvalidInput(
                f"Patient/{facts.resource_id}: its identifiers belong to {len(matches)} different patients"
            )
        patient = next(row.patient for row in stored.values()) if matches else None
    if patient is None:
        patient = Patient(resource_id=facts.resource_id, gender=facts.gender, birth_date=facts.birth_date)
        session.add(patient)
        session.flush()
    patient.gender = facts.gender
    patient.birth_date = facts.birth_date
    clinical.add_identifiers(session=session, patient=patient, identifiers=facts.identifiers, stored=stored)
    session.flush()
    # studies that arrived before their patient: the same rule as for a new study (_link_study)
    values = list(dict.fromkeys(identifier.value for identifier in facts.identifiers))
    for study in studies.unlinked_for_patient_ids(session=session, dicom_patient_ids=values):
        _link_study(session, study)
    return patient


def resolve_patient(session: Session, ref: str, in_bundle: dict[str, Patient]) -> Patient:
    if ref in in_bundle:
        return in_bundle[ref]
    if ref.startswith("Patient/"):
        patient = clinical.get_patient(session=session, resource_id=ref.removeprefix("Patient/"))
        if patient is not None:
            return patient
    elif ref.startswith("identifier:"):
        system, _, value = ref.removeprefix("identifier:").partition("|")
        patient = clinical.find_patient_by_identifier(session=session, system=system or None, value=value)
        if patient is not None:
            return patient
    raise InvalidInput(f"subject {ref} does not resolve to a known Patient")
