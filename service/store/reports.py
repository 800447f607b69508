"""Reports and their findings: one report per study x model version, by unique constraint."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from service.errors import NotFound
from service.schemas import Findings
from service.store.tables import Finding, Job, Report, Study


def get(*, session: Session, report_id: str) -> Report | None:
    return session.scalar(select(Report).options(selectinload(Report.findings)).where(Report.id == report_id))


def get_or_raise(*, session: Session, report_id: str) -> Report:
    report = get(session=session, report_id=report_id)
    if report is None:
        raise NotFound(f"report {report_id} not found")
    return report


def for_study(*, session: Session, study: Study) -> list[Report]:
    return list(
        session.scalars(
            select(Report)
            .options(selectinload(Report.findings))
            .where(Report.study_id == study.id)
            .order_by(Report.created_at)
        )
    )


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


def create_once(*, session: Session, job: Job, study: Study, findings: Findings) -> tuple[Report, bool]:
    """Store the report of a job; if it already exists (a task delivered twice), return the existing one.

    Returns:
        (the report, True when this call created it).
    """
    query = select(Report).where(
        Report.study_id == study.id, Report.model_name == job.model_name, Report.model_version == job.model_version
    )
    existing = session.scalar(query)
    if existing is not None:
        return existing, False
    try:
        with session.begin_nested():
            report = Report(
                id=str(uuid.uuid4()),
                study_id=study.id,
                job_id=job.id,
                patient_id=study.patient_id,
                model_name=findings.model.name,
                model_version=findings.model.version,
                model_sha256=findings.model.sha256,
                execution_provider=findings.model.execution_provider,
                intended_use=findings.model.intended_use,
                status="preliminary",
                source_sop_instance_uid=findings.source_sop_instance_uid,
                clinical_inputs=[value.model_dump(mode="json") for value in findings.clinical_inputs],
                missing_inputs=list(findings.missing_inputs),
            )
            session.add(report)
            session.flush()
            for position, finding in enumerate(findings.findings):
                session.add(
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
                )
        return report, True
    except IntegrityError:
        found = session.scalar(query)
        assert found is not None
        return found, False
