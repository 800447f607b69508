"""FHIR Bundle ingest: validation, UCUM checks and canonical units, panels, references, batch error collection."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from service.errors import InvalidInput
from service.ingest.fhir import MAX_UNIT_LENGTH, canonical_ucum_unit, parse_bundle

PATIENT_URL = "urn:uuid:5b0d7c1e-0f0e-4d4a-9a51-2f6f0a1c9e11"


def _patient(**overrides: Any) -> dict[str, Any]:
    resource = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-0042"}, {"value": "no-system"}],
        "gender": "female",
        "birthDate": "1961-04-23",
    }
    resource.update(overrides)
    return resource


def _observation(loinc: str, value: Any, unit: str, *, subject: str = PATIENT_URL, **extra: Any) -> dict[str, Any]:
    resource = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2024-03-05T08:30:00+01:00",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }
    resource.update(extra)
    return resource


def _entry(
    resource: dict[str, Any], full_url: str | None = None, method: str = "POST", url: str | None = None
) -> dict[str, Any]:
    request = {"method": method, "url": url or resource["resourceType"]}
    entry: dict[str, Any] = {"resource": resource, "request": request}
    if full_url is not None:
        entry["fullUrl"] = full_url
    return entry


def _bundle(entries: list[dict[str, Any]], bundle_type: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": bundle_type, "entry": entries}


def test_transaction_converts_units_to_canonical_ucum() -> None:
    bundle = _bundle(
        [
            _entry(_patient(), PATIENT_URL),
            _entry(_observation("1988-5", 1.2, "mg/dL")),
            _entry(_observation("8310-5", 100.4, "[degF]")),
            _entry(_observation("6690-2", 14.2, "10*9/L")),
            _entry(_observation("6690-2", 9800, "/uL")),
            _entry(_observation("33762-6", 1.5, "ng/mL")),
        ]
    )

    parsed = parse_bundle(json.dumps(bundle).encode())

    assert parsed.bundle_type == "transaction"
    assert parsed.errors == []
    (patient,) = parsed.patients
    assert [(i.system, i.value) for i in patient.identifiers] == [
        ("urn:oid:1.2.36.146.595.217.0.1", "MRN-0042"),
        ("", "no-system"),
    ]
    assert patient.gender == "female"
    assert patient.birth_date == dt.date(1961, 4, 23)
    crp, temperature, wbc, wbc_per_ul, ntprobnp = parsed.observations
    assert (crp.loinc, crp.value, crp.ucum_unit) == ("1988-5", pytest.approx(12.0), "mg/L")
    assert (crp.original_value, crp.original_unit) == (1.2, "mg/dL")
    assert (temperature.value, temperature.ucum_unit) == (pytest.approx(38.0), "Cel")
    assert (wbc.value, wbc.ucum_unit) == (pytest.approx(14.2), "10*3/uL")
    assert (wbc_per_ul.value, wbc_per_ul.ucum_unit) == (pytest.approx(9.8), "10*3/uL")
    assert (ntprobnp.value, ntprobnp.ucum_unit) == (pytest.approx(1500.0), "pg/mL")
    assert crp.effective_at == dt.datetime(2024, 3, 5, 7, 30, tzinfo=dt.UTC)
    assert crp.status == "final"
    assert len(parsed.resources) == 6


def test_urn_uuid_subject_is_resolved_and_rewritten() -> None:
    bundle = _bundle([_entry(_patient(), PATIENT_URL), _entry(_observation("8867-4", 88, "{beats}/min"))])

    parsed = parse_bundle(bundle)

    patient_resource, observation_resource = parsed.resources
    assert patient_resource.full_url == PATIENT_URL
    assert patient_resource.method == "POST"
    assert len(patient_resource.resource_id) == 32  # a new uuid4 hex: the Patient had no id
    assert patient_resource.json["id"] == patient_resource.resource_id
    expected = f"Patient/{patient_resource.resource_id}"
    assert parsed.observations[0].patient_ref == expected
    assert observation_resource.json["subject"] == {"reference": expected}
    assert observation_resource.entry_index == 1
    assert parsed.observations[0].value == 88 and parsed.observations[0].ucum_unit == "/min"


def test_subject_references_outside_the_bundle_are_kept_normalised() -> None:
    bundle = _bundle(
        [
            _entry(_observation("9279-1", 18, "/min", subject="Patient/p-17/_history/3")),
            _entry(
                {
                    "resourceType": "Condition",
                    "subject": {"identifier": {"system": "urn:mrn", "value": "MRN-0042"}},
                    "code": {
                        "coding": [{"system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}]
                    },
                    "clinicalStatus": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                        ]
                    },
                    "onsetDateTime": "2024-03-01",
                }
            ),
        ]
    )

    parsed = parse_bundle(bundle)

    assert parsed.observations[0].patient_ref == "Patient/p-17"
    (condition,) = parsed.conditions
    assert condition.patient_ref == "identifier:urn:mrn|MRN-0042"
    assert (condition.system, condition.code, condition.display) == ("http://snomed.info/sct", "233604007", "Pneumonia")
    assert condition.clinical_status == "active"
    assert condition.onset_at == dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


def _blood_pressure_panel(*components: tuple[str, dict[str, Any] | None]) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "bp-1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "subject": {"reference": PATIENT_URL},
        "effectivePeriod": {"start": "2024-03-05T08:00:00Z"},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": code}]}}
            | ({"valueQuantity": quantity} if quantity is not None else {"dataAbsentReason": {"text": "not measured"}})
            for code, quantity in components
        ],
    }


def _kpa(value: float) -> dict[str, Any]:
    return {"value": value, "system": "http://unitsofmeasure.org", "code": "kPa"}


def test_blood_pressure_panel_yields_systolic_and_diastolic_facts() -> None:
    panel = _blood_pressure_panel(("8462-4", _kpa(10.0)), ("8480-6", _kpa(16.0)))

    parsed = parse_bundle(_bundle([_entry(_patient(), PATIENT_URL), _entry(panel)]))

    (systolic,) = parsed.observations
    assert systolic.resource_id == "bp-1", "the fact the panel is stored under keeps the Observation's id"
    assert systolic.loinc == "8480-6"
    assert systolic.value == pytest.approx(16_000 / 133.322, rel=1e-12)
    assert (systolic.ucum_unit, systolic.original_value, systolic.original_unit) == ("mm[Hg]", 16.0, "kPa")
    assert systolic.effective_at == dt.datetime(2024, 3, 5, 8, 0, tzinfo=dt.UTC)
    (diastolic,) = parsed.components["bp-1"]
    assert (diastolic.resource_id, diastolic.loinc) == ("bp-1#8462-4", "8462-4")
    assert diastolic.value == pytest.approx(10_000 / 133.322, rel=1e-12)
    assert (diastolic.original_value, diastolic.original_unit) == (10.0, "kPa")
    assert (diastolic.patient_ref, diastolic.effective_at, diastolic.status) == (
        systolic.patient_ref,
        systolic.effective_at,
        "final",
    )
    assert [r.resource_id for r in parsed.resources] == [parsed.patients[0].resource_id, "bp-1"]


def test_blood_pressure_panel_without_a_diastolic_value_yields_the_systolic_only() -> None:
    panel = _blood_pressure_panel(("8480-6", _kpa(16.0)), ("8462-4", None))

    parsed = parse_bundle(_bundle([_entry(_patient(), PATIENT_URL), _entry(panel)]))

    assert [o.loinc for o in parsed.observations] == ["8480-6"] and parsed.components == {}


def test_blood_pressure_panel_without_systolic_is_refused() -> None:
    panel = _blood_pressure_panel(("8462-4", _kpa(10.0)))

    with pytest.raises(InvalidInput, match=r"entry\[1\] \(Observation\): component: no component with LOINC 8480-6"):
        parse_bundle(_bundle([_entry(_patient(), PATIENT_URL), _entry(panel)]))


def test_units_that_do_not_convert_are_kept_as_sent() -> None:
    display_only = _observation("8867-4", 72, "beats/min")
    display_only["valueQuantity"] = {"value": 72, "unit": "beats/min"}  # no UCUM code: a display unit
    bundle = _bundle(
        [
            _entry(_patient(), PATIENT_URL),
            _entry(_observation("1988-5", 3.0, "mg/dl")),  # UCUM has the liter as both L and l
            _entry(_observation("1988-5", 95.0, "nmol/L")),  # valid UCUM, but not a mass concentration
            _entry(_observation("2345-7", 5.4, "mmol/L")),  # glucose: no canonical unit here
            _entry(display_only),
        ]
    )

    crp, crp_molar, glucose, heart_rate = parse_bundle(bundle).observations

    assert (crp.value, crp.ucum_unit) == (30.0, "mg/L")
    assert (crp_molar.value, crp_molar.ucum_unit) == (95.0, "nmol/L")
    assert (glucose.value, glucose.ucum_unit) == (5.4, "mmol/L")
    assert (heart_rate.value, heart_rate.ucum_unit, heart_rate.original_unit) == (72.0, "beats/min", "beats/min")
    assert canonical_ucum_unit("1988-5") == "mg/L" and canonical_ucum_unit("2345-7") is None


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("mmHg", r'valueQuantity\.code: "mmHg" is not valid UCUM: .*\(UCUM writes "mm\[Hg\]"\)'),
        ("mg /dL", r'valueQuantity\.code: "mg /dL" is not valid UCUM: whitespace at position 2'),
        ("Cel/h", r"valueQuantity\.code: \"Cel/h\": Cel \(degree Celsius\) is a special unit"),
        ("m" * (MAX_UNIT_LENGTH + 1), rf"valueQuantity\.code: longer than {MAX_UNIT_LENGTH} characters"),
    ],
)
def test_a_ucum_code_that_is_not_valid_ucum_refuses_the_entry(code: str, message: str) -> None:
    bundle = _bundle([_entry(_patient(), PATIENT_URL), _entry(_observation("8480-6", 120, code))])

    with pytest.raises(InvalidInput, match=r"^entry\[1\] \(Observation\): " + message):
        parse_bundle(bundle)


def test_batch_keeps_the_entries_whose_units_are_valid() -> None:
    bundle = _bundle(
        [
            _entry(_patient(id="p-1"), PATIENT_URL, method="PUT", url="Patient/p-1"),
            _entry(_observation("8310-5", 101.3, "degF")),
            _entry(_observation("8310-5", 101.3, "[degF]")),
        ],
        bundle_type="batch",
    )

    parsed = parse_bundle(bundle, collect_errors=True)

    [(index, error)] = parsed.errors
    message = error.message
    assert error.expression == ["Bundle.entry[1]"]
    assert index == 1 and '"degF" is not valid UCUM' in message and '(UCUM writes "[degF]")' in message
    (temperature,) = parsed.observations
    assert temperature.value == pytest.approx(38.5, rel=1e-12) and temperature.ucum_unit == "Cel"


def test_observation_with_a_string_value_names_the_entry_and_field() -> None:
    bundle = _bundle([_entry(_patient(), PATIENT_URL), _entry(_observation("1988-5", "12,5", "mg/L"))])

    with pytest.raises(InvalidInput, match=r"^entry\[1\] \(Observation\): valueQuantity\.value: "):
        parse_bundle(bundle)


def test_decimal_sent_as_json_string_is_rejected() -> None:
    bundle = _bundle([_entry(_patient(), PATIENT_URL), _entry(_observation("1988-5", "12.5", "mg/L"))])

    with pytest.raises(InvalidInput, match=r"entry\[1\] \(Observation\): valueQuantity\.value: must be a JSON number"):
        parse_bundle(bundle)


def test_resource_type_we_do_not_accept_is_named() -> None:
    encounter = {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}}
    bundle = _bundle([_entry(_patient(), PATIENT_URL), _entry(encounter)])

    with pytest.raises(InvalidInput, match=r"entry\[1\] \(Encounter\): resourceType: Encounter is not accepted"):
        parse_bundle(bundle)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subject": None}, r"entry\[0\] \(Observation\): subject: required"),
        ({"subject": {"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"}}, r"matches no fullUrl"),
        ({"code": {"coding": [{"system": "http://snomed.info/sct", "code": "50373000"}]}}, r"no LOINC coding"),
        ({"valueQuantity": None}, r"entry\[0\] \(Observation\): valueQuantity: required"),
    ],
)
def test_observation_requirements(change: dict[str, Any], message: str) -> None:
    observation = _observation("1988-5", 4.0, "mg/L", subject="Patient/p-1")
    for key, value in change.items():
        if value is None:
            del observation[key]
        else:
            observation[key] = value

    with pytest.raises(InvalidInput, match=message):
        parse_bundle(_bundle([_entry(observation)]))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", r"not valid JSON"),
        (b'{"resourceType": "Patient"}', r"expected Bundle"),
        (b'{"resourceType": "Bundle", "type": "collection"}', r"expected transaction or batch"),
    ],
)
def test_bundle_envelope_is_checked(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_bundle(raw)


def test_batch_collects_entry_errors_and_keeps_the_good_entries() -> None:
    bundle = _bundle(
        [
            _entry(_patient(id="p-1"), PATIENT_URL, method="PUT", url="Patient/p-1"),
            _entry(_observation("1988-5", "high", "mg/L")),
            _entry(_observation("59408-5", 93, "%")),
            _entry({"resourceType": "MedicationRequest", "status": "active"}),
        ],
        bundle_type="batch",
    )

    parsed = parse_bundle(bundle, collect_errors=True)

    assert [index for index, _ in parsed.errors] == [1, 3]
    assert parsed.errors[0][1].message.startswith("entry[1] (Observation): valueQuantity.value")
    assert "MedicationRequest is not accepted" in parsed.errors[1][1].message
    assert [resource.entry_index for resource in parsed.resources] == [0, 2]
    assert parsed.patients[0].resource_id == "p-1"
    (spo2,) = parsed.observations
    assert (spo2.patient_ref, spo2.value, spo2.ucum_unit) == ("Patient/p-1", 93.0, "%")


def test_a_transaction_fails_at_its_first_bad_entry_unless_the_caller_collects_them() -> None:
    bundle = _bundle([_entry(_patient(), PATIENT_URL), _entry(_observation("1988-5", "high", "mg/L"))])

    with pytest.raises(InvalidInput, match=r"entry\[1\]") as raised:
        parse_bundle(bundle)
    assert raised.value.expression == ["Bundle.entry[1]"]
    collected = parse_bundle(bundle, collect_errors=True)
    assert [index for index, _ in collected.errors] == [1], "the flow then refuses the whole transaction"
