"""FHIR results: DiagnosticReport, result Observations, Provenance, Device, AuditEvent, searchset Bundle,
OperationOutcome and resource validation (each checked against the R4B models and the R4 reference targets)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import json
import re
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.provenance import Provenance

from service.errors import InvalidInput
from service.results import reports
from service.results.fhir import (
    ISSUE_SEVERITIES,
    ISSUE_TYPES,
    MODEL_SHA256_SYSTEM,
    audit_event,
    device,
    device_id,
    diagnostic_report,
    diagnostic_report_searchset,
    operation_outcome,
    provenance,
    provenance_id,
    result_observation_id,
    result_observations,
    searchset,
    validate_resource,
)
from service.schemas import ClinicalValue, FindingResult, Findings, ModelIdentity
from service.store import tables

ISSUED = dt.datetime(2024, 3, 5, 9, 15, tzinfo=dt.UTC)
AMENDED = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SOP_UID = "1.2.826.0.1.3680043.8.498.2"
REPORT_ID = "4f1c2b3a-9d8e-4f0a-8b7c-6d5e4f3a2b1c"
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
NAMES = [
    ("60046008", "Pleural effusion"),
    ("233604007", "Pneumonia"),
    ("36118008", "Pneumothorax"),
    ("19242006", "Pulmonary edema"),
    ("8186001", "Cardiomegaly"),
]


class SourcedValue(ClinicalValue):
    """ClinicalValue with the ``source`` field being added to it (the builders read it with getattr)."""

    source: str | None = None


def _model(name: str = "cxr-fusion", version: str = "1.4.0") -> ModelIdentity:
    return ModelIdentity(
        name=name,
        version=version,
        sha256="a" * 64,
        execution_provider="CPUExecutionProvider",
        intended_use="Triage support for adult frontal chest radiographs",
    )


def _findings(
    probabilities: list[float],
    threshold: float = 0.5,
    *,
    names: list[tuple[str, str]] = NAMES,
    model: ModelIdentity | None = None,
) -> Findings:
    return Findings(
        model=model or _model(),
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
        clinical_inputs=[
            SourcedValue(feature="age", value=71.0, unit="a", missing=False),
            SourcedValue(feature="sex_male", value=1.0, unit=None, missing=False),
            SourcedValue(
                feature="heart_rate",
                loinc="8867-4",
                value=96.0,
                unit="/min",
                effective_at=ISSUED - dt.timedelta(hours=2),
                missing=False,
                source="Observation/hr-1",
            ),
            SourcedValue(feature="temperature", loinc="8310-5", value=38.2, unit="Cel", missing=False, source=None),
            SourcedValue(feature="crp", loinc="1988-5", value=None, unit="mg/L", missing=True, reason="no value"),
        ],
        missing_inputs=["crp"],
        source_sop_instance_uid=SOP_UID,
    )


def _report(findings: Findings, **overrides: object) -> dict[str, Any]:
    arguments: dict[str, object] = {
        "report_id": REPORT_ID,
        "patient_id": "p-1",
        "study_instance_uid": STUDY_UID,
        "imaging_study_id": "is-9",
        "findings": findings,
        "issued": ISSUED,
    }
    arguments.update(overrides)
    return diagnostic_report(**arguments)  # type: ignore[arg-type]


def _observations(findings: Findings, *, version: int = 1) -> list[dict[str, Any]]:
    return result_observations(
        report_id=REPORT_ID,
        findings=findings,
        patient_id="p-1",
        effective=dt.date(2024, 3, 4),
        issued=ISSUED if version == 1 else AMENDED,
        version=version,
        study_instance_uid=STUDY_UID,
        imaging_study_id="is-9",
    )


def _presented_html(report: dict[str, Any]) -> str:
    [form] = report["presentedForm"]
    assert form["contentType"] == "text/html" and form["language"] == "en"
    data = base64.b64decode(form["data"])
    assert form["size"] == len(data)
    assert base64.b64decode(form["hash"]) == hashlib.sha1(data, usedforsecurity=False).digest()
    return data.decode("utf-8")


# --- ids -----------------------------------------------------------------------------------------------------


def test_device_ids_are_stable_per_version_and_differ_across_versions() -> None:
    assert device_id(_model()) == "model-cxr-fusion-1.4.0"
    assert device_id(_model()) == device_id(_model().model_copy(update={"sha256": "b" * 64}))
    assert device_id(_model(version="1.5.0")) != device_id(_model())
    # Names and versions that spell the same readable id, or need sanitizing, or are too long, get a hash.
    clashing = [_model("a-1", "0"), _model("a", "1-0"), _model("a_1", "0"), _model("a 1", "0")]
    ids = [device_id(model) for model in clashing]
    assert len(set(ids)) == len(ids)
    long_model = _model("x" * 80, "2.0.0")
    assert device_id(long_model) == device_id(_model("x" * 80, "2.0.0"))
    assert device_id(long_model) != device_id(_model("x" * 80, "2.0.1"))
    for model in [*clashing, long_model, _model("cxr/fusion:ü", "1.0.0+build.7")]:
        assert FHIR_ID.fullmatch(device_id(model)), device_id(model)


def test_observation_and_provenance_ids() -> None:
    assert result_observation_id(REPORT_ID, 1) == f"{REPORT_ID}-obs-1"
    assert provenance_id(REPORT_ID, 2) == f"{REPORT_ID}-prov-2"
    long_id = "r" * 64
    assert FHIR_ID.fullmatch(result_observation_id(long_id, 12))
    assert result_observation_id(long_id, 1) != result_observation_id(long_id, 2)
    assert provenance_id(long_id, 1) != provenance_id(long_id, 2)
    with pytest.raises(ValueError, match="'position'"):
        result_observation_id(REPORT_ID, 0)
    with pytest.raises(ValueError, match="'version'"):
        provenance_id(REPORT_ID, 0)


# --- Device --------------------------------------------------------------------------------------------------


def test_device_validates_and_names_the_model_version() -> None:
    resource = device(_model())

    Device.model_validate(resource)
    validate_resource(resource)
    assert resource["id"] == "model-cxr-fusion-1.4.0"
    assert resource["status"] == "active"
    assert resource["manufacturer"] == "clinfer"
    assert {"system": "urn:clinfer:model", "value": "cxr-fusion:1.4.0"} in resource["identifier"]
    assert {"system": "urn:clinfer:model-sha256", "value": "a" * 64} in resource["identifier"]
    assert resource["deviceName"] == [{"name": "cxr-fusion", "type": "model-name"}]
    assert resource["version"][0]["value"] == "1.4.0"
    assert resource["type"]["coding"][0]["code"] == "706689003"
    notes = " ".join(note["text"] for note in resource["note"])
    assert "Intended use: Triage support" in notes and "not been reviewed by a clinician" in notes
    assert "CPUExecutionProvider" not in json.dumps(resource), "the execution provider belongs to a run"


# --- Observations --------------------------------------------------------------------------------------------


def test_result_observations_validate_and_carry_each_finding() -> None:
    findings = _findings([0.91, 0.12, 0.55, 0.05, 0.3])

    observations = _observations(findings)

    assert [o["id"] for o in observations] == [f"{REPORT_ID}-obs-{n}" for n in range(1, 6)]
    for observation, finding in zip(observations, findings.findings, strict=True):
        Observation.model_validate(observation)
        validate_resource(observation)
        assert observation["status"] == "preliminary"
        assert observation["meta"]["versionId"] == "1"
        assert observation["meta"]["security"][0]["code"] == "AIAST"
        assert observation["category"][0]["coding"][0]["code"] == "imaging"
        assert observation["code"]["coding"] == [
            {"system": "http://snomed.info/sct", "code": finding.code, "display": finding.display}
        ]
        assert observation["subject"] == {"reference": "Patient/p-1"}
        assert observation["effectiveDateTime"] == "2024-03-04"
        assert observation["issued"].startswith("2024-03-05T09:15:00")
        assert observation["device"]["reference"] == "Device/model-cxr-fusion-1.4.0"
        assert observation["derivedFrom"] == [
            {
                "reference": "ImagingStudy/is-9",
                "type": "ImagingStudy",
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
            }
        ]
        assert "AI-generated" in observation["note"][0]["text"]
        assert "CPUExecutionProvider" in observation["method"]["text"]
    assert observations[0]["valueQuantity"] == {
        "value": 0.91,
        "unit": "1",
        "system": "http://unitsofmeasure.org",
        "code": "1",
    }
    assert observations[0]["referenceRange"][0]["high"]["value"] == 0.5
    assert [o["interpretation"][0]["coding"][0]["code"] for o in observations] == ["POS", "NEG", "POS", "NEG", "NEG"]


def test_amended_observations() -> None:
    observations = _observations(_findings([0.91, 0.12]), version=2)

    assert [o["status"] for o in observations] == ["amended", "amended"]
    assert {o["meta"]["versionId"] for o in observations} == {"2"}
    assert [o["id"] for o in observations] == [f"{REPORT_ID}-obs-1", f"{REPORT_ID}-obs-2"], "same ids, new versions"


def test_observations_without_patient_or_study() -> None:
    [observation] = result_observations(
        report_id=REPORT_ID,
        findings=_findings([0.2]),
        patient_id=None,
        effective=ISSUED,
        issued=ISSUED,
        version=1,
    )

    Observation.model_validate(observation)
    assert "subject" not in observation and "derivedFrom" not in observation


# --- DiagnosticReport ----------------------------------------------------------------------------------------


def test_report_validates_and_its_references_resolve_to_the_built_resources() -> None:
    findings = _findings([0.91, 0.12, 0.55, 0.05, 0.3])
    report = _report(findings, based_on=["ServiceRequest/order-1"], effective_at=dt.date(2024, 3, 4))
    observations = _observations(findings)
    model_device = device(findings.model)
    built = {f"{r['resourceType']}/{r['id']}": r for r in [report, *observations, model_device]}

    parsed = DiagnosticReport.model_validate(report)
    validate_resource(report)
    assert parsed.status == "preliminary"
    assert "contained" not in report
    assert [r["reference"] for r in report["result"]] == [f"Observation/{o['id']}" for o in observations]
    assert all(r["reference"] in built for r in report["result"])
    # R4 allows no Device as performer: the model is reached through each result's Observation.device.
    assert "performer" not in report
    devices = {built[r["reference"]]["device"]["reference"] for r in report["result"]}
    assert devices == {f"Device/{model_device['id']}"} and devices <= set(built)
    assert report["subject"] == {"reference": "Patient/p-1"}
    assert report["basedOn"] == [{"reference": "ServiceRequest/order-1"}]
    assert report["identifier"] == [{"system": "urn:clinfer:report", "value": REPORT_ID}]
    assert report["imagingStudy"] == [
        {
            "reference": "ImagingStudy/is-9",
            "type": "ImagingStudy",
            "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
        }
    ]
    assert {c["code"] for c in report["category"][0]["coding"]} == {"RAD", "LP29684-5"}
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert report["effectiveDateTime"] == "2024-03-04"
    assert report["issued"].startswith("2024-03-05T09:15:00")
    assert report["meta"]["versionId"] == "1"
    assert report["meta"]["security"][0]["code"] == "AIAST"
    codes = [concept["coding"][0]["code"] for concept in report["conclusionCode"]]
    assert codes == ["60046008", "36118008"]


def test_conclusion_is_labelled_ai_generated_and_lists_positives() -> None:
    report = _report(_findings([0.91, 0.12]))

    conclusion = str(report["conclusion"])
    assert conclusion.startswith("AI-generated (preliminary, not reviewed by a clinician):")
    assert "Pleural effusion (probability 0.91" in conclusion
    assert "Pneumonia" not in conclusion
    assert "Clinical inputs missing: crp" in conclusion
    assert report["effectiveDateTime"] == report["issued"], "issued stands in for an unknown effective time"


def test_presented_form_is_readable_html_with_every_finding_and_the_disclaimer() -> None:
    findings = _findings([0.91, 0.12, 0.55])

    page = _presented_html(_report(findings))

    assert page.startswith("<!DOCTYPE html>")
    for finding in findings.findings:
        assert finding.display in page and finding.code in page
    assert "0.9100" in page and "0.5000" in page, "probabilities and thresholds"
    assert "has not been reviewed by a clinician" in page
    assert "cxr-fusion 1.4.0" in page and "CPUExecutionProvider" in page and "a" * 64 in page
    assert "Observation/hr-1" in page and "8867-4" in page, "inputs used, with their source"
    assert "crp" in page and "no value" in page, "inputs missing, with the reason"


def test_presented_form_and_narrative_escape_every_text() -> None:
    hostile = '<script>alert("x")</script>'
    model = _model().model_copy(update={"intended_use": hostile})
    findings = _findings([0.9], names=[("60046008", hostile)], model=model)

    report = _report(findings)
    page = _presented_html(report)

    assert "<script" not in page
    assert html.escape(hostile) in page
    assert "<script" not in report["text"]["div"]
    DiagnosticReport.model_validate(report)


def test_amended_report() -> None:
    report = _report(_findings([0.9]), version=2, issued=AMENDED)

    assert report["status"] == "amended"
    assert report["meta"]["versionId"] == "2"
    corrected = _report(_findings([0.9]), version=3, status="corrected")
    assert corrected["status"] == "corrected"
    with pytest.raises(ValueError, match="'status'"):
        _report(_findings([0.9]), status="done")


def test_report_without_positive_findings_or_patient() -> None:
    report = _report(_findings([0.1, 0.2]), patient_id=None, imaging_study_id=None)

    DiagnosticReport.model_validate(report)
    assert "no finding above threshold" in str(report["conclusion"])
    assert "conclusionCode" not in report
    assert "subject" not in report
    assert "reference" not in report["imagingStudy"][0]


def test_report_id_that_is_not_a_fhir_id_is_refused() -> None:
    with pytest.raises(InvalidInput, match="DiagnosticReport: id"):
        _report(_findings([0.9]), report_id="not a valid id")


def test_based_on_a_type_r4_does_not_allow_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"basedOn\[0\]: a reference to Patient is not allowed"):
        _report(_findings([0.9]), based_on=["Patient/p-1"])


# --- Provenance ----------------------------------------------------------------------------------------------


def test_provenance_targets_the_report_version_and_names_the_model_and_every_input() -> None:
    findings = _findings([0.91, 0.12])

    resource = provenance(report_id=REPORT_ID, version=1, findings=findings, recorded=ISSUED, patient_id="p-1")

    Provenance.model_validate(resource)
    validate_resource(resource)
    assert resource["id"] == f"{REPORT_ID}-prov-1"
    assert [t["reference"] for t in resource["target"]] == [
        f"DiagnosticReport/{REPORT_ID}/_history/1",
        f"Observation/{REPORT_ID}-obs-1/_history/1",
        f"Observation/{REPORT_ID}-obs-2/_history/1",
    ]
    [agent] = resource["agent"]
    assert agent["who"]["reference"] == "Device/model-cxr-fusion-1.4.0"
    assert agent["type"]["coding"][0]["code"] == "author"
    assert resource["activity"]["coding"][0]["code"] == "CREATE"
    assert resource["recorded"].startswith("2024-03-05T09:15:00")
    whats = [entity["what"] for entity in resource["entity"]]
    assert {entity["role"] for entity in resource["entity"]} == {"source"}
    references = [what.get("reference") for what in whats]
    assert "Observation/hr-1" in references, "an input with its source"
    assert references.count("Patient/p-1") == 1, "age and sex come from the Patient, named once"
    assert any("temperature" in what.get("display", "") and "reference" not in what for what in whats)
    assert not any("crp" in what.get("display", "") for what in whats), "a missing input was not used"
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{SOP_UID}"} in [what.get("identifier") for what in whats]


def test_provenance_of_an_amendment() -> None:
    resource = provenance(report_id=REPORT_ID, version=2, findings=_findings([0.9]), recorded=AMENDED, patient_id=None)

    Provenance.model_validate(resource)
    assert resource["id"] == f"{REPORT_ID}-prov-2"
    assert resource["target"][0]["reference"] == f"DiagnosticReport/{REPORT_ID}/_history/2"
    assert resource["activity"]["coding"][0]["code"] == "UPDATE"
    revisions = [e["what"]["reference"] for e in resource["entity"] if e["role"] == "revision"]
    assert revisions == [f"DiagnosticReport/{REPORT_ID}/_history/1"]
    assert "Patient/" not in json.dumps(resource), "no patient to name for demographics"


# --- the resources of a stored report -----------------------------------------------------------------------


def _stored_report(version: int = 1) -> tuple[tables.Report, tables.Study]:
    findings = _findings([0.91, 0.12, 0.55])
    report = tables.Report(
        id=REPORT_ID,
        model_name="cxr-fusion",
        model_version="1.4.0",
        model_sha256="a" * 64,
        execution_provider="CPUExecutionProvider",
        status="preliminary" if version == 1 else "amended",
        version=version,
        source_sop_instance_uid=SOP_UID,
        clinical_inputs=[value.model_dump(mode="json") for value in findings.clinical_inputs],
        missing_inputs=["crp"],
        intended_use="Triage support for adult frontal chest radiographs",
        created_at=ISSUED,
        updated_at=AMENDED if version > 1 else None,
    )
    report.findings = [
        tables.Finding(position=index, **finding.model_dump()) for index, finding in enumerate(findings.findings)
    ]
    study = tables.Study(study_instance_uid=STUDY_UID, study_date=dt.date(2024, 3, 4))
    return report, study


@pytest.mark.parametrize("version", [1, 2])
def test_report_resources_are_a_consistent_valid_set(version: int) -> None:
    report, study = _stored_report(version)

    resources = reports.report_resources(
        report, study=study, patient_resource_id="p-1", based_on=["ServiceRequest/order-1"]
    )

    assert [r["resourceType"] for r in resources] == [
        "DiagnosticReport",
        "Observation",
        "Observation",
        "Observation",
        "Provenance",
        "Device",
    ]
    for resource in resources:
        validate_resource(resource)
        assert FHIR_ID.fullmatch(resource["id"])
    by_reference = {f"{r['resourceType']}/{r['id']}": r for r in resources}
    diagnostic, *observations, prov, model_device = resources
    assert diagnostic["status"] == ("preliminary" if version == 1 else "amended")
    assert diagnostic["meta"]["versionId"] == str(version)
    assert diagnostic["effectiveDateTime"] == "2024-03-04"
    assert all(r["reference"] in by_reference for r in diagnostic["result"])
    assert {o["device"]["reference"] for o in observations} == {f"Device/{model_device['id']}"}
    assert prov["agent"][0]["who"]["reference"] == f"Device/{model_device['id']}"
    for target in prov["target"]:
        resource_ref, _, target_version = target["reference"].partition("/_history/")
        assert resource_ref in by_reference and by_reference[resource_ref]["meta"]["versionId"] == target_version
    assert reports.report_fhir(report, study=study, patient_resource_id="p-1") == {
        key: value for key, value in diagnostic.items() if key != "basedOn"
    }


# --- AuditEvent ----------------------------------------------------------------------------------------------


def _audit_row(**values: Any) -> tables.AuditEvent:
    row: dict[str, Any] = {
        "id": 42,
        "recorded_at": ISSUED,
        "event_type": "report.read",
        "action": "R",
        "outcome": "0",
        "actor": "dr-house",
        "actor_role": "clinician",
        "source_address": "10.0.0.7",
        "entity_type": "DiagnosticReport",
        "entity_ref": f"report:{REPORT_ID}",
        "patient_ref": "Patient/p-1",
        "detail": {},
    }
    row.update(values)
    return tables.AuditEvent(**row)


def _subtype_codes(resource: dict[str, Any]) -> set[str]:
    return {coding["code"] for coding in resource.get("subtype", [])}


def test_audit_event_of_a_fhir_report_read() -> None:
    resource = audit_event(_audit_row(detail={"format": "fhir"}))

    AuditEvent.model_validate(resource)
    validate_resource(resource)
    assert resource["id"] == "42"
    assert resource["type"]["code"] == "rest"
    assert {"read", "report.read"} <= _subtype_codes(resource)
    assert resource["action"] == "R" and resource["outcome"] == "0"
    assert resource["recorded"].startswith("2024-03-05T09:15:00")
    [agent] = resource["agent"]
    assert agent["who"]["display"] == "dr-house" and agent["requestor"] is True
    assert agent["network"] == {"address": "10.0.0.7", "type": "2"}
    assert agent["role"] == [{"text": "clinician"}]
    assert resource["source"]["observer"]["display"] == "clinfer"
    patient, report = resource["entity"]
    assert patient["what"] == {"reference": "Patient/p-1"} and patient["role"]["code"] == "1"
    assert report["what"] == {"reference": f"DiagnosticReport/{REPORT_ID}"} and report["role"]["code"] == "3"
    assert json.loads(report["detail"][0]["valueString"]) == {"format": "fhir"}


AUDIT_ROWS = [
    # (row values, AuditEvent.type code, a standard subtype code or None)
    ({"event_type": "dicom.store", "action": "C", "entity_type": "ImagingStudy"}, "110104", None),
    ({"event_type": "dicom.search", "action": "E", "entity_ref": "qido:study"}, "110112", None),
    ({"event_type": "report.read", "detail": {"format": "json"}}, "110110", None),
    ({"event_type": "report.create", "action": "C"}, "110110", None),
    ({"event_type": "report.push", "action": "E", "outcome": "8", "detail": {"error": "refused"}}, "110106", None),
    ({"event_type": "study.analyze", "action": "E", "entity_ref": f"study:{STUDY_UID}"}, "110109", None),
    ({"event_type": "audit.read", "entity_type": "AuditEvent", "entity_ref": "audit"}, "110101", None),
    ({"event_type": "auditevent.search", "action": "E", "entity_ref": "AuditEvent?type=x"}, "110101", "search-type"),
    ({"event_type": "auditevent.read", "entity_type": "AuditEvent", "entity_ref": "AuditEvent/5"}, "110101", "read"),
    ({"event_type": "job.search", "action": "E", "entity_type": "Task", "entity_ref": "jobs"}, "110112", None),
    ({"event_type": "fhir.search", "action": "E", "entity_ref": "Observation?code=x"}, "rest", "search-type"),
    ({"event_type": "fhir.read", "entity_ref": "Observation/o-1/_history/2"}, "rest", "vread"),
    ({"event_type": "fhir.bundle", "action": "C", "entity_ref": "Bundle:batch"}, "rest", "batch"),
    ({"event_type": "fhir.write", "action": "C", "entity_ref": "Bundle:single"}, "rest", "create"),
    ({"event_type": "patient.read", "entity_type": "Patient", "entity_ref": "Patient/p-1"}, "rest", "read"),
    (
        {
            "event_type": "access.denied",
            "action": "E",
            "outcome": "4",
            "entity_type": "Route",
            "patient_ref": None,
            "entity_ref": "GET /fhir/{type}",
            "detail": {"reason": "forbidden", "message": "no scope"},
        },
        "110113",
        "110132",
    ),
    (
        {
            "event_type": "dimse.tls-refused",
            "action": "E",
            "outcome": "4",
            "entity_type": "Association",
            "source_address": "pacs.example",
            "patient_ref": None,
            "entity_ref": "tls->CLINFER",
        },
        "110113",
        "110126",
    ),
    ({"event_type": "job.failed", "action": "E", "outcome": "8", "entity_type": "Task"}, "110100", None),
    ({"event_type": "something.new", "action": "E", "entity_type": None, "entity_ref": None}, "110100", None),
]


@pytest.mark.parametrize(("values", "event_code", "subtype"), AUDIT_ROWS)
def test_audit_events_of_representative_rows_validate(
    values: dict[str, Any], event_code: str, subtype: str | None
) -> None:
    row = _audit_row(**values)

    resource = audit_event(row)

    AuditEvent.model_validate(resource)
    validate_resource(resource)
    assert resource["type"]["code"] == event_code
    assert row.event_type in _subtype_codes(resource)
    if subtype is not None:
        assert subtype in _subtype_codes(resource)
    if row.outcome != "0" and row.detail:
        assert resource["outcomeDesc"] in ("refused", "no scope", "forbidden")
    if row.source_address and not row.source_address[0].isdigit():
        assert resource["agent"][0]["network"]["type"] == "1", "a machine name"


def test_audit_event_entities() -> None:
    study = audit_event(
        _audit_row(
            event_type="dicom.store",
            action="C",
            entity_type="ImagingStudy",
            entity_ref=f"study:{STUDY_UID}",
            patient_ref="MRN-7",
        )
    )
    search = audit_event(
        _audit_row(
            event_type="fhir.search",
            action="E",
            entity_type="Observation",
            entity_ref="Observation?code=8867-4",
            patient_ref=None,
        )
    )

    patient, imaging = study["entity"]
    assert patient["what"] == {"identifier": {"system": "urn:clinfer:audit-entity", "value": "MRN-7"}}
    assert imaging["what"]["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}
    assert imaging["type"] == {"system": "http://hl7.org/fhir/resource-types", "code": "ImagingStudy"}
    [query] = search["entity"]
    assert base64.b64decode(query["query"]).decode() == "Observation?code=8867-4"
    assert query["role"]["code"] == "24" and "name" not in query


def test_audit_event_with_a_bad_action_is_refused() -> None:
    with pytest.raises(InvalidInput, match="AuditEvent.action"):
        audit_event(_audit_row(action="X"))
    with pytest.raises(InvalidInput, match="AuditEvent.outcome"):
        audit_event(_audit_row(outcome="1"))


# --- Bundle --------------------------------------------------------------------------------------------------


def test_searchset_bundle() -> None:
    reports_found = [_report(_findings([0.9]), report_id=f"r{n}") for n in range(2)]

    bundle = diagnostic_report_searchset(reports_found, base_url="https://clinfer.example/fhir/", total=7)

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


def test_searchset_with_paging_links_and_includes() -> None:
    findings = _findings([0.9])
    observations = _observations(findings)
    base = "https://clinfer.example/fhir"

    bundle = searchset(
        observations,
        base_url=base,
        total=None,
        links={"next": f"{base}/Observation?_offset=1", "self": f"{base}/Observation?_offset=0"},
        included=[device(findings.model)],
    )

    Bundle.model_validate(bundle)
    validate_resource(bundle)
    assert "total" not in bundle
    assert [link["relation"] for link in bundle["link"]] == ["self", "next"]
    assert [entry["search"]["mode"] for entry in bundle["entry"]] == ["match", "include"]
    assert bundle["entry"][1]["fullUrl"] == f"{base}/Device/model-cxr-fusion-1.4.0"
    with pytest.raises(InvalidInput, match=r"resources\[0\]: id"):
        searchset([{"resourceType": "Observation"}], base_url=base, total=1)


# --- OperationOutcome ----------------------------------------------------------------------------------------


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
    with pytest.raises(ValueError, match="'code'"):
        operation_outcome(severity="error", code="error", diagnostics="x")


@pytest.mark.parametrize("code", sorted(ISSUE_TYPES))
def test_operation_outcome_validates_for_every_issue_type(code: str) -> None:
    for severity in ISSUE_SEVERITIES:
        outcome = operation_outcome(severity=severity, code=code, diagnostics="d", expression=["Patient.name"])
        OperationOutcome.model_validate(outcome)
        validate_resource(outcome)


# --- validation ----------------------------------------------------------------------------------------------


def test_validate_resource() -> None:
    validate_resource({"resourceType": "Patient", "gender": "female"})
    with pytest.raises(InvalidInput, match="Observation: code"):
        validate_resource({"resourceType": "Observation", "status": "final"})
    with pytest.raises(InvalidInput, match="not a FHIR resource type"):
        validate_resource({"resourceType": "Nonsense"})
    with pytest.raises(InvalidInput, match="not a FHIR resource type"):
        validate_resource({"resourceType": "Reference"})
    with pytest.raises(InvalidInput, match="resourceType: required"):
        validate_resource({"id": "x"})


def test_validate_resource_checks_reference_targets_and_required_codes() -> None:
    report = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}}
    validate_resource({**report, "performer": [{"reference": "Organization/o-1"}]})
    with pytest.raises(InvalidInput, match=r"performer\[0\]: a reference to Device is not allowed"):
        validate_resource({**report, "performer": [{"reference": "Device/model-cxr-fusion-1.4.0"}]})
    with pytest.raises(InvalidInput, match="a reference to Device"):
        validate_resource({**report, "performer": [{"reference": "https://x.example/fhir/Device/d/_history/2"}]})
    with pytest.raises(InvalidInput, match="DiagnosticReport.status"):
        validate_resource({**report, "status": "done"})
    with pytest.raises(InvalidInput, match="Device.status"):
        validate_resource({"resourceType": "Device", "status": "on"})


def test_device_is_built_once_per_model_version_and_handed_out_as_a_copy() -> None:
    first = device(_model())
    first["status"] = "inactive"  # a caller changing its copy changes nobody else's
    second = device(_model().model_copy(update={"execution_provider": "CUDAExecutionProvider"}))
    assert second["status"] == "active" and second["id"] == first["id"]
    other = device(_model().model_copy(update={"sha256": "f" * 64}))
    assert {"system": MODEL_SHA256_SYSTEM, "value": "f" * 64} in other["identifier"]
    Device.model_validate(other)
