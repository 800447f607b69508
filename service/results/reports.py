"""Stored reports -> findings JSON and the FHIR resources of a report (DiagnosticReport, Observations,
Provenance, Device)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from service.results import fhir
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


def report_fhir(
    report: Report,
    *,
    study: Study,
    patient_resource_id: str | None,
    based_on: Sequence[str] = (),
    imaging_study_id: str | None = None,
) -> dict[str, Any]:
    """The DiagnosticReport of one stored report, as its current version.

    Its ``result`` references the Observations of :func:`report_resources` (``Observation/<id>``), which a
    FHIR store serves next to it.
    """
    return fhir.diagnostic_report(
        report_id=report.id,
        patient_id=patient_resource_id,
        study_instance_uid=study.study_instance_uid,
        imaging_study_id=imaging_study_id,
        findings=findings_of(report),
        issued=_issued(report),
        effective_at=_effective(study),
        version=report.version,
        based_on=based_on,
        status=report.status if report.status in fhir.REPORT_STATUSES else None,
    )


def report_resources(
    report: Report,
    *,
    study: Study,
    patient_resource_id: str | None,
    based_on: Sequence[str] = (),
    imaging_study_id: str | None = None,
) -> list[dict[str, Any]]:
    """Every FHIR resource of the current version of one stored report, each validated as R4.

    Args:
        report: The stored report (its current version).
        study: The study it is about.
        patient_resource_id: Id of the FHIR Patient, or None when the study is not linked to one.
        based_on: The orders it answers, as literal references ("ServiceRequest/abc").
        imaging_study_id: Id of the FHIR ImagingStudy of the study, when one is held.

    Returns:
        [DiagnosticReport, its result Observations in finding order..., Provenance of this version, Device of
        the model version]. Ids are deterministic: the same report and version give the same resources.
    """
    findings = findings_of(report)
    issued = _issued(report)
    effective = _effective(study)
    observations = fhir.result_observations(
        report_id=report.id,
        findings=findings,
        patient_id=patient_resource_id,
        effective=effective if effective is not None else issued,
        issued=issued,
        version=report.version,
        study_instance_uid=study.study_instance_uid,
        imaging_study_id=imaging_study_id,
    )
    return [
        report_fhir(
            report,
            study=study,
            patient_resource_id=patient_resource_id,
            based_on=based_on,
            imaging_study_id=imaging_study_id,
        ),
        *observations,
        fhir.provenance(
            report_id=report.id,
            version=report.version,
            findings=findings,
            recorded=issued,
            patient_id=patient_resource_id,
        ),
        fhir.device(findings.model),
    ]


def _issued(report: Report) -> dt.datetime:
    return report.updated_at or report.created_at


def _effective(study: Study) -> dt.date | None:
    """The study date: DICOM StudyTime has no time zone, and a FHIR dateTime with a time must have one."""
    return study.study_date
