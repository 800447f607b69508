"""Jobs: one per study x model version x revision, the source of truth of the pipeline."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.schemas import JobStage, JobState
from service.store import db
from service.store.tables import Job, Patient, Study, utcnow

ACTIVE_STATES = (JobState.queued.value, JobState.preprocessing.value, JobState.inferring.value)


def get(*, session: Session, job_id: str, for_update: bool = False) -> Job | None:
    """``for_update`` locks the row until the transaction ends (PostgreSQL; SQLite serializes writers anyway)."""
    return session.get(Job, job_id, with_for_update=for_update, populate_existing=for_update)


def get_or_raise(*, session: Session, job_id: str, for_update: bool = False) -> Job:
    job = get(session=session, job_id=job_id, for_update=for_update)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def get_with_study(
    *, session: Session, job_id: str, for_update: bool = False, lock_study: bool = False
) -> tuple[Job, Study, Patient | None]:
    """A job with its study and the study's patient (None when not joined to one), in one SELECT; ``for_update``
    locks the job's row (as :func:`get`), and ``lock_study`` the study's too (a job that finishes settles the
    study's status: see :func:`other_states`). Hold the patient while the transaction asks for it again
    (``clinical.patient_resource_id``): the session finds it then without a SELECT.

    Raises:
        NotFound: no such job.
    """
    query = (
        select(Job, Study, Patient)
        .join(Study, Study.id == Job.study_id)
        .outerjoin(Patient, Patient.id == Study.patient_id)
        .where(Job.id == job_id)
    )
    if for_update:
        query = query.with_for_update(of=[Job, Study] if lock_study else Job).execution_options(populate_existing=True)
    row = session.execute(query).first()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return row[0], row[1], row[2]


def advance(
    *, session: Session, job_id: str, from_state: JobState, state: JobState, stage: JobStage, timings: dict[str, Any]
) -> bool:
    """Move a job on from ``from_state`` in one UPDATE that takes effect only while the job is still there (no
    SELECT ... FOR UPDATE first): its state, stage and timings (the whole dict, as the caller last read it and
    added to it). False, and nothing written, when another delivery moved the job meanwhile.
    """
    moved = session.execute(
        _ADVANCE,
        {
            "job_id": job_id,
            "from_state": from_state.value,
            "state": state.value,
            "stage": stage.value,
            "timings": timings,
            "updated_at": utcnow(),
        },
    )
    return moved.first() is not None


_JOBS = cast(Table, Job.__table__)
_ADVANCE = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"), _JOBS.c.state == bindparam("from_state"))
    .values(
        state=bindparam("state"),
        stage=bindparam("stage"),
        timings=bindparam("timings", type_=_JOBS.c.timings.type),
        updated_at=bindparam("updated_at", type_=_JOBS.c.updated_at.type),
    )
    .returning(_JOBS.c.id)
)


def latest(*, session: Session, study: Study, model_name: str, model_version: str) -> Job | None:
    """The newest revision of a study x model version's job."""
    return session.scalar(
        select(Job)
        .where(Job.study_id == study.id, Job.model_name == model_name, Job.model_version == model_version)
        .order_by(Job.revision.desc())
        .limit(1)
    )


def get_or_create(
    *,
    session: Session,
    study: Study,
    model_name: str,
    model_version: str,
    revision: int = 1,
    priority: int = 5,
    rule: str | None = None,
    sop_instance_uid: str | None = None,
    destinations: list[str] | None = None,
    enqueued_at: dt.datetime | None = None,
    timings: dict[str, Any] | None = None,
    created_at: dt.datetime | None = None,
) -> tuple[Job, bool]:
    """The job of a study x model version x revision; the unique constraint makes a racing second request
    return the first job. The caller asks for a revision it found no job of, so the INSERT is tried first (one that
    does nothing on a clash: no savepoint to send and release) and the SELECT is made only when it clashed.

    Args:
        enqueued_at, timings: a new job's, written in its INSERT (not for a job that already existed).
        created_at: a new job's creation time (default now): the moment of the request that made it, against
            which instances received later count as newer.

    Returns:
        (the job, True when this call created it).
    """
    created = db.insert_unless_clash(
        session,
        Job,
        id=str(uuid.uuid4()),
        study_id=study.id,
        model_name=model_name,
        model_version=model_version,
        revision=revision,
        rule=rule,
        sop_instance_uid=sop_instance_uid,
        destinations=list(destinations or []),
        state=JobState.queued.value,
        stage=JobStage.enqueue.value,
        priority=priority,
        enqueued_at=enqueued_at,
        timings=timings,
        created_at=created_at or utcnow(),
    )
    if created is not None:
        return created, True
    found = session.scalar(
        select(Job).where(
            Job.study_id == study.id,
            Job.model_name == model_name,
            Job.model_version == model_version,
            Job.revision == revision,
        )
    )
    assert found is not None
    return found, False


def for_study(*, session: Session, study: Study) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.created_at)))


def for_studies(*, session: Session, studies: Iterable[Study]) -> dict[int, list[Job]]:
    """``for_study`` of several studies in one SELECT, by study id (a study without jobs left out)."""
    ids = [study.id for study in studies]
    found: dict[int, list[Job]] = {}
    if ids:
        for job in session.scalars(select(Job).where(Job.study_id.in_(ids)).order_by(Job.created_at, Job.id)):
            found.setdefault(job.study_id, []).append(job)
    return found


def other_states(*, session: Session, study: Study, job_id: str) -> list[tuple[str, str, int, str]]:
    """The study's jobs but ``job_id``, each as (model name, model version, revision, state), in one SELECT.

    A job that finishes settles its study's status from them. Lock the study's row first (``lock_study``, or
    ``session.get(Study, ..., with_for_update=True)``) and ask after the lock is held, in a statement of its own:
    two jobs of one study finishing at once then settle it one after the other, the second seeing the first
    committed, instead of each seeing the other still running and neither settling it.
    """
    rows = session.execute(
        select(Job.model_name, Job.model_version, Job.revision, Job.state).where(
            Job.study_id == study.id, Job.id != job_id
        )
    )
    return [(name, version, revision, state) for name, version, revision, state in rows]


def study_with_states(*, session: Session, study_instance_uid: str) -> tuple[Study, Patient | None, list[str]]:
    """A study, its patient (None when not joined to one) and the states of its jobs, in one SELECT (made by every
    look of a client waiting for a report, and by the one that reads it).

    Raises:
        NotFound: no such study.
    """
    rows = session.execute(
        select(Study, Patient, Job.state)
        .outerjoin(Patient, Patient.id == Study.patient_id)
        .outerjoin(Job, Job.study_id == Study.id)
        .where(Study.study_instance_uid == study_instance_uid)
    ).all()
    if not rows:
        raise NotFound(f"study {study_instance_uid} not found")
    return rows[0][0], rows[0][1], [state for _, _, state in rows if state is not None]


def lost(*, session: Session, older_than: dt.datetime, limit: int = 100) -> list[Job]:
    """Active jobs untouched since ``older_than``: committed but lost by the broker or a dead worker. Locked, and
    those another transaction holds (another sweeper's claim, a stage's store) left out: the caller claims them
    (moves ``updated_at`` on) in its transaction, so that two sweepers never send one job again twice."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.state.in_(ACTIVE_STATES), Job.updated_at < older_than)
            .order_by(Job.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def claim_lost(
    *, session: Session, job: Job, older_than: dt.datetime, now: dt.datetime, timings: dict[str, Any]
) -> bool:
    """Claim a job :func:`lost` found, to send it again: its ``updated_at`` moved to ``now`` (and its timings
    written) in one UPDATE that takes effect only while it is still active and untouched since ``older_than``.
    False when another sweeper claimed it first, or a stage moved it meanwhile (SQLite, whose SELECT locks nothing,
    relies on this)."""
    claimed = session.execute(
        update(_JOBS)
        .where(_JOBS.c.id == job.id, _JOBS.c.state.in_(ACTIVE_STATES), _JOBS.c.updated_at < older_than)
        .values(updated_at=now, timings=timings)
        .returning(_JOBS.c.id)
    )
    return claimed.first() is not None


def count_by_state(*, session: Session) -> dict[str, int]:
    """How many jobs are in each state (the states no job is in left out), in one SELECT."""
    rows = session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state))
    return {state: int(count) for state, count in rows}


def list_with_studies(
    *, session: Session, state: JobState | None = None, limit: int = 100, offset: int = 0
) -> list[tuple[Job, Study]]:
    """The newest jobs first (``state`` only, when given), each with its study, in one SELECT."""
    query = select(Job, Study).join(Study, Study.id == Job.study_id)
    if state is not None:
        query = query.where(Job.state == state.value)
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)
    return [(job, study) for job, study in session.execute(query)]


__all__ = [
    "ACTIVE_STATES",
    "advance",
    "count_by_state",
    "for_studies",
    "for_study",
    "get",
    "get_or_create",
    "get_or_raise",
    "get_with_study",
    "latest",
    "list_with_studies",
    "lost",
    "other_states",
    "study_with_states",
]
