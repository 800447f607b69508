"""FHIR R4 endpoint: Bundle ingest, DiagnosticReport read and search, Patient read, CapabilityStatement."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api.deps import AuthenticatedDep, RuntimeDep, check, require
from service.api.errors import FHIR_JSON
from service.errors import InvalidInput, NotFound, PayloadTooLarge
from service.flows import ingest as ingest_flow
from service.results import reports as report_results
from service.results.fhir import diagnostic_report_searchset, operation_outcome
from service.schemas import Principal
from service.store import audit, clinical
from service.store import reports as report_store
from service.store.tables import Study

router = APIRouter(prefix="/fhir", tags=["FHIR R4"])

ReportReadDep = Annotated[Principal, Depends(require("DiagnosticReport", "r"))]
ReportSearchDep = Annotated[Principal, Depends(require("DiagnosticReport", "s"))]
PatientReadDep = Annotated[Principal, Depends(require("Patient", "r"))]

ACCEPTED_TYPES = ("Patient", "Observation", "Condition")


def fhir_response(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


@router.get("/metadata", summary="CapabilityStatement")
def metadata(request: Request, principal: AuthenticatedDep) -> JSONResponse:
    base = str(request.base_url).rstrip("/") + "/fhir"
    return fhir_response(
        {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-11-22",
            "kind": "instance",
            "software": {"name": "clinfer"},
            "implementation": {"description": "clinfer clinical inference service", "url": base},
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json"],
            "rest": [
                {
                    "mode": "server",
                    "security": {
                        "service": [
                            {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                        "code": "SMART-on-FHIR",
                                    }
                                ]
                            }
                        ]
                    },
                    "interaction": [{"code": "transaction"}, {"code": "batch"}],
                    "resource": [
                        {"type": "Patient", "interaction": [{"code": "read"}]},
                        {"type": "Observation", "interaction": []},
                        {"type": "Condition", "interaction": []},
                        {
                            "type": "DiagnosticReport",
                            "interaction": [{"code": "read"}, {"code": "search-type"}],
                            "searchParam": [{"name": "subject", "type": "reference"}],
                        },
                    ],
                }
            ],
        }
    )


@router.post("", summary="Bundle: transaction or batch of Patient, Observation, Condition")
async def post_bundle(request: Request, runtime: RuntimeDep, principal: AuthenticatedDep) -> JSONResponse:
    raw = await request.body()
    if len(raw) > runtime.settings.max_fhir_bundle_bytes:
        raise PayloadTooLarge(f"the Bundle exceeds the limit of {runtime.settings.max_fhir_bundle_bytes} bytes")
    try:
        peek = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"the body is not JSON: {e}") from e
    if not isinstance(peek, dict) or peek.get("resourceType") != "Bundle":
        raise InvalidInput("POST /fhir takes a Bundle of type transaction or batch")
    types = {e.get("resource", {}).get("resourceType") for e in peek.get("entry") or [] if isinstance(e, dict)}
    for resource_type in sorted(t for t in types if t in ACCEPTED_TYPES) or ["Patient"]:
        check(request, runtime, principal, resource_type, "c")
    bundle_type, results = await run_in_threadpool(ingest_flow.store_bundle, runtime, raw, principal=principal)
    entries = []
    for result in results:
        response: dict[str, Any] = {"status": result.status}
        if result.error is None:
            response["location"] = f"{result.resource_type}/{result.resource_id}/_history/1"
        else:
            response["outcome"] = operation_outcome(severity="error", code="invalid", diagnostics=result.error)
        entries.append({"response": response})
    return fhir_response({"resourceType": "Bundle", "type": f"{bundle_type}-response", "entry": entries})


@router.get("/Patient/{resource_id}")
def read_patient(resource_id: str, runtime: RuntimeDep, principal: PatientReadDep) -> JSONResponse:
    with runtime.sessions.begin() as session:
        row = clinical.get_resource(session=session, resource_type="Patient", resource_id=resource_id)
        if row is None:
            raise NotFound(f"Patient/{resource_id} not found")
        audit.append(
            session=session,
            principal=principal,
            event_type="patient.read",
            action="R",
            entity_type="Patient",
            entity_ref=f"Patient/{resource_id}",
            patient_ref=f"Patient/{resource_id}",
        )
        body = dict(row.body)
    body["meta"] = {"versionId": str(row.version), "lastUpdated": row.updated_at.isoformat()}
    return fhir_response(body)


def _report_resource(session: Any, report: Any) -> dict[str, Any]:
    study = session.get(Study, report.study_id)
    patient_id = clinical.patient_resource_id(session=session, patient_id=report.patient_id)
    return report_results.report_fhir(report, study=study, patient_resource_id=patient_id)


@router.get("/DiagnosticReport/{report_id}")
def read_diagnostic_report(report_id: str, runtime: RuntimeDep, principal: ReportReadDep) -> JSONResponse:
    with runtime.sessions.begin() as session:
        report = report_store.get_or_raise(session=session, report_id=report_id)
        resource = _report_resource(session, report)
        audit.append(
            session=session,
            principal=principal,
            event_type="report.read",
            action="R",
            entity_type="DiagnosticReport",
            entity_ref=f"report:{report.id}",
            patient_ref=resource.get("subject", {}).get("reference"),
            detail={"format": "fhir"},
        )
    return fhir_response(resource)


@router.get("/DiagnosticReport")
def search_diagnostic_reports(
    request: Request,
    runtime: RuntimeDep,
    principal: ReportSearchDep,
    subject: str | None = None,
    _count: int = 50,
) -> JSONResponse:
    if not subject:
        raise InvalidInput("search DiagnosticReport by subject=Patient/{id}")
    patient_id = subject.removeprefix("Patient/")
    count = max(1, min(_count, 200))
    with runtime.sessions.begin() as session:
        patient = clinical.get_patient(session=session, resource_id=patient_id)
        found = report_store.for_patient(session=session, patient_id=patient.id, limit=count) if patient else []
        resources = [_report_resource(session, report) for report in found]
        audit.append(
            session=session,
            principal=principal,
            event_type="report.search",
            action="E",
            entity_type="DiagnosticReport",
            entity_ref=f"subject=Patient/{patient_id}",
            patient_ref=f"Patient/{patient_id}",
            detail={"results": len(resources)},
        )
    base = str(request.base_url).rstrip("/") + "/fhir"
    return fhir_response(diagnostic_report_searchset(resources, base_url=base, total=len(resources)))
