"""FHIR R4 results: the AI DiagnosticReport, searchset Bundles and OperationOutcomes.

Everything is built as plain JSON, validated with the fhir.resources R4B models (wire-compatible with R4 for
these resources) and returned as the model's JSON dump, so what leaves the service is a valid resource. This
module is the only place in results that imports fhir.resources.

Every report is labelled as AI-generated three times over: status ``preliminary``, the ``AIAST`` security
label, and a conclusion that starts with :data:`CONCLUSION_PREFIX`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydantic import ValidationError

from service.errors import InvalidInput
from service.ingest.fhir import describe_validation_error
from service.schemas import FindingResult, Findings, ModelIdentity

CONCLUSION_PREFIX = "AI-generated (preliminary, not reviewed by a clinician):"
REPORT_IDENTIFIER_SYSTEM = "urn:clinfer:report"
MODEL_SHA256_SYSTEM = "urn:clinfer:model-sha256"
DICOM_UID_SYSTEM = "urn:dicom:uid"
LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
V2_0074_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0074"
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
# HL7 security label for "Artificial Intelligence asserted".
AI_ASSERTED_LABEL = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}

DEVICE_ID = "model"
ISSUE_SEVERITIES = ("fatal", "error", "warning", "information")
# IssueType (http://hl7.org/fhir/issue-type), required binding of OperationOutcome.issue.code.
ISSUE_TYPES = frozenset(
    """
    invalid structure required value invariant security login unknown expired forbidden suppressed processing
    not-supported duplicate multiple-matches not-found deleted too-long code-invalid extension too-costly
    business-rule conflict transient lock-error no-store exception timeout incomplete throttled informational
    """.split()
)


def diagnostic_report(
    *,
    report_id: str,
    patient_id: str | None,
    study_instance_uid: str,
    imaging_study_id: str | None,
    findings: Findings,
    issued: dt.datetime,
    effective_at: dt.datetime | None = None,
    version: int = 1,
) -> dict[str, Any]:
    """Build the AI-generated DiagnosticReport for one study and one model: ``preliminary`` in its first version,
    ``amended`` in later ones (an analysis of instances that arrived after the first).

    Each finding becomes a contained Observation (``#obs-1``, ``#obs-2``, ... in the order of
    ``findings.findings``) with the probability as a unitless quantity in [0, 1], POS/NEG interpretation and
    the decision threshold as its reference range. The model is a contained Device (``#model``) that the
    Observations name as their device.

    Args:
        report_id: Our report id; becomes ``id`` and the ``urn:clinfer:report`` identifier. Must be a valid
            FHIR id (for example a uuid hex).
        patient_id: Id of the FHIR Patient, or None when the study is not linked to one.
        study_instance_uid: The DICOM Study Instance UID the report is about.
        imaging_study_id: Id of the FHIR ImagingStudy, or None when we do not hold one.
        findings: What post-processing produced.
        issued: When the report was made (a naive datetime is taken as UTC).
        effective_at: The clinically relevant time (the study's date and time); ``issued`` when unknown.
        version: The report's version (``meta.versionId``); above 1 the status is ``amended``.

    Returns:
        The DiagnosticReport as a JSON-ready dict.

    Raises:
        InvalidInput: The arguments do not make a valid resource (for example a ``report_id`` that is not a
            FHIR id).
    """
    model = findings.model
    issued_text = _instant(issued)
    subject = {"reference": f"Patient/{patient_id}"} if patient_id is not None else None
    observations = [
        _finding_observation(
            number=number,
            finding=finding,
            model=model,
            subject=subject,
            effective=issued_text,
            source_sop_instance_uid=findings.source_sop_instance_uid,
        )
        for number, finding in enumerate(findings.findings, start=1)
    ]
    positives = [finding for finding in findings.findings if finding.positive]
    imaging_study: dict[str, Any] = {
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_instance_uid}"},
    }
    if imaging_study_id is not None:
        imaging_study["reference"] = f"ImagingStudy/{imaging_study_id}"

    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "meta": {"versionId": str(version), "lastUpdated": issued_text, "security": [AI_ASSERTED_LABEL]},
        "contained": [_model_device(model), *observations],
        "identifier": [{"system": REPORT_IDENTIFIER_SYSTEM, "value": report_id}],
        "status": "amended" if version > 1 else "preliminary",
        "category": [{"coding": [{"system": V2_0074_SYSTEM, "code": "RAD", "display": "Radiology"}]}],
        "code": {
            "coding": [{"system": LOINC_SYSTEM, "code": "18748-4", "display": "Diagnostic imaging study"}],
            "text": "AI analysis of imaging study",
        },
        "effectiveDateTime": _instant(effective_at) if effective_at is not None else issued_text,
        "issued": issued_text,
        "result": [{"reference": f"#{observation['id']}"} for observation in observations],
        "imagingStudy": [imaging_study],
        "conclusion": _conclusion(findings, positives),
    }
    if subject is not None:
        report["subject"] = subject
    if positives:
        report["conclusionCode"] = [{"coding": [_coding(finding)]} for finding in positives]
    return _validated(DiagnosticReport, report)


def diagnostic_report_searchset(reports: list[dict[str, Any]], *, base_url: str, total: int) -> dict[str, Any]:
    """Wrap DiagnosticReports in a searchset Bundle.

    Args:
        reports: DiagnosticReport dicts as made by :func:`diagnostic_report` (each with an ``id``).
        base_url: The FHIR base the fullUrls are made from, e.g. "https://clinfer.example/fhir".
        total: How many reports match the search (may exceed ``len(reports)`` when paged).

    Returns:
        The Bundle as a JSON-ready dict.

    Raises:
        InvalidInput: A report has no id or is not a valid resource.
    """
    base = base_url.rstrip("/")
    entries = []
    for index, report in enumerate(reports):
        report_id = report.get("id")
        if not report_id:
            raise InvalidInput(f"reports[{index}]: id: required for a searchset entry")
        entries.append(
            {
                "fullUrl": f"{base}/{report.get('resourceType', 'DiagnosticReport')}/{report_id}",
                "resource": report,
                "search": {"mode": "match"},
            }
        )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total}
    if entries:
        bundle["entry"] = entries
    return _validated(Bundle, bundle)


def operation_outcome(
    *, severity: str, code: str, diagnostics: str, expression: list[str] | None = None
) -> dict[str, Any]:
    """Build an OperationOutcome with one issue.

    Args:
        severity: IssueSeverity: "fatal", "error", "warning" or "information".
        code: IssueType, e.g. "invalid", "not-found", "processing".
        diagnostics: Human-readable detail (no patient data).
        expression: FHIRPath expressions of the elements concerned, e.g. ["Bundle.entry[2].resource"].

    Returns:
        The OperationOutcome as a JSON-ready dict.

    Raises:
        ValueError: ``severity`` or ``code`` is not a code of its value set.
    """
    if severity not in ISSUE_SEVERITIES:
        raise ValueError(f"'severity' must be one of {', '.join(ISSUE_SEVERITIES)}, got {severity!r}")
    if code not in ISSUE_TYPES:
        raise ValueError(f"'code' must be an IssueType code, got {code!r}")
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return _validated(OperationOutcome, {"resourceType": "OperationOutcome", "issue": [issue]})


def validate_resource(resource: dict[str, Any]) -> None:
    """Check that a dict is a valid R4 (R4B model) resource of its own resourceType.

    Args:
        resource: A FHIR resource as JSON.

    Raises:
        InvalidInput: No or unknown ``resourceType``, or the resource does not validate.
    """
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise InvalidInput("resourceType: required")
    try:
        model_class = get_fhir_model_class(resource_type)
    except ValueError as e:
        raise InvalidInput(f"resourceType: {resource_type} is not a FHIR resource type") from e
    try:
        model_class.model_validate(resource)
    except ValidationError as e:
        raise InvalidInput(f"{resource_type}: {describe_validation_error(e)}") from e


def _finding_observation(
    *,
    number: int,
    finding: FindingResult,
    model: ModelIdentity,
    subject: dict[str, str] | None,
    effective: str,
    source_sop_instance_uid: str,
) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"obs-{number}",
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY_SYSTEM, "code": "imaging", "display": "Imaging"}]}],
        "code": {"coding": [_coding(finding)], "text": finding.display},
        "effectiveDateTime": effective,
        "valueQuantity": _probability(finding.probability),
        "interpretation": [
            {
                "coding": [
                    {"system": INTERPRETATION_SYSTEM, "code": "POS", "display": "Positive"}
                    if finding.positive
                    else {"system": INTERPRETATION_SYSTEM, "code": "NEG", "display": "Negative"}
                ]
            }
        ],
        "referenceRange": [
            {
                # Below the threshold reads as negative; the threshold is the model's operating point.
                "high": _probability(finding.threshold),
                "text": f"decision threshold {finding.threshold:.4g} (model operating point)",
            }
        ],
        "note": [
            {
                "text": (
                    f"AI-generated by {model.name} {model.version}; probability {finding.probability:.4g}, "
                    f"decision threshold {finding.threshold:.4g}; source SOP Instance UID {source_sop_instance_uid}"
                )
            }
        ],
        "method": {"text": f"{model.name} {model.version}"},
        "device": {"reference": f"#{DEVICE_ID}", "display": f"{model.name} {model.version}"},
    }
    if subject is not None:
        observation["subject"] = subject
    return observation


def _model_device(model: ModelIdentity) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": DEVICE_ID,
        "identifier": [{"system": MODEL_SHA256_SYSTEM, "value": model.sha256}],
        "status": "active",
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "type": {"text": "AI inference model (software)"},
        "version": [{"value": model.version}],
        "note": [
            {"text": f"Intended use: {model.intended_use}"},
            {"text": f"sha256 {model.sha256}; execution provider {model.execution_provider}"},
        ],
    }


def _conclusion(findings: Findings, positives: list[FindingResult]) -> str:
    if positives:
        listed = "; ".join(
            f"{finding.display} (probability {finding.probability:.2f}, threshold {finding.threshold:.2f})"
            for finding in positives
        )
    else:
        listed = "no finding above threshold"
    text = f"{CONCLUSION_PREFIX} {listed}. Model: {findings.model.name} {findings.model.version}."
    if findings.missing_inputs:
        text += f" Clinical inputs missing: {', '.join(findings.missing_inputs)}."
    return text


def _coding(finding: FindingResult) -> dict[str, str]:
    return {"system": finding.system, "code": finding.code, "display": finding.display}


def _probability(value: float) -> dict[str, Any]:
    return {"value": round(value, 4), "unit": "1", "system": UCUM_SYSTEM, "code": "1"}


def _instant(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat()


def _validated(model_class: Any, resource: dict[str, Any]) -> dict[str, Any]:
    try:
        model = model_class.model_validate(resource)
    except ValidationError as e:
        raise InvalidInput(f"{resource['resourceType']}: {describe_validation_error(e)}") from e
    dumped: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
    return dumped
