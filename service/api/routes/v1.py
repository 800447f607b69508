"""The native JSON API under /v1: studies, analysis, reports, jobs, models, audit."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api import auth
from service.api.deps import RuntimeDep, audit_search, require
from service.errors import InvalidInput, NotFound
from service.flows import analysis, results
from service.results import reports as report_results
from service.routing.rules import QUEUE_PRIORITY, Priority
from service.schemas import JobState, Principal
from service.store import audit, clinical, db, fhir_store, jobs, reports, studies
from service.store.tables import Delivery, Job, Report, Study

router = APIRouter(prefix="/v1", tags=["native"])

StudyReadDep = Annotated[Principal, Depends(require("ImagingStudy", "r"))]
AnalyzeDep = Annotated[Principal, Depends(require("ServiceRequest", "c"))]
ReportReadDep = Annotated[Principal, Depends(require("DiagnosticReport", "r"))]
JobReadDep = Annotated[Principal, Depends(require("Task", "r"))]
DeliveryRetryDep = Annotated[Principal, Depends(require("Task", "u"))]
ModelReadDep = Annotated[Principal, Depends(require("Device", "r"))]
AuditReadDep = Annotated[Principal, Depends(require("AuditEvent", "s"))]


def job_json(job: Job, study_instance_uid: str | None = None) -> dict[str, Any]:
    return {
        "id": job.id,
        "study_instance_uid": study_instance_uid,
        "model": job.model_name,
        "version": job.model_version,
        "revision": job.revision,
        "rule": job.rule,
        "priority": "stat" if job.priority == QUEUE_PRIORITY[Priority.stat] else "routine",
        "reads": job.sop_instance_uid,
        "destinations": list(job.destinations or []),
        "state": job.state,
        "stage": job.stage,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "attempts": job.attempts,
        "timings": job.timings,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
    }


def report_summary_json(report: Report) -> dict[str, Any]:
    return {
        "id": report.id,
        "model": report.model_name,
        "model_version": report.model_version,
        "status": report.status,
        "version": report.version,
        "positive_findings": [f.display for f in report.findings if f.positive],
    }


def study_json(
    session: Any,
    study: Study,
    *,
    modalities: list[str],
    instances: int,
    study_jobs: list[Job],
    reports_of: list[Report] | None,
) -> dict[str, Any]:
    """A study as the worklist shows it; ``reports_of`` None: the caller may not read reports (left out)."""
    return {
        "study_instance_uid": study.study_instance_uid,
        "status": study.status,
        "status_reason": study.status_reason,
        "patient": clinical.patient_reference(session=session, patient_id=study.patient_id),
        "dicom_patient_id": study.dicom_patient_id,
        "issuer_of_patient_id": study.issuer_of_patient_id,
        "accession_number": study.accession_number,
        "description": study.description,
        "modalities": modalities,
        "study_date": study.study_date.isoformat() if study.study_date else None,
        "instances": instances,
        "last_instance_at": study.last_instance_at.isoformat(),
        "jobs": [job_json(j, study.study_instance_uid) for j in study_jobs],
        "reports": None if reports_of is None else [report_summary_json(r) for r in reports_of],
    }


def studies_json(session: Any, rows: list[Study], principal: Principal) -> tuple[list[dict[str, Any]], list[str]]:
    """``study_json`` of each study, what they hold read in one SELECT each (patients, instance counts, modalities,
    jobs, reports), whatever the number of studies; the reports' positive findings only for a principal who may
    read DiagnosticReports (user/ or system/ scopes).

    Returns:
        (the studies, the ids of the reports they disclose, for the audit event).
    """
    clinical.remember_patients(session=session, patient_ids=[s.patient_id for s in rows])
    counts = studies.instance_counts(session=session, studies=rows)
    modalities = studies.modalities_of(session=session, studies=rows)
    study_jobs = jobs.for_studies(session=session, studies=rows)
    may_read_reports = auth.allows(principal, "DiagnosticReport", "r", patient_scopes=False)
    found = reports.for_studies(session=session, studies=rows) if may_read_reports else {}
    bodies = [
        study_json(
            session,
            s,
            modalities=modalities.get(s.id, []),
            instances=counts.get(s.id, 0),
            study_jobs=study_jobs.get(s.id, []),
            reports_of=found.get(s.id, []) if may_read_reports else None,
        )
        for s in rows
    ]
    return bodies, sorted(r.id for of_study in found.values() for r in of_study)


@router.get("/studies")
def list_studies(
    runtime: RuntimeDep,
    principal: StudyReadDep,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=fhir_store.MAX_OFFSET),
) -> dict[str, Any]:
    with runtime.sessions.begin() as session:
        rows = studies.list_studies(session=session, limit=limit, offset=offset)
        body, disclosed_reports = studies_json(session, rows, principal)
        audit_search(
            session,
            principal,
            event_type="study.search",
            entity_type="ImagingStudy",
            entity_ref="studies",
            found=rows,
            detail={"results": len(rows), "reports": disclosed_reports[:100]},
        )
        return {"studies": body}


@router.get("/studies/{study_instance_uid}")
def get_study(study_instance_uid: str, runtime: RuntimeDep, principal: StudyReadDep) -> dict[str, Any]:
    with runtime.sessions.begin() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=study_instance_uid)
        [body], disclosed_reports = studies_json(session, [study], principal)
        audit.append(
            session=session,
            principal=principal,
            event_type="study.read",
            action="R",
            entity_type="ImagingStudy",
            entity_ref=f"study:{study_instance_uid}",
            patient_ref=clinical.patient_reference(session=session, patient_id=study.patient_id),
            detail={"reports": disclosed_reports},
        )
        return body


@router.post("/studies/{study_instance_uid}/analyze", status_code=202)
async def analyze_study(study_instance_uid: str, runtime: RuntimeDep, principal: AnalyzeDep) -> dict[str, Any]:
    result = await run_in_threadpool(
        lambda: analysis.request_analysis(
            runtime, study_instance_uid=study_instance_uid, principal=principal, trigger="request"
        )
    )
    return {
        "study_instance_uid": result.study_instance_uid,
        "status": result.status,
        "reason": result.reason,
        "jobs": [job_json(j, study_instance_uid) for j in result.jobs],
    }


_FIRST_FALLBACK_SECONDS = 1.0
_LAST_FALLBACK_SECONDS = 8.0


async def _wait_for_report(
    runtime: Any, study_instance_uid: str, principal: Principal, seconds: float
) -> dict[str, Any]:
    """The report once the study has one and no job still running, or as it stands when ``seconds`` have passed.
    The waiting is done on the event loop: a thread of the server's pool is taken only for each look in the
    database, and the look that finds the analysis finished reads the report in the same transaction."""
    deadline = time.monotonic() + seconds
    fallback = _FIRST_FALLBACK_SECONDS
    while True:
        # before the look: a report stored during it still wakes us
        seen = analysis.REPORT_STORED.current(study_instance_uid)
        if time.monotonic() >= deadline:
            return await run_in_threadpool(_report, runtime, study_instance_uid, principal)
        body = await run_in_threadpool(_finished_report, runtime, study_instance_uid, principal)
        if body is not None:
            return body
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return await run_in_threadpool(_report, runtime, study_instance_uid, principal)
        # woken at once by a report stored in this process (embedded worker) or announced by a worker (Redis
        # pub/sub, which wakes every waiter after it subscribes again); the timeout is only the fallback for an
        # announcement that was lost, and it grows: a look every half second by every waiting client cost each
        # study a few looks more the longer it waited, CPU taken from the studies themselves
        if not await analysis.REPORT_STORED.wait(
            min(remaining, fallback), since=seen, study_instance_uid=study_instance_uid
        ):
            fallback = min(fallback * 2, _LAST_FALLBACK_SECONDS)


@router.get("/studies/{study_instance_uid}/report")
async def get_report(
    study_instance_uid: str,
    runtime: RuntimeDep,
    principal: ReportReadDep,
    wait: Annotated[float, Query(ge=0, le=120, description="seconds to wait for the analysis to finish")] = 0,
) -> JSONResponse:
    if wait:
        body = await _wait_for_report(runtime, study_instance_uid, principal, wait)
    else:
        body = await run_in_threadpool(_report, runtime, study_instance_uid, principal)
    return JSONResponse(body)  # already plain JSON: FastAPI's encoder would walk it again (0.75 ms a report)


def _report(runtime: Any, study_instance_uid: str, principal: Principal) -> dict[str, Any]:
    with runtime.sessions.begin() as session:
        # the patient is held so that the report and its audit find it in the session
        study, patient = studies.get_with_patient_or_raise(session=session, study_instance_uid=study_instance_uid)
        return _read_report(session, study, principal)


def _finished_report(runtime: Any, study_instance_uid: str, principal: Principal) -> dict[str, Any] | None:
    """The report once the study has jobs and none is still running; else None (nothing read, nothing audited)."""
    with runtime.sessions.begin() as session:
        study, patient, states = jobs.study_with_states(session=session, study_instance_uid=study_instance_uid)
        if not states or any(s in jobs.ACTIVE_STATES for s in states):
            return None
        return _read_report(session, study, principal)  # the patient held, as in _report


def _read_report(session: Any, study: Study, principal: Principal) -> dict[str, Any]:
    """The study's reports, the read audited, in the caller's transaction.

    Raises:
        NotFound: no report yet.
    """
    study_instance_uid = study.study_instance_uid
    found = reports.for_study(session=session, study=study)
    if not found:
        states = sorted({j.state for j in jobs.for_study(session=session, study=study)}) or ["none requested"]
        raise NotFound(f"no report for this study yet (study {study.status}; jobs: {', '.join(states)})")
    patient_id = clinical.patient_resource_id(session=session, patient_id=study.patient_id)
    body = {
        "study_instance_uid": study_instance_uid,
        "status": study.status,
        "reports": [
            report_results.report_json(r, study=study, patient_resource_id=patient_id)
            | {"dicom": results.dicom_json(session=session, report=r, study_instance_uid=study_instance_uid)}
            for r in found
        ],
    }
    audit.append(
        session=session,
        principal=principal,
        event_type="report.read",
        action="R",
        entity_type="DiagnosticReport",
        entity_ref=f"study:{study_instance_uid}",
        patient_ref=clinical.patient_reference(session=session, patient_id=study.patient_id),
        detail={"format": "json", "reports": [r.id for r in found]},
    )
    return body


@router.get("/jobs/{job_id}")
def get_job(job_id: str, runtime: RuntimeDep, principal: JobReadDep) -> dict[str, Any]:
    with runtime.sessions.begin() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id)
        study = session.get(Study, job.study_id)
        audit.append(
            session=session,
            principal=principal,
            event_type="job.read",
            action="R",
            entity_type="Task",
            entity_ref=f"job:{job.id}",
            patient_ref=clinical.patient_reference(session=session, patient_id=study.patient_id) if study else None,
        )
        return job_json(job, study.study_instance_uid if study else None)


@router.get("/jobs")
def list_jobs(
    runtime: RuntimeDep,
    principal: JobReadDep,
    state: str | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=fhir_store.MAX_OFFSET),
) -> dict[str, Any]:
    """The newest jobs first, ``limit`` from ``offset``, each with its study's UID, and how many jobs are in each
    state."""
    try:
        of_state = JobState(state) if state else None
    except ValueError:
        raise InvalidInput(f"state must be one of {', '.join(JobState)}") from None
    with runtime.sessions.begin() as session:
        found = jobs.list_with_studies(session=session, state=of_state, limit=limit, offset=offset)
        audit_search(
            session,
            principal,
            event_type="job.search",
            entity_type="Task",
            entity_ref="jobs" + (f"?state={of_state}" if of_state else ""),
            found=[study for _, study in found],
            detail={"results": len(found)},
        )
        return {
            "jobs": [job_json(job, study.study_instance_uid) for job, study in found],
            "counts": jobs.count_by_state(session=session),
        }


def delivery_json(delivery: Delivery, report: Report, study: Study) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "study_instance_uid": study.study_instance_uid,
        "report": report.id,
        "current": delivery.report_version == report.version,
        "model": report.model_name,
        **results.delivery_json(delivery),
    }


@router.get("/deliveries")
def list_deliveries(
    runtime: RuntimeDep,
    principal: JobReadDep,
    state: str | None = None,
    destination: str | None = Query(None, max_length=64),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=fhir_store.MAX_OFFSET),
) -> dict[str, Any]:
    """The pushes of DICOM results to destinations, the most recently changed first."""
    with runtime.sessions.begin() as session:
        found = results.list_deliveries(
            session=session, state=state, destination=destination, limit=limit, offset=offset
        )
        audit_search(
            session,
            principal,
            event_type="delivery.search",
            entity_type="Task",
            entity_ref="deliveries",
            found=[study for _, _, study in found],
            detail={"results": len(found), "state": state, "destination": destination},
        )
        return {"deliveries": [delivery_json(*row) for row in found]}


@router.post("/deliveries/retry", status_code=202)
def retry_deliveries(
    runtime: RuntimeDep,
    principal: DeliveryRetryDep,
    destination: str | None = Query(None, max_length=64),
    limit: int = Query(1000, ge=1, le=10000),
) -> dict[str, Any]:
    """Send the failed pushes of the reports' current versions again, from their first try (to ``destination``
    only, when given): once a PACS is back after an outage that outlasted the tries."""
    retried = results.retry_failed_deliveries(runtime, principal=principal, destination=destination, limit=limit)
    return {"retried": len(retried), "deliveries": retried}


@router.get("/models")
def list_models(runtime: RuntimeDep, principal: ModelReadDep) -> dict[str, Any]:
    models = []
    loaded = runtime.registry.loaded()  # in this process: the embedded worker's; a production API loads none
    for name, model in sorted(runtime.registry.models.items()):
        manifest = model.manifest
        models.append(
            {
                "name": name,
                "intended_use": manifest.intended_use,
                "versions": [
                    {
                        "version": v.version,
                        "sha256": v.sha256,
                        "loaded": (name, v.version) in loaded,
                        "execution_provider": loaded.get((name, v.version)),
                    }
                    for v in manifest.versions
                ],
                "routing": manifest.routing.model_dump(),
                "inputs": {
                    "image": manifest.image_input.name,
                    "clinical": [f.name for f in manifest.clinical_input.features] if manifest.clinical_input else [],
                },
                "findings": [
                    {"code": f.code, "display": f.display, "threshold": f.threshold} for f in manifest.outputs.findings
                ],
            }
        )
    return {"models": models, "errors": runtime.registry.errors}


@router.get("/audit")
def list_audit(
    runtime: RuntimeDep,
    principal: AuditReadDep,
    after_id: int = Query(0, ge=0, le=db.MAX_KEY),
    limit: int = Query(100, ge=1, le=1000),
    event_type: str | None = None,
    patient: str | None = None,
    outcome: str | None = None,
) -> dict[str, Any]:
    with runtime.sessions.begin() as session:
        events = audit.list_events(
            session=session, after_id=after_id, limit=limit, event_type=event_type, patient_ref=patient, outcome=outcome
        )
        body = {
            "events": [
                {
                    "id": e.id,
                    "recorded_at": e.recorded_at.isoformat(),
                    "type": e.event_type,
                    "action": e.action,
                    "outcome": e.outcome,
                    "actor": e.actor,
                    "role": e.actor_role,
                    "source": e.source_address,
                    "entity_type": e.entity_type,
                    "entity": e.entity_ref,
                    "patient": e.patient_ref,
                    "detail": e.detail,
                    "hash": e.hash,
                    "prev_hash": e.prev_hash,
                }
                for e in events
            ]
        }
        audit.append(
            session=session,
            principal=principal,
            event_type="audit.read",
            action="R",
            entity_type="AuditEvent",
            entity_ref="audit",
            detail={"after_id": after_id, "count": len(events)},
        )
    return body
