"""FHIR results: the AI DiagnosticReport, searchset Bundle, OperationOutcome and resource validation."""

from __future__ import annotations

import datetime as dt

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome

from service.errors import InvalidInput
from service.results.fhir import (
    diagnostic_report,
    diagnostic_report_searchset,
    operation_outcome,
    validate_resource,
)
from service.schemas import ClinicalValue, FindingResult, Findings, ModelIdentity

ISSUED = dt.datetime(2024, 3, 5, 9, 15, tzinfo=dt.UTC)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def _findings(probabilities: list[float], threshold: float = 0.5) -> Findings:
    names = [
        ("60046008", "Pleural effusion"),
        ("233604007", "Pneumonia"),
        ("36118008", "Pneumothorax"),
        ("19242006", "Pulmonary edema"),
        ("8186001", "Cardiomegaly"),
    ]
    return Findings(
        model=ModelIdentity(
            name="cxr-fusion",
            version="1.4.0",
            sha256="a" * 64,
            execution_provider="CPUExecutionProvider",
            intended_use="Triage support for adult frontal chest radiographs",
        ),
        findings=[
            FindingResult(
                code=code,
                display=display,
                probability=probability,
                threshold=threshold,
                positive=probability >= threshold,
            )
            for (code, display), probability in zip(names, probabilities, strict=False)
        ],
        clinical_inputs=[ClinicalValue(feature="crp", loinc="1988-5", value=None, unit=None, missing=True)],
        missing_inputs=["crp"],
        source_sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
    )


def _report(findings: Findings, **overrides: object) -> dict[str, object]:
    arguments: dict[str, object] = {
        "report_id": "4f1c2b3a9d8e4f0a8b7c6d5e4f3a2b1c",
        "patient_id": "p-1",
        "study_instance_uid": STUDY_UID,
        "imaging_study_id": "is-9",
        "findings": findings,
        "issued": ISSUED,
    }
    arguments.update(overrides)
    return diagnostic_report(**arguments)  # type: ignore[arg-type]


def test_report_validates_and_references_every_finding() -> None:
    report = _report(_findings([0.91, 0.12, 0.55, 0.05, 0.3]))

    parsed = DiagnosticReport.model_validate(report)
    assert parsed.status == "preliminary"
    assert [r.reference for r in parsed.result or []] == ["#obs-1", "#obs-2", "#obs-3", "#obs-4", "#obs-5"]
    contained = {resource["id"]: resource for resource in report["contained"]}  # type: ignore[attr-defined]
    assert set(contained) == {"model", "obs-1", "obs-2", "obs-3", "obs-4", "obs-5"}
    assert contained["obs-1"]["valueQuantity"] == {
        "value": 0.91,
        "unit": "1",
        "system": "http://unitsofmeasure.org",
        "code": "1",
    }
    assert contained["obs-1"]["interpretation"][0]["coding"][0]["code"] == "POS"
    assert contained["obs-2"]["interpretation"][0]["coding"][0]["code"] == "NEG"
    assert contained["obs-1"]["device"]["reference"] == "#model"
    assert contained["model"]["version"] == [{"value": "1.4.0"}]
    assert contained["model"]["identifier"][0]["value"] == "a" * 64
    assert report["subject"] == {"reference": "Patient/p-1"}
    assert report["identifier"] == [{"system": "urn:clinfer:report", "value": "4f1c2b3a9d8e4f0a8b7c6d5e4f3a2b1c"}]
    assert report["imagingStudy"] == [
        {"reference": "ImagingStudy/is-9", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}}
    ]
    codes = [concept["coding"][0]["code"] for concept in report["conclusionCode"]]  # type: ignore[attr-defined]
    assert codes == ["60046008", "36118008"]


def test_conclusion_is_labelled_ai_generated_and_lists_positives() -> None:
    report = _report(_findings([0.91, 0.12]))

    conclusion = str(report["conclusion"])
    assert conclusion.startswith("AI-generated (preliminary, not reviewed by a clinician):")
    assert "Pleural effusion (probability 0.91" in conclusion
    assert "Pneumonia" not in conclusion
    assert "Clinical inputs missing: crp" in conclusion


def test_report_without_positive_findings_or_patient() -> None:
    report = _report(_findings([0.1, 0.2]), patient_id=None, imaging_study_id=None)

    DiagnosticReport.model_validate(report)
    assert "no finding above threshold" in str(report["conclusion"])
    assert "conclusionCode" not in report
    assert "subject" not in report
    assert "reference" not in report["imagingStudy"][0]  # type: ignore[index]


def test_report_id_that_is_not_a_fhir_id_is_refused() -> None:
    with pytest.raises(InvalidInput, match="DiagnosticReport: id"):
        _report(_findings([0.9]), report_id="not a valid id")


def test_searchset_bundle() -> None:
    reports = [_report(_findings([0.9]), report_id=f"r{n}") for n in range(2)]

    bundle = diagnostic_report_searchset(reports, base_url="https://clinfer.example/fhir/", total=7)

    Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset"
    assert bundle["total"] == 7
    assert [entry["fullUrl"] for entry in bundle["entry"]] == [
        "https://clinfer.example/fhir/DiagnosticReport/r0",
        "https://clinfer.example/fhir/DiagnosticReport/r1",
    ]
    assert all(entry["search"] == {"mode": "match"} for entry in bundle["entry"])
    assert diagnostic_report_searchset([], base_url="https://x", total=0) == {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 0,
    }


def test_operation_outcome() -> None:
    outcome = operation_outcome(
        severity="error",
        code="invalid",
        diagnostics="entry[1] (Observation): valueQuantity.value: bad",
        expression=["Bundle.entry[1].resource.valueQuantity.value"],
    )

    OperationOutcome.model_validate(outcome)
    assert outcome["issue"] == [
        {
            "severity": "error",
            "code": "invalid",
            "diagnostics": "entry[1] (Observation): valueQuantity.value: bad",
            "expression": ["Bundle.entry[1].resource.valueQuantity.value"],
        }
    ]
    with pytest.raises(ValueError, match="'severity'"):
        operation_outcome(severity="bad", code="invalid", diagnostics="x")


def test_validate_resource() -> None:
    validate_resource({"resourceType": "Patient", "gender": "female"})
    with pytest.raises(InvalidInput, match="Observation: code"):
        validate_resource({"resourceType": "Observation", "status": "final"})
    with pytest.raises(InvalidInput, match="not a FHIR resource type"):
        validate_resource({"resourceType": "Nonsense"})
    with pytest.raises(InvalidInput, match="resourceType: required"):
        validate_resource({"id": "x"})
