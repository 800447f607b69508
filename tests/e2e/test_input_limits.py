"""Input at the limits, found by fuzzing the running server: dates at the ends of the calendar, JSON that the
decoder cannot take, a Bundle whose entry is not an array, digits that are not ASCII, integers beyond 64 bits.
Each answers a clear error in its protocol's shape (or works), never a 500, and stores nothing it refused."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.main import create_app
from service.flows.runtime import Runtime, build_runtime, set_runtime
from tests.conftest import Tokens, make_settings, serve_over_http
from tests.e2e.test_fhir_server import FHIR, created_id, crp, outcome_of

BEYOND_64_BITS = "99999999999999999999999"
SUPERSCRIPT_TWO = "\u00b2"  # "²": str.isdigit() says yes, int() says no


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TestClient, Tokens]]:
    """The app on SQLite (embedded default) and on the real PostgreSQL, whose column types are narrower."""
    overrides: dict[str, Any] = {}
    if request.param == "postgresql":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    settings = make_settings(tmp_path, **overrides)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    with TestClient(create_app(runtime)) as test_client:
        yield test_client, Tokens(settings)


def _created(client: TestClient, tokens: Tokens, resource: dict[str, Any]) -> str:
    """The id of a resource created with the ingest token (its answer has no body: that role reads nothing back)."""
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=tokens.header("ingest"))
    return created_id(response)


def _total(client: TestClient, tokens: Tokens, path: str, **params: str) -> int:
    response = client.get(f"/fhir/{path}", params=params, headers=tokens.header("clinician"))
    assert response.status_code == 200, response.text
    total: int = response.json()["total"]
    return total


# --- 1. dates at the ends of the calendar ----------------------------------------------------------------------


def test_dates_at_the_ends_of_the_calendar_are_stored_and_searched(
    database_client: tuple[TestClient, Tokens],
) -> None:
    client, tokens = database_client
    marker = f"EDGE-{uuid.uuid4().hex[:8]}"
    latest = _created(
        client,
        tokens,
        {"resourceType": "Patient", "identifier": [{"value": marker}], "birthDate": "9999-12-31"},
    )
    _created(client, tokens, {"resourceType": "Patient", "birthDate": "0001-01-01"})
    assert _total(client, tokens, "Patient", birthdate="9999-12-31") == 1
    assert _total(client, tokens, "Patient", birthdate="9999-12") == 1
    assert _total(client, tokens, "Patient", birthdate="9999") == 1
    # 9999-12-31T23:59:59-14:00 is in year 10000 in UTC: after the whole UTC day 9999-12-31, still comparable
    assert _total(client, tokens, "Patient", birthdate="le9999-12-31T23:59:59-14:00") == 2
    assert _total(client, tokens, "Patient", birthdate="ge9999-12-31T23:59:59-14:00") == 0
    assert _total(client, tokens, "Patient", birthdate="0001-01-01T00:00:00+01:00") == 0
    assert _total(client, tokens, "Patient", birthdate="0001-01-01") == 1
    assert _total(client, tokens, "Patient", _lastUpdated="9999-12-31") == 0
    assert _total(client, tokens, "Patient", _lastUpdated="lt9999-12-31") == 2
    assert _total(client, tokens, "ServiceRequest", authored="sa9999-12-31") == 0
    assert _total(client, tokens, "DiagnosticReport", date="lt0001-01-01T00:00:00+14:00") == 0

    # a conditional create on such a date finds the Patient instead of creating another
    again = client.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "birthDate": "9999-12-31"},
        headers={**tokens.header("ingest"), "If-None-Exist": "birthdate=9999-12-31"},
    )
    assert again.status_code == 200, again.text
    assert created_id(again) == latest

    # Observations whose instant in UTC lies beyond the calendar: by REST and in a transaction Bundle
    patient_ref = f"Patient/{latest}"
    for when in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):
        _created(client, tokens, crp(patient_ref, 3.0, when=when))
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": crp(patient_ref, 4.0, when=when), "request": {"method": "POST", "url": "Observation"}}
            ],
        }
        stored = client.post("/fhir", json=bundle, headers=tokens.header("ingest"))
        assert stored.status_code == 200, stored.text
    assert _total(client, tokens, "Observation", date="ge9999-12-31") == 2
    assert _total(client, tokens, "Observation", date="eq0001-01-01T00:00:00+14:00") == 2
    assert _total(client, tokens, "Observation", subject=patient_ref) == 4


# --- 2. JSON the decoder cannot take ---------------------------------------------------------------------------

_UNDECODABLE = {
    "a number of 5000 digits": '{"resourceType": "Patient", "x": ' + "1" * 5000 + "}",
    "arrays nested 100000 deep": "[" * 100_000 + "]" * 100_000,
    "objects nested 100000 deep": '{"a": ' * 100_000 + "1" + "}" * 100_000,
    # decodes, but validating its elements (recursive) would exhaust the recursion limit
    "extensions nested 300 deep": '{"resourceType": "Patient", "extension": '
    + '[{"url": "http://x", "extension": ' * 300
    + "[]"
    + "}]" * 300
    + "}",
    "NaN": '{"resourceType": "Patient", "birthDate": NaN}',
}


@pytest.mark.parametrize("body", list(_UNDECODABLE.values()), ids=list(_UNDECODABLE))
def test_a_body_that_is_not_usable_json_is_refused(client: TestClient, tokens: Tokens, body: str) -> None:
    headers = {**tokens.header("ingest"), "Content-Type": FHIR}
    for method, path in [
        ("POST", "/fhir/Patient"),
        ("PUT", "/fhir/Patient/p-1"),
        ("PUT", "/fhir/Patient?identifier=x"),
        ("POST", "/fhir"),
    ]:
        answer = outcome_of(client.request(method, path, content=body, headers=headers), 400)
        assert "JSON" in answer["issue"][0]["diagnostics"], (method, path)
    assert _total(client, tokens, "Patient") == 0


def test_a_body_nested_as_deep_as_fhir_needs_is_taken(client: TestClient, tokens: Tokens) -> None:
    nested = {"url": "http://example.org/leaf", "valueString": "x"}
    for _ in range(20):
        nested = {"url": "http://example.org/level", "extension": [nested]}
    _created(client, tokens, {"resourceType": "Patient", "extension": [nested]})


# --- 3. a Bundle whose entry is not an array -------------------------------------------------------------------


def test_a_bundle_whose_entry_is_not_an_array_is_refused(client: TestClient, tokens: Tokens) -> None:
    for entry in (5, True, "Patient", {"resource": {"resourceType": "Patient"}}):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entry}
        answer = outcome_of(client.post("/fhir", json=bundle, headers=tokens.header("ingest")), 400)
        assert "Bundle.entry" in answer["issue"][0]["diagnostics"], entry
    assert _total(client, tokens, "Patient") == 0


def test_a_bundle_entry_that_is_not_an_object_is_refused_by_its_index(client: TestClient, tokens: Tokens) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [5, None, ["Patient"]]}
    answer = outcome_of(client.post("/fhir", json=bundle, headers=tokens.header("ingest")), 400)
    assert answer["issue"][0]["expression"] == ["Bundle.entry[0]"]


# --- 4. digits that are not ASCII, and 5. integers beyond 64 bits ----------------------------------------------


def test_audit_event_paging_refuses_what_other_searches_refuse(client: TestClient, tokens: Tokens) -> None:
    for name, value in [
        *((name, value) for name in ("_count", "_offset") for value in (SUPERSCRIPT_TWO, "-1", "2.5", BEYOND_64_BITS)),
        ("_count", "1001"),
    ]:
        audit = client.get("/fhir/AuditEvent", params={name: value}, headers=tokens.header("admin"))
        assert name in outcome_of(audit, 400)["issue"][0]["diagnostics"], (name, value)
        # the same value on a search of another type: the same answer
        outcome_of(client.get("/fhir/Patient", params={name: value}, headers=tokens.header("clinician")), 400)


def test_audit_event_paging_still_pages(client: TestClient, tokens: Tokens) -> None:
    admin = tokens.header("admin")
    for _ in range(5):  # each search is audited
        assert client.get("/fhir/Patient", headers=tokens.header("clinician")).status_code == 200
    page = client.get("/fhir/AuditEvent", params={"_count": "2", "_offset": "1"}, headers=admin)
    assert page.status_code == 200, page.text
    assert len(page.json()["entry"]) == 2
    assert any(link["relation"] == "next" for link in page.json()["link"])


def test_ids_and_versions_that_no_row_can_have_are_not_found(database_client: tuple[TestClient, Tokens]) -> None:
    client, tokens = database_client
    admin, clinician = tokens.header("admin"), tokens.header("clinician")
    resource_id = _created(client, tokens, {"resourceType": "Patient"})
    for event_id in (SUPERSCRIPT_TWO, BEYOND_64_BITS, str(2**63), "\u0663", "-1", "0"):
        outcome_of(client.get(f"/fhir/AuditEvent/{event_id}", headers=admin), 404)
    for version in (SUPERSCRIPT_TWO, BEYOND_64_BITS, str(2**63), str(2**31), "\u0661", "0"):
        outcome_of(client.get(f"/fhir/Patient/{resource_id}/_history/{version}", headers=clinician), 404)
    assert client.get(f"/fhir/Patient/{resource_id}/_history/1", headers=clinician).status_code == 200
    events = client.get("/fhir/AuditEvent", params={"_count": "1"}, headers=admin).json()["entry"]
    first = events[0]["resource"]["id"]
    assert client.get(f"/fhir/AuditEvent/{first}", headers=admin).status_code == 200


def test_an_if_match_that_is_not_a_version_is_refused(runtime: Runtime, tokens: Tokens) -> None:
    # over a real socket: HTTP header values are Latin-1, and the test client would send "\xb2" ("²") as UTF-8;
    # "²" and "¹" are digits to str.isdigit(), not to int()
    with serve_over_http(runtime) as base, httpx.Client(base_url=base, timeout=30) as http:
        for tag in (b'W/"\xb2"', b'"\xb9"', f'W/"{BEYOND_64_BITS}"'.encode(), b'W/"-1"'):
            created = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=tokens.header("ingest"))
            resource_id = created_id(created)
            headers: dict[str, Any] = {**tokens.header("ingest"), "If-Match": tag}
            response = http.put(
                f"/fhir/Patient/{resource_id}",
                json={"resourceType": "Patient", "id": resource_id, "gender": "male"},
                headers=headers,
            )
            assert response.status_code in (400, 412), (tag, response.text)
            outcome_of(response, response.status_code)
            current = http.get(f"/fhir/Patient/{resource_id}", headers=tokens.header("clinician")).json()
            assert current["meta"]["versionId"] == "1" and "gender" not in current, "nothing written"


def test_native_and_dicomweb_integers_beyond_their_range_are_refused(
    database_client: tuple[TestClient, Tokens],
) -> None:
    client, tokens = database_client
    for path, name, value, role in [
        ("/v1/studies", "offset", "9223372036854775808", "clinician"),
        ("/v1/studies", "offset", BEYOND_64_BITS, "clinician"),
        ("/v1/audit", "after_id", "9223372036854775808", "admin"),
        ("/dicomweb/studies", "offset", BEYOND_64_BITS, "clinician"),
        ("/dicomweb/studies", "offset", "9223372036854775808", "clinician"),
    ]:
        response = client.get(path, params={name: value}, headers=tokens.header(role))
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid" and name in error["message"], error


def test_native_and_dicomweb_integers_at_their_range_still_work(database_client: tuple[TestClient, Tokens]) -> None:
    client, tokens = database_client
    clinician = tokens.header("clinician")
    studies = client.get("/v1/studies", params={"offset": "1000000000"}, headers=clinician)
    assert studies.status_code == 200 and studies.json() == {"studies": []}, studies.text
    audit = client.get("/v1/audit", params={"after_id": str(2**63 - 1)}, headers=tokens.header("admin"))
    assert audit.status_code == 200 and audit.json() == {"events": []}, audit.text
    found = client.get("/dicomweb/studies", params={"offset": "1000000000"}, headers=clinician)
    assert found.status_code == 204, found.text


def test_a_fhir_body_over_the_limit_is_refused_whether_its_length_is_declared_or_not(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    """413 in an OperationOutcome, from the declared Content-Length before a byte is read, or, for a chunked body,
    as soon as what was read passes the limit (before, the whole body was read into memory first)."""
    runtime.settings.max_fhir_bundle_bytes = 1000
    body = b'{"resourceType": "Patient", "gender": "' + b"x" * 2000 + b'"}'
    headers = {**tokens.header("ingest"), "Content-Type": "application/fhir+json"}
    declared = client.post("/fhir/Patient", content=body, headers=headers)
    chunked = client.post("/fhir/Patient", content=iter([body[:600], body[600:]]), headers=headers)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
    small = client.post("/fhir/Patient", content=b'{"resourceType": "Patient"}', headers=headers)
    assert small.status_code == 201, small.text
