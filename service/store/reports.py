"""Reports and their findings: one report per study x model version (by unique constraint), with versions:
an analysis of instances that arrived after the report amends it."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, joinedload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from service.errors import NotFound
from service.schemas import Findings
from service.store import db
from service.store.tables import Finding, Job, Report, ReportVersion, Study, utcnow


def get(*, session: Session, report_id: str) -> Report | None:
    return session.scalar(select(Report).options(selectinload(Report.findings)).where(Report.id == report_id))


def get_or_raise(*, session: Session, report_id: str) -> Report:
    report = get(session=session, report_id=report_id)
    if report is None:
        raise NotFound(f"report {report_id} not found")
    return report


def for_study(*, session: Session, study: Study) -> list[Report]:
    """The study's reports with their findings, in one SELECT (a study has a report per model: a few rows)."""
    return list(
        session.scalars(
            select(Report)
            .options(joinedload(Report.findings))
            .where(Report.study_id == study.id)
            .order_by(Report.created_at, Report.id)
        ).unique()
    )


def for_studies(*, session: Session, studies: Iterable[Study]) -> dict[int, list[Report]]:
    """``for_study`` of several studies in one SELECT, by study id (a study without a report is left out)."""
    ids = [study.id for study in studies]
    if not ids:
        return {}
    found: dict[int, list[Report]] = {}
    for report in session.scalars(
        select(Report)
        .options(joinedload(Report.findings))
        .where(Report.study_id.in_(ids))
        .order_by(Report.created_at, Report.id)
    ).unique():
        found.setdefault(report.study_id, []).append(report)
    return found


def for_patient(*, session: Session, patient_id: int, limit: int = 100, offset: int = 0) -> list[Report]:
    return list(
        session.scalars(
            select(Report)
            .options(selectinload(Report.findings))
            .where(Report.patient_id == patient_id)
            .order_by(Report.created_at.desc())
            .limit(limit)
            .offset(offset)
        )
    )


def _version_row(report: Report, job: Job, findings: Findings) -> ReportVersion:
    return ReportVersion(
        report_id=report.id,
        version=report.version,
        job_id=job.id,
        status=report.status,
        findings=findings.model_dump(mode="json"),
    )


def _model_values(findings: Findings) -> dict[str, object]:
    """The columns of a report version that come from its findings (the model, its inputs, the instance read)."""
    return {
        "model_sha256": findings.model.sha256,
        "execution_provider": findings.model.execution_provider,
        "intended_use": findings.model.intended_use,
        "source_sop_instance_uid": findings.source_sop_instance_uid,
        "clinical_inputs": [value.model_dump(mode="json") for value in findings.clinical_inputs],
        "missing_inputs": list(findings.missing_inputs),
    }


def _add_findings(session: Session, report: Report, findings: Findings) -> list[Finding]:
    rows = [
        Finding(
            report_id=report.id,
            position=position,
            system=finding.system,
            code=finding.code,
            display=finding.display,
            probability=finding.probability,
            threshold=finding.threshold,
            positive=finding.positive,
        )
        for position, finding in enumerate(findings.findings)
    ]
    session.add_all(rows)
    return rows


def create_once(
    *, session: Session, job: Job, study: Study, findings: Findings, dicom_requested_at: dt.datetime | None = None
) -> tuple[Report, bool]:
    """Store the outcome of a job as the report's first version, or as an amended version when the job is a
    later revision (new instances arrived after the report). A task delivered twice, or an older revision
    finishing late, changes nothing.

    The first version is inserted straight away, unless the study x model version has its report already
    (``db.insert_unless_clash``); only then is that report read (locked) and amended or left alone.

    Args:
        dicom_requested_at: When the version this call stores is to get its DICOM results (``dicom_state``
            "pending"); given here so that the version's INSERT or UPDATE carries it, not an UPDATE of its own.

    Returns:
        (the report, True when this call created it or added a version).
    """
    report = db.insert_unless_clash(
        session,
        Report,
        id=str(uuid.uuid4()),
        study_id=study.id,
        job_id=job.id,
        patient_id=study.patient_id,
        model_name=findings.model.name,
        model_version=findings.model.version,
        status="preliminary",
        version=1,
        dicom_state=_dicom_state(dicom_requested_at),
        dicom_requested_at=dicom_requested_at,
        **_model_values(findings),
    )
    if report is not None:
        set_committed_value(report, "findings", _add_findings(session, report, findings))  # known, in order
        session.add(_version_row(report, job, findings))
        return report, True
    existing = session.scalar(
        select(Report)
        .where(
            Report.study_id == study.id, Report.model_name == job.model_name, Report.model_version == job.model_version
        )
        .with_for_update()
    )
    assert existing is not None
    if existing.job_id == job.id or session.scalar(select(ReportVersion.id).where(ReportVersion.job_id == job.id)):
        return existing, False
    current_job = session.get(Job, existing.job_id)
    if current_job is not None and current_job.revision >= job.revision:
        return existing, False
    session.execute(delete(Finding).where(Finding.report_id == existing.id))
    session.flush()
    existing.version += 1
    existing.status = "amended"
    existing.job_id = job.id
    existing.patient_id = study.patient_id
    existing.sr_sop_instance_uid = None
    existing.heatmap_sop_instance_uid = None
    existing.dicom_state = _dicom_state(dicom_requested_at)
    existing.dicom_error = None
    existing.dicom_requested_at = dicom_requested_at
    existing.updated_at = utcnow()
    for name, value in _model_values(findings).items():
        setattr(existing, name, value)
    _add_findings(session, existing, findings)
    session.flush()
    session.add(_version_row(existing, job, findings))
    session.flush()
    session.expire(existing, ["findings"])
    return existing, True


def _dicom_state(requested_at: dt.datetime | None) -> str | None:
    return "pending" if requested_at is not None else None
