"""Stored reports -> findings JSON and FHIR DiagnosticReport."""

from __future__ import annotations

from typing import Any

from service.results.fhir import diagnostic_report
from service.schemas import ClinicalValue, FindingResult, Findings, ModelIdentity
from service.store.tables import Report, Study


def findings_of(report: Report) -> Findings:
    return Findings(
        model=ModelIdentity(
            name=report.model_name,
            version=report.model_version,
            sha256=report.model_sha256,
            execution_provider=report.execution_provider,
            intended_use=report.intended_use,
        ),
        findings=[
            FindingResult(
                code=f.code,
                system=f.system,
                display=f.display,
                probability=f.probability,
                threshold=f.threshold,
                positive=f.positive,
            )
            for f in report.findings
        ],
        clinical_inputs=[ClinicalValue.model_validate(v) for v in report.clinical_inputs],
        missing_inputs=list(report.missing_inputs),
        source_sop_instance_uid=report.source_sop_instance_uid,
    )


def report_json(report: Report, *, study: Study, patient_resource_id: str | None) -> dict[str, Any]:
    """The native findings JSON of one report."""
    findings = findings_of(report)
    return {
        "id": report.id,
        "status": report.status,
        "version": report.version,
        "ai_generated": True,
        "study_instance_uid": study.study_instance_uid,
        "patient": f"Patient/{patient_resource_id}" if patient_resource_id else None,
        "created_at": report.created_at.isoformat(),
        "updated_at": (report.updated_at or report.created_at).isoformat(),
        "model": findings.model.model_dump(),
        "source_sop_instance_uid": findings.source_sop_instance_uid,
        "findings": [f.model_dump() for f in findings.findings],
        "clinical_inputs": [v.model_dump(mode="json") for v in findings.clinical_inputs],
        "missing_inputs": findings.missing_inputs,
        "fhir": f"DiagnosticReport/{report.id}",
    }


def report_fhir(report: Report, *, study: Study, patient_resource_id: str | None) -> dict[str, Any]:
    return diagnostic_report(
        report_id=report.id,
        patient_id=patient_resource_id,
        study_instance_uid=study.study_instance_uid,
        imaging_study_id=None,
        findings=findings_of(report),
        issued=report.updated_at or report.created_at,
        version=report.version,
    )
