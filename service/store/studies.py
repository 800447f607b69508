"""Studies, series and instances: DICOM metadata rows (pixel data lives in the blob store)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable

from sqlalchemy import and_, exists, false, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.errors import Conflict, NotFound
from service.schemas import NormalizedInstance, StudyStatus
from service.store import db
from service.store.tables import FhirResource, FhirSearchValue, Instance, Patient, Series, Study, utcnow

ORDER_STATUSES_IN_FORCE = ("active", "completed")
"""The FHIR R4 ServiceRequest statuses of an AI-read order that has a study analyzed: ``active`` (in force) and
``completed`` (fulfilled, not withdrawn: an ordering system may close the order once the images are taken, before our
read). ``draft`` (not ready), ``on-hold`` (suspended), ``revoked``, ``entered-in-error`` and ``unknown`` do not."""


def get(*, session: Session, study_instance_uid: str, for_update: bool = False) -> Study | None:
    """A study; ``for_update`` locks its row until the transaction ends (and reads it afresh)."""
    query = select(Study).where(Study.study_instance_uid == study_instance_uid)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    return session.scalar(query)


def get_or_raise(*, session: Session, study_instance_uid: str, for_update: bool = False) -> Study:
    study = get(session=session, study_instance_uid=study_instance_uid, for_update=for_update)
    if study is None:
        raise NotFound(f"study {study_instance_uid} not found")
    return study


def get_with_patient_or_raise(
    *, session: Session, study_instance_uid: str, for_update: bool = False
) -> tuple[Study, Patient | None]:
    """A study and its patient (None when not joined to one) in one SELECT. Hold the patient while the transaction
    asks for it again (``clinical.patient_resource_id``): the session finds it then without a SELECT.

    Args:
        for_update: lock the study's row (not the patient's) until the transaction ends, and read it afresh.

    Raises:
        NotFound: no such study.
    """
    query = (
        select(Study, Patient)
        .outerjoin(Patient, Patient.id == Study.patient_id)
        .where(Study.study_instance_uid == study_instance_uid)
    )
    if for_update:
        query = query.with_for_update(of=Study).execution_options(populate_existing=True)
    row = session.execute(query).first()
    if row is None:
        raise NotFound(f"study {study_instance_uid} not found")
    return row[0], row[1]


def link_keys(
    *,
    patient_ids: Iterable[str | None] = (),
    accession_numbers: Iterable[str | None] = (),
    study_uids: Iterable[str | None] = (),
) -> list[str]:
    """The keys (``db.serialize_on``) that serialize the joins of studies to patients and orders on what they are
    joined by (DICOM PatientID, accession number, Study Instance UID): a new study looking for its patient and
    order, and a FHIR write looking for the studies of its Patient's identifiers or of its order, each lock them
    before they look. Then one of two such transactions sees what the other committed, instead of both missing it
    (the study would stay unlinked)."""
    keys = [f"patient-id:{v}" for v in patient_ids if v]
    keys += [f"accession:{v}" for v in accession_numbers if v]
    keys += [f"study:{v}" for v in study_uids if v]
    return keys


def get_instance(*, session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def get_instances(*, session: Session, sop_instance_uids: Iterable[str]) -> dict[str, Instance]:
    """The stored instances among ``sop_instance_uids``, by UID, in one SELECT."""
    wanted = list(dict.fromkeys(sop_instance_uids))
    if not wanted:
        return {}
    return {
        row.sop_instance_uid: row
        for row in session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(wanted)))
    }


def study_of(*, session: Session, instance: Instance) -> Study:
    """The study of an instance (from the session when it was loaded there: no SELECT)."""
    series = session.get(Series, instance.series_id)
    assert series is not None
    study = session.get(Study, series.study_id)
    assert study is not None
    return study


def _study_values(meta: NormalizedInstance) -> dict[str, object]:
    return {
        "study_instance_uid": meta.study_instance_uid,
        "dicom_patient_id": meta.patient_id,
        "issuer_of_patient_id": meta.issuer_of_patient_id,
        "study_date": meta.study_date,
        "study_time": meta.study_time,
        "accession_number": meta.accession_number,
        "description": meta.study_description,
        "status": StudyStatus.receiving.value,
    }


def _series_values(study: Study, meta: NormalizedInstance) -> dict[str, object]:
    return {
        "study_id": study.id,
        "series_instance_uid": meta.series_instance_uid,
        "modality": meta.modality,
        "body_part_examined": meta.body_part_examined,
        "series_description": meta.series_description,
        "series_number": meta.series_number,
    }


def _get_series(session: Session, series_instance_uid: str) -> Series | None:
    return session.scalar(select(Series).where(Series.series_instance_uid == series_instance_uid))


class SeriesOfAnotherStudy(Conflict):
    """An instance whose series is already stored under another study: filed there, it would be shown, analyzed
    and reported as part of a study its own header does not name."""


def add_instance(
    *,
    session: Session,
    meta: NormalizedInstance,
    blob_key: str,
    size_bytes: int,
    sha256: str,
    calling_ae_title: str | None = None,
    origin: str = "received",
    checked_absent: bool = False,
    patient_of_new_study: Callable[[], Patient | None] | None = None,
) -> tuple[Instance, bool]:
    """Record one stored instance; idempotent on SOP Instance UID.

    A received instance restarts the study's completeness clock (and reopens a reported study, so that it is
    analyzed again and its reports amended); our own results (origin "result") do not.

    The rows that are missing (study, series, instance) are each inserted unless another request stored the same
    meanwhile (``db.insert_unless_clash``: no savepoint), and then found: a new study costs a SELECT and three
    INSERTs, an instance of a known series two SELECTs and an INSERT.

    Args:
        checked_absent: the caller looked the instance up in this transaction and did not find it; an instance
            stored meanwhile by another request is still found (by the unique constraint).
        patient_of_new_study: when the study is new, called for the patient it belongs to, whose id then goes
            in the study's INSERT rather than in an UPDATE after it.

    Returns:
        (the instance row, True when it was new).
    """
    if not checked_absent:
        existing = get_instance(session=session, sop_instance_uid=meta.sop_instance_uid)
        if existing is not None:
            return existing, False
    # a received instance locks its study: an analysis request (which locks it too) then either sees the instance
    # or ran before it, and the instance is stamped after that request (see _received_stamp)
    lock = origin == "received"
    study = get(session=session, study_instance_uid=meta.study_instance_uid, for_update=lock)
    study_created = False
    if study is None:
        patient = patient_of_new_study() if patient_of_new_study is not None else None
        study = db.insert_unless_clash(
            session, Study, **_study_values(meta), patient_id=patient.id if patient is not None else None
        )
        study_created = study is not None
        if study is None:  # another request created it meanwhile
            study = get_or_raise(session=session, study_instance_uid=meta.study_instance_uid, for_update=lock)
    received_at = _received_stamp(study) if lock and not study_created else utcnow()
    # a new study has no series yet, unless its series UID is (wrongly) another study's: then the INSERT clashes
    series = _get_series(session, meta.series_instance_uid) if not study_created else None
    if series is None:
        series = db.insert_unless_clash(session, Series, **_series_values(study, meta))
        if series is None:  # created meanwhile, or another study's
            series = _get_series(session, meta.series_instance_uid)
            assert series is not None
    if series.study_id != study.id:
        raise SeriesOfAnotherStudy(
            f"series in another study: SeriesInstanceUID {meta.series_instance_uid} is stored already under"
            f" another StudyInstanceUID than {meta.study_instance_uid}; a series belongs to one study only"
        )
    instance = db.insert_unless_clash(
        session,
        Instance,
        series_id=series.id,
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        transfer_syntax_uid=meta.transfer_syntax_uid,
        instance_number=meta.instance_number,
        rows=meta.rows,
        columns=meta.columns,
        photometric_interpretation=meta.photometric_interpretation,
        number_of_frames=meta.number_of_frames,
        view_position=meta.view_position,
        manufacturer=meta.manufacturer,
        calling_ae_title=calling_ae_title,
        origin=origin,
        blob_key=blob_key,
        size_bytes=size_bytes,
        sha256=sha256,
        received_at=received_at,
    )
    if instance is None:  # stored meanwhile by another request
        found = get_instance(session=session, sop_instance_uid=meta.sop_instance_uid)
        assert found is not None
        return found, False
    # held by the instance, so that study_of finds them in the session (its identity map holds rows weakly)
    set_committed_value(instance, "series", series)
    set_committed_value(series, "study", study)
    if origin == "received":
        if not study_created:  # a new study's clock started when it was created, a moment ago
            study.last_instance_at = received_at
        if study.status in _REOPENED:
            study.status = StudyStatus.receiving.value
            study.status_reason = None
    return instance, True


_REOPENED = (StudyStatus.reported.value, StudyStatus.no_route.value, StudyStatus.failed.value)


def _received_stamp(study: Study) -> dt.datetime:
    """The arrival time of an instance of a study whose row this transaction has locked: now, and always after the
    study's last analysis request (whose jobs were created at that moment), even when the request's host clock ran
    ahead; so the study is due again (``stable_unanalyzed``) and the instance counts as newer than those jobs."""
    now = utcnow()
    requested = study.analysis_requested_at
    if requested is not None and now <= requested:
        return requested + dt.timedelta(microseconds=1)
    return now


def instances_of(*, session: Session, study: Study, origin: str | None = None) -> list[tuple[Series, Instance]]:
    """The study's instances by series; ``origin`` "received" leaves out our own results."""
    query = (
        select(Series, Instance)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .order_by(Series.id, Instance.instance_number, Instance.id)
    )
    if origin is not None:
        query = query.where(Instance.origin == origin)
    rows = session.execute(query)
    return [(series, instance) for series, instance in rows]


def count_instances(*, session: Session, study: Study) -> int:
    return (
        session.scalar(
            select(func.count(Instance.id))
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study.id)
        )
        or 0
    )


def stable_unanalyzed(
    *,
    session: Session,
    stable_before: dt.datetime,
    ordered_only: bool = False,
    after: tuple[dt.datetime, int] | None = None,
    limit: int = 100,
) -> list[Study]:
    """Studies whose last received instance arrived before ``stable_before`` and after their last analysis
    request (or that were never analyzed); with ``ordered_only``, only those linked to an AI-read order that is in
    force now (``ORDER_STATUSES_IN_FORCE``, not deleted). The order's current status is checked here too, not only
    when it is written: a study linked while its order was withdrawn in a concurrent transaction, or an analyzed
    study (which keeps its link) receiving more images after its order was revoked, is not analyzed on its account.

    Oldest first, by (last_instance_at, id); ``after`` is the last such pair of the previous page."""
    query = select(Study).where(
        Study.last_instance_at < stable_before,
        or_(Study.analysis_requested_at.is_(None), Study.analysis_requested_at < Study.last_instance_at),
    )
    if ordered_only:
        status_in_force = exists().where(
            FhirSearchValue.resource_pk == FhirResource.id,
            FhirSearchValue.param == "status",
            FhirSearchValue.value.in_(ORDER_STATUSES_IN_FORCE),
        )
        order_in_force = exists().where(
            FhirResource.resource_type == "ServiceRequest",
            FhirResource.resource_id == Study.order_resource_id,
            FhirResource.deleted == false(),
            status_in_force,
        )
        query = query.where(Study.order_resource_id.is_not(None), order_in_force)
    if after is not None:
        query = query.where(
            or_(
                Study.last_instance_at > after[0],
                and_(Study.last_instance_at == after[0], Study.id > after[1]),
            )
        )
    return list(session.scalars(query.order_by(Study.last_instance_at, Study.id).limit(limit)))


def by_accession(*, session: Session, accession_number: str, patient_id: int | None) -> list[Study]:
    """The studies with this accession number joined to this patient (``patients.id``, an order's subject).

    An accession number is unique only within the system that issued it: another site's study (another patient)
    may carry the same one. A study not joined to a patient is found only with ``patient_id`` None, which no order
    written through the FHIR API has (its subject is required)."""
    query = select(Study).where(
        Study.accession_number == accession_number, Study.patient_id.is_not_distinct_from(patient_id)
    )
    return list(session.scalars(query.order_by(Study.id)))


def unlink_order(*, session: Session, order_resource_id: str) -> int:
    """Unlink an AI-read order (revoked, deleted, ...) from the studies it ordered that were not analyzed yet, so
    that an order-only route does not analyze them. An analyzed study keeps the link: its report stays, ``basedOn``
    the order it was made for. Returns how many studies were unlinked."""
    result = session.execute(
        update(Study)
        .where(Study.order_resource_id == order_resource_id, Study.analysis_requested_at.is_(None))
        .values(order_resource_id=None)
        .execution_options(synchronize_session="fetch")
    )
    return int(getattr(result, "rowcount", 0) or 0)


def unlinked_for_patient_ids(*, session: Session, dicom_patient_ids: list[str]) -> list[Study]:
    """Studies not joined to a patient whose DICOM PatientID is one of these."""
    if not dicom_patient_ids:
        return []
    query = select(Study).where(Study.patient_id.is_(None), Study.dicom_patient_id.in_(dicom_patient_ids))
    return list(session.scalars(query.order_by(Study.id)))


def list_studies(*, session: Session, limit: int = 100, offset: int = 0) -> list[Study]:
    return list(session.scalars(select(Study).order_by(Study.id.desc()).limit(limit).offset(offset)))


def search(
    *,
    session: Session,
    study_instance_uid: str | None = None,
    patient_id: str | None = None,
    accession_number: str | None = None,
    date_from: dt.date | None = None,
    date_to: dt.date | None = None,
    modality: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Study]:
    """QIDO-RS study search. ``patient_id`` may end in ``*`` (prefix match); other matches are exact."""
    query = select(Study)
    if study_instance_uid:
        query = query.where(Study.study_instance_uid.in_(study_instance_uid.split(",")))
    if patient_id:
        if patient_id.endswith("*"):
            query = query.where(Study.dicom_patient_id.startswith(patient_id[:-1], autoescape=True))
        else:
            query = query.where(Study.dicom_patient_id == patient_id)
    if accession_number:
        query = query.where(Study.accession_number == accession_number)
    if date_from:
        query = query.where(Study.study_date >= date_from)
    if date_to:
        query = query.where(Study.study_date <= date_to)
    if modality:
        query = query.where(Study.id.in_(select(Series.study_id).where(Series.modality == modality)))
    return list(session.scalars(query.order_by(Study.id).limit(limit).offset(offset)))


def series_of(*, session: Session, study: Study) -> list[tuple[Series, int]]:
    """The series of a study with their instance counts."""
    rows = session.execute(
        select(Series, func.count(Instance.id))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .group_by(Series.id)
        .order_by(Series.series_number, Series.id)
    )
    return [(series, count) for series, count in rows]


def instance_counts(*, session: Session, studies: Iterable[Study]) -> dict[int, int]:
    """``count_instances`` of several studies in one SELECT, by study id (a study without instances left out)."""
    ids = [study.id for study in studies]
    if not ids:
        return {}
    rows = session.execute(
        select(Series.study_id, func.count(Instance.id))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(ids))
        .group_by(Series.study_id)
    )
    return {study_id: int(count) for study_id, count in rows}


def modalities_of(*, session: Session, studies: Iterable[Study]) -> dict[int, list[str]]:
    """The modalities of what each study received (our own results, SR and heatmap, left out), by study id, in
    one SELECT."""
    ids = [study.id for study in studies]
    if not ids:
        return {}
    rows = session.execute(
        select(Series.study_id, Series.modality)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(ids), Instance.origin == "received", Series.modality.is_not(None))
        .distinct()
    )
    found: dict[int, list[str]] = {}
    for study_id, modality in rows:
        found.setdefault(study_id, []).append(str(modality))
    return {study_id: sorted(modalities) for study_id, modalities in found.items()}


def get_series(*, session: Session, study: Study, series_instance_uid: str) -> Series | None:
    return session.scalar(
        select(Series).where(Series.study_id == study.id, Series.series_instance_uid == series_instance_uid)
    )


def instances_of_series(*, session: Session, series: Series) -> list[Instance]:
    return list(
        session.scalars(
            select(Instance).where(Instance.series_id == series.id).order_by(Instance.instance_number, Instance.id)
        )
    )
