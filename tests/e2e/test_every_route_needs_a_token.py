"""Every route of the API, as its OpenAPI document lists it (and /metrics, which it leaves out), refuses a request
without a bearer token with a 401 in the protocol's own shape, but /healthz and /readyz: a route added later without
its scope dependency fails here rather than serving patient data to anyone."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

OPEN = {"/healthz", "/readyz"}


def _routes(client: TestClient) -> list[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    found = [(method.upper(), path) for path, operations in paths.items() for method in operations]
    return sorted(found + [("GET", "/metrics")])


def test_every_route_but_the_probes_needs_a_token(client: TestClient) -> None:
    routes = _routes(client)
    assert len(routes) > 30 and ("POST", "/v1/deliveries/retry") in routes
    refused = []
    for method, path in routes:
        if path in OPEN:
            continue
        concrete = re.sub(r"\{[^}]+\}", "1.2.3", path).replace("{resource_type}", "Patient")
        concrete = concrete.replace("/fhir/1.2.3", "/fhir/Patient")
        response = client.request(method, concrete, headers={"Content-Type": "application/json"}, content=b"{}")
        assert response.status_code == 401, f"{method} {path}: {response.status_code} {response.text[:200]}"
        body = response.json()
        if path.startswith("/fhir"):
            assert body["resourceType"] == "OperationOutcome", f"{method} {path}: {body}"
        else:
            assert "error" in body or "errors" in body or "00081198" in body, f"{method} {path}: {body}"
        refused.append((method, path))
    assert len(refused) == len(routes) - len(OPEN)
    for path in OPEN:
        assert client.get(path).status_code in (200, 503)
