"""A Bundle's FHIR store writes: the resources it writes are looked for once; new ones are then written without
looking again, and one that turns out to exist after all is still written as an update."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import event

from service.flows import fhir as fhir_flow
from service.flows.runtime import Runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store import fhir_store
from tests.factories import patient_bundle


@pytest.fixture
def store_selects(runtime: Runtime) -> Iterator[list[str]]:
    """The SELECTs of the FHIR store's rows made while the test runs."""
    seen: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM fhir_resources" in statement:
            seen.append(statement)

    event.listen(runtime.engine, "before_cursor_execute", note)
    yield seen
    event.remove(runtime.engine, "before_cursor_execute", note)


def _versions(response: dict) -> list[tuple[str, str]]:
    return [(e["response"]["status"], e["response"]["etag"]) for e in response["entry"]]


def test_new_resources_are_looked_for_once(runtime: Runtime, store_selects: list[str]) -> None:
    response = fhir_flow.process_bundle(runtime, patient_bundle(), principal=SYSTEM_PRINCIPAL)
    statuses = [status for status, _ in _versions(response)]
    assert statuses and all(status.startswith("201") for status in statuses)
    assert len(store_selects) == 1, store_selects  # the look-up; put_many did not look again


def test_a_resource_stored_meanwhile_is_updated_not_duplicated(
    runtime: Runtime, store_selects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = patient_bundle()
    bundle["entry"][1]["resource"]["id"] = "obs-1"
    bundle["entry"][1]["request"] = {"method": "PUT", "url": "Observation/obs-1"}
    # another request stores obs-1 between this Bundle's look-up and its write: the look-up misses it
    real_lookup = fhir_store.existing_keys

    def lookup_then_someone_writes(*, session: object, keys: object) -> set[tuple[str, str]]:
        found = real_lookup(session=session, keys=keys)  # type: ignore[arg-type]
        fhir_store.put(
            session=session,  # type: ignore[arg-type]
            resource_type="Observation",
            resource_id="obs-1",
            body={**bundle["entry"][1]["resource"]},
            patient_id=None,
        )
        return found

    monkeypatch.setattr(fhir_store, "existing_keys", lookup_then_someone_writes)
    response = fhir_flow.process_bundle(runtime, bundle, principal=SYSTEM_PRINCIPAL)
    statuses = _versions(response)
    assert statuses[1] == ("200 OK", 'W/"2"')  # an update of what was stored meanwhile
    assert all(status.startswith("201") for status, _ in statuses[:1] + statuses[2:])
    with runtime.sessions() as session:
        assert fhir_store.read(session=session, resource_type="Observation", resource_id="obs-1").version == 2
        assert len(fhir_store.history(session=session, resource_type="Observation", resource_id="obs-1")) == 2
