"""Clinical normalization through the service: Observations sent in other UCUM units reach the model in the units of
its manifest, Observation.status decides what may be used, and the report names the Observation behind each value."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from service.inference.manifest import load_manifest
from tests.conftest import REPO, Tokens
from tests.e2e.test_embedded_spine import post_study, wait_for_report
from tests.factories import dx_instance

PATIENT_ID, ISSUER = "MRN-UCUM-1", "urn:oid:1.2.3.4.5"
DAY = "2026-11-20"  # the study: dx_instance's StudyDate, StudyTime 09:30:00
UCUM = "http://unitsofmeasure.org"


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _observation(
    resource_id: str, loinc: str, value: float, unit: str, *, at: str, status: str = "final"
) -> dict[str, Any]:
    return {
        "resource": {
            "resourceType": "Observation",
            "id": resource_id,
            "status": status,
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "subject": {"reference": "Patient/ucum-patient"},
            "effectiveDateTime": f"{DAY}T{at}Z",
            "valueQuantity": _quantity(value, unit),
        },
        "request": {"method": "PUT", "url": f"Observation/{resource_id}"},
    }


def _blood_pressure_panel(resource_id: str, systolic: float, diastolic: float, unit: str, *, at: str) -> dict[str, Any]:
    entry = _observation(resource_id, "85354-9", 0, unit, at=at)
    del entry["resource"]["valueQuantity"]
    entry["resource"]["component"] = [
        {"code": {"coding": [{"system": "http://loinc.org", "code": loinc}]}, "valueQuantity": _quantity(value, unit)}
        for loinc, value in (("8480-6", systolic), ("8462-4", diastolic))
    ]
    return entry


def _bundle(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


PATIENT = {
    "resource": {
        "resourceType": "Patient",
        "id": "ucum-patient",
        "identifier": [{"system": ISSUER, "value": PATIENT_ID}],
        "gender": "female",
        "birthDate": "1950-06-01",
    },
    "request": {"method": "PUT", "url": "Patient/ucum-patient"},
}


def test_values_arrive_in_the_manifest_units_and_entered_in_error_is_never_used(
    client: TestClient, tokens: Tokens
) -> None:
    ingest, clinician = tokens.header("ingest"), tokens.header("clinician")
    manifest = load_manifest(REPO / "models" / "cxr-fusion" / "manifest.yaml")
    assert manifest.clinical_input is not None
    units = {feature.name: feature.unit for feature in manifest.clinical_input.features}
    canonical = (units["crp"], units["temperature"], units["leukocytes"], units["systolic_bp"])
    assert canonical == ("mg/L", "Cel", "10*3/uL", "mm[Hg]")

    study_uid = generate_uid()
    assert post_study(client, tokens, [dx_instance(study_uid=study_uid, patient_id=PATIENT_ID)]).status_code == 200
    first = _bundle(
        PATIENT,
        _observation("crp-1", "1988-5", 2.5, "mg/dL", at="07:00:00"),
        # The latest CRP, and wildly high: only its status keeps it out.
        _observation("crp-eie", "1988-5", 48.0, "mg/dL", at="09:00:00", status="entered-in-error"),
        _observation("temp-1", "8310-5", 101.3, "[degF]", at="08:00:00"),
        _observation("wbc-1", "6690-2", 14.2, "10*9/L", at="06:00:00"),
        _observation("hr-1", "8867-4", 96, "{beats}/min", at="08:30:00"),
        _observation("rr-1", "9279-1", 30, "/min", at="08:30:00"),
        _observation("spo2-1", "59408-5", 0.91, "1", at="08:30:00"),
        # NT-proBNP in pmol/L is an amount of substance: UCUM cannot make it a mass concentration.
        _observation("ntprobnp-1", "33762-6", 95, "pmol/L", at="06:00:00"),
        _blood_pressure_panel("bp-1", 18.0, 11.0, "kPa", at="08:15:00"),
    )
    stored = client.post("/fhir", json=first, headers=ingest)
    assert stored.status_code == 200, stored.text
    # The respiratory rate is corrected at the source: the same Observation again, status amended.
    amended = _bundle(_observation("rr-1", "9279-1", 22, "/min", at="08:30:00", status="amended"))
    assert client.post("/fhir", json=amended, headers=ingest).status_code == 200

    analyze = client.post(f"/v1/studies/{study_uid}/analyze", headers=clinician)
    assert analyze.status_code == 202, analyze.text
    [report] = wait_for_report(client, study_uid, clinician)["reports"]
    used = {value["feature"]: value for value in report["clinical_inputs"]}

    expected = {
        # feature: (value in the manifest unit, Observation, value and unit as sent)
        "crp": (25.0, "crp-1", 2.5, "mg/dL"),
        "temperature": (38.5, "temp-1", 101.3, "[degF]"),
        "leukocytes": (14.2, "wbc-1", 14.2, "10*9/L"),
        "heart_rate": (96.0, "hr-1", 96.0, "{beats}/min"),
        "respiratory_rate": (22.0, "rr-1", 22.0, "/min"),
        "spo2": (91.0, "spo2-1", 0.91, "1"),
        "systolic_bp": (18_000 / 133.322, "bp-1", 18.0, "kPa"),
    }
    for feature, (value, source, original_value, original_unit) in expected.items():
        item = used[feature]
        assert not item["missing"], item
        assert math.isclose(item["value"], value, rel_tol=1e-6), (feature, item)
        assert item["unit"] == units[feature]
        assert item["source"] == f"Observation/{source}"
        assert (item["original_value"], item["original_unit"]) == (original_value, original_unit)
    assert used["systolic_bp"]["loinc"] == "8480-6", "the systolic component of the panel"

    probnp = used["nt_probnp"]
    assert probnp["missing"] and probnp["value"] is None and probnp["source"] is None
    assert probnp["reason"] == 'unit "pmol/L" cannot be converted to "pg/mL" (number/volume vs mass/volume)'
    assert report["missing_inputs"] == ["nt_probnp"]

    # The entered-in-error CRP appears nowhere in the report, neither its Observation nor its value.
    assert "crp-eie" not in json.dumps(report)
    assert all(item["value"] is None or not math.isclose(item["value"], 480.0, rel_tol=1e-3) for item in used.values())


def test_a_code_that_is_not_ucum_is_refused_with_the_reason(client: TestClient, tokens: Tokens) -> None:
    bundle = _bundle(PATIENT, _observation("bp-x", "8480-6", 120, "mmHg", at="08:00:00"))

    response = client.post("/fhir", json=bundle, headers=tokens.header("ingest"))

    assert response.status_code in (400, 422), response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics = " ".join(issue.get("diagnostics", "") for issue in outcome["issue"])
    assert '"mmHg" is not valid UCUM' in diagnostics and '(UCUM writes "mm[Hg]")' in diagnostics
