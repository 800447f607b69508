"""FHIR writes with a FHIR server's semantics: Bundles (transaction all-or-nothing, batch entry by entry), single
creates and updates (conditional create with If-None-Exist, conditional update, If-Match), deletes; clinical facts
normalized for the models in the same transaction; AI-read orders (ServiceRequest) linked to their studies.

A single REST write runs as a one-entry transaction, so both paths share every rule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from sqlalchemy.orm import Session

from service import metrics
from service.errors import (
    InvalidInput,
    MethodNotAllowed,
    ServiceError,
    TransientError,
    Unprocessable,
)
from service.flows import ingest as ingest_flow
from service.flows import orders, report_fhir
from service.flows.runtime import Runtime
from service.ingest import fhir
from service.results.fhir import issue_code_for_status, operation_outcome
from service.schemas import ConditionFact, ObservationFact, Principal
from service.store import audit, clinical, db, fhir_store, studies
from service.store.tables import Patient

log = logging.getLogger(__name__)

WRITABLE_TYPES = fhir.ACCEPTED_RESOURCE_TYPES
__all__ = ["MethodNotAllowed", "WRITABLE_TYPES", "WriteOutcome", "bundle_permissions", "process_bundle", "write_one"]


@dataclass(frozen=True)
class WriteOutcome:
    """One entry's write: its status, the version it left, and the resource as stored (which a matched conditional
    create did not write: the edge shows it only to a principal that may read it)."""

    status: int
    resource_type: str
    resource_id: str
    version: int
    last_modified: str
    resource: dict[str, Any]

    @property
    def patient_ref(self) -> str | None:
        """The Patient the resource is about (``Patient/<id>``): itself for a Patient, else its subject."""
        if self.resource_type == "Patient":
            return f"Patient/{self.resource_id}"
        subject = self.resource.get("subject")
        reference = subject.get("reference") if isinstance(subject, dict) else None
        return reference if isinstance(reference, str) else None


def bundle_permissions(body: dict[str, Any]) -> set[tuple[str, str]]:
    """The SMART (resource type, permission) pairs a Bundle needs: c for POST, u (and c) for PUT, d for DELETE."""
    needed: set[tuple[str, str]] = set()
    entries = body.get("entry")
    for entry in entries if isinstance(entries, list) else []:  # anything else is refused by the parser
        if not isinstance(entry, dict):
            continue
        request: dict[str, Any] = entry["request"] if isinstance(entry.get("request"), dict) else {}
        method = str(request.get("method", "")).upper()
        resource: dict[str, Any] = entry["resource"] if isinstance(entry.get("resource"), dict) else {}
        resource_type = resource.get("resourceType") or str(request.get("url", "")).split("/")[0].split("?")[0]
        if resource_type not in WRITABLE_TYPES:
            continue  # refused per entry by the parser, with a message
        needed |= {(resource_type, p) for p in {"POST": "c", "PUT": "cu", "DELETE": "d"}.get(method, "c")}
    return needed or {("Patient", "c")}


def _status_text(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase}"


def _patient_of_subject(session: Session, ref: str | None, in_bundle: dict[str, Patient], where: str) -> Patient:
    if ref is None:
        raise Unprocessable(f"{where}: subject: a reference to the Patient is required", expression=[where])
    try:
        return ingest_flow.resolve_patient(session, ref, in_bundle)
    except InvalidInput as e:
        raise Unprocessable(f"{where}: {e.message}", expression=[f"{where}.subject"]) from e


def _outcome(row: Any, status: int) -> WriteOutcome:
    body = fhir_store.body_of(row)
    return WriteOutcome(
        status=status,
        resource_type=row.resource_type,
        resource_id=row.resource_id,
        version=row.version,
        last_modified=body.get("meta", {}).get("lastUpdated", ""),
        resource=body,
    )


def _apply(session: Session, parsed: fhir.ParsedBundle, indexes: set[int]) -> dict[int, WriteOutcome]:
    """Write the chosen entries in one transaction: Patients first, so that references to them resolve.

    Writes to the FHIR store are gathered and made together (fhir_store.put_many); they are made before any entry
    that reads the store (a delete, a conditional create that matched, an order that links studies), so each entry
    sees what the entries before it wrote.
    """
    in_bundle: dict[str, Patient] = {}
    outcomes: dict[int, WriteOutcome] = {}
    resources = [r for r in parsed.resources if r.entry_index in indexes]
    facts: dict[tuple[str, str], Any] = {("Patient", f.resource_id): f for f in parsed.patients}
    facts |= {("Observation", f.resource_id): f for f in parsed.observations}
    facts |= {("Condition", f.resource_id): f for f in parsed.conditions}
    facts |= {(f.resource_type, f.resource_id): f for f in parsed.others}
    ordered = sorted(resources, key=lambda r: (r.resource_type != "Patient", r.entry_index))
    # which of the resources written exist already: an Observation updated loses its earlier facts, and a
    # resource not found is written as new (put_many does not look for it again; a clash still falls back)
    looked_for = {(r.resource_type, r.resource_id) for r in ordered if r.json is not None}
    stored = fhir_store.existing_keys(session=session, keys=looked_for)
    stored_observations = {resource_id for resource_type, resource_id in stored if resource_type == "Observation"}
    pending: list[tuple[int, fhir_store.PutRequest]] = []
    observations: list[tuple[Patient, ObservationFact]] = []

    def write_pending() -> None:
        gathered, facts_to_write = list(pending), list(observations)
        pending.clear()
        observations.clear()
        clinical.put_observations(session=session, facts=facts_to_write)
        if not gathered:
            return
        written = fhir_store.put_many(session=session, requests=[request for _, request in gathered])
        for (index, _), (row, created) in zip(gathered, written, strict=True):
            outcomes[index] = _outcome(row, 201 if created else 200)
            if row.resource_type in ("ServiceRequest", "ImagingStudy"):
                for study in orders.link_orders(session, row.body, patient_id=row.patient_id):
                    report_fhir.republish_for_study(session, study)  # basedOn the order

    def apply_one(resource: fhir.ParsedResource) -> None:
        where = f"Bundle.entry[{resource.entry_index}]"
        if resource.method == "DELETE":
            write_pending()
            row = fhir_store.delete_resource(
                session=session, resource_type=resource.resource_type, resource_id=resource.resource_id
            )
            clinical.remove_facts(
                session=session, resource_type=resource.resource_type, resource_id=resource.resource_id
            )
            if resource.resource_type == "ServiceRequest":  # a deleted order orders nothing
                studies.unlink_order(session=session, order_resource_id=resource.resource_id)
            outcomes[resource.entry_index] = _outcome(row, 204)
            return
        if resource.existing:  # a conditional create that matched: nothing is written
            write_pending()
            row = fhir_store.read(
                session=session, resource_type=resource.resource_type, resource_id=resource.resource_id
            )
            outcomes[resource.entry_index] = _outcome(row, 200)
            if resource.resource_type == "Patient":
                patient = clinical.get_patient(session=session, resource_id=resource.resource_id)
                if patient is not None and resource.full_url:
                    in_bundle[f"Patient/{resource.resource_id}"] = patient
            return
        assert resource.json is not None
        fact = facts.get((resource.resource_type, resource.resource_id))
        if resource.resource_type == "Patient":
            patient = ingest_flow.upsert_patient(session, fact)
            in_bundle[f"Patient/{resource.resource_id}"] = patient
            body = {**resource.json, "id": patient.resource_id}
        else:
            patient = _patient_of_subject(session, getattr(fact, "patient_ref", None), in_bundle, where)
            body = {
                **resource.json,
                "subject": {**(resource.json.get("subject") or {}), "reference": f"Patient/{patient.resource_id}"},
            }
            if isinstance(fact, ObservationFact):
                if resource.resource_id in stored_observations:
                    # an update: its components may differ from the earlier version's
                    clinical.remove_facts(
                        session=session, resource_type="Observation", resource_id=resource.resource_id
                    )
                observations.extend((patient, c) for c in [fact, *parsed.components.get(resource.resource_id, [])])
            elif isinstance(fact, ConditionFact):
                clinical.put_condition(session=session, patient=patient, fact=fact)
        resource_id = resource.resource_id if resource.resource_type != "Patient" else patient.resource_id
        key = (resource.resource_type, resource_id)
        pending.append(
            (
                resource.entry_index,
                fhir_store.PutRequest(
                    resource_type=key[0],
                    resource_id=key[1],
                    body=body,
                    patient_id=patient.id,
                    if_match=resource.if_match,
                    where=where,
                    new=key in looked_for and key not in stored,
                ),
            )
        )
        if resource.resource_type in ("ServiceRequest", "ImagingStudy"):
            write_pending()  # its orders are linked before the next entry is written

    for resource in ordered:
        try:
            apply_one(resource)
        except ServiceError:
            write_pending()  # an earlier entry's write error comes first, as when each entry is written in turn
            raise
    write_pending()
    return outcomes


def _audit(
    session: Session,
    principal: Principal,
    bundle_type: str,
    parsed: fhir.ParsedBundle,
    outcomes: dict[int, WriteOutcome],
) -> None:
    by_patient: dict[str | None, list[str]] = {}
    for outcome in outcomes.values():
        by_patient.setdefault(outcome.patient_ref, []).append(
            f"{outcome.resource_type}/{outcome.resource_id}/_history/{outcome.version}"
        )
    for patient_ref, resources in sorted(by_patient.items(), key=lambda item: item[0] or ""):
        audit.append(
            session=session,
            principal=principal,
            event_type="fhir.bundle" if bundle_type != "single" else "fhir.write",
            action="C",
            entity_type="Bundle" if bundle_type != "single" else resources[0].split("/")[0],
            entity_ref=f"Bundle:{bundle_type}",
            patient_ref=patient_ref,
            detail={"resources": sorted(resources)},
        )


class _Parsing:
    """A Bundle, parsed (outside the write transaction), and what its conditional entries (``ifNoneExist``,
    ``PUT Type?query``) matched then."""

    def __init__(self, runtime: Runtime, body: dict[str, Any]) -> None:
        self.body = body
        self.matches: dict[tuple[str, str], list[str]] = {}
        with runtime.sessions() as session:
            self.parsed = self._parse(session)

    def _parse(self, session: Session) -> fhir.ParsedBundle:
        matches: dict[tuple[str, str], list[str]] = {}

        def recorded(resource_type: str, query: str) -> list[str]:
            matches[(resource_type, query)] = found = _condition_matches(session, resource_type, query)
            return found

        parsed = fhir.parse_bundle(self.body, collect_errors=True, resolve=recorded)
        self.matches = matches
        return parsed

    def settle(self, session: Session, indexes: set[int]) -> fhir.ParsedBundle:
        """In the write transaction of the entries at ``indexes``, before anything is read: serialize with every
        other write of the same resources, conditions and study joins (``_write_keys``), then check the
        conditions again and parse the Bundle again, here, when one matches otherwise than it did (another
        request created or changed a resource meanwhile). So two identical conditional creates make one resource,
        and two first writes of one resource or Patient identifier never clash."""
        conditions = [fhir_store.condition_key(fhir_store.condition(t, q)) for t, q in self.matches]
        held = set(_write_keys(self.parsed, indexes) + conditions)
        db.serialize_on(session, held)
        for _ in range(_SETTLE_ROUNDS):
            if all(_condition_matches(session, t, q) == found for (t, q), found in self.matches.items()):
                return self.parsed
            self.parsed = self._parse(session)
            # a conditional update whose match appeared meanwhile now writes that resource: its lock too, taken
            # after the others; a write of it may have changed what matches while this waited, so the conditions
            # are checked again once it is held (should the late lock close a cycle with another transaction,
            # PostgreSQL fails one of the two: a transient error, 503, nothing written)
            more = [key for key in _write_keys(self.parsed, indexes) if key not in held]
            if not more:
                return self.parsed
            db.serialize_on(session, more)
            held.update(more)
        raise TransientError("the resources this request's conditions match kept changing; send it again")


_SETTLE_ROUNDS = 3  # parses again of a request whose conditions match otherwise than when it was parsed


def _condition_matches(session: Session, resource_type: str, query: str) -> list[str]:
    """The current resources a conditional write's criteria match (two at most: one is all it may match)."""
    return fhir_store.matching_ids(session=session, request=fhir_store.condition(resource_type, query))


def _write_keys(parsed: fhir.ParsedBundle, indexes: set[int]) -> list[str]:
    """What the entries at ``indexes`` write (a resource of a client-chosen id: PUT, DELETE) and what they join
    studies by (``studies.link_keys``: their Patients' identifiers, their orders' accession numbers, their
    ImagingStudies' UIDs); created resources get new ids, which nothing else writes."""
    identifiers = {facts.resource_id: facts.identifiers for facts in parsed.patients}
    keys: list[str] = []
    patient_ids: list[str] = []
    accession_numbers: list[str] = []
    study_uids: list[str] = []
    for resource in parsed.resources:
        if resource.entry_index not in indexes or resource.existing:
            continue
        if resource.method != "POST":
            keys.append(f"fhir:{resource.resource_type}/{resource.resource_id}")
        if resource.json is None:
            continue
        if resource.resource_type == "Patient":
            patient_ids += [identifier.value for identifier in identifiers.get(resource.resource_id, ())]
        elif resource.resource_type == "ServiceRequest":
            accession_numbers += orders.accession_numbers(resource.json)
        elif resource.resource_type == "ImagingStudy":
            study_uids += orders.study_uids(resource.json)
    return keys + studies.link_keys(patient_ids=patient_ids, accession_numbers=accession_numbers, study_uids=study_uids)


def _settled(parsing: _Parsing, session: Session, indexes: set[int]) -> fhir.ParsedBundle:
    """``_Parsing.settle``; an entry at ``indexes`` that the Bundle parsed again here refuses fails as it would
    have on the first parse."""
    parsed = parsing.settle(session, indexes)
    for index, error in parsed.errors:
        if index in indexes:
            raise error
    return parsed


def _error_entry(error: ServiceError) -> dict[str, Any]:
    return {
        "response": {
            "status": _status_text(error.http_status),
            "outcome": operation_outcome(
                severity="error",
                code=issue_code_for_status(error.http_status),
                diagnostics=error.message,
                expression=error.expression,
            ),
        }
    }


def _entry(outcome: WriteOutcome) -> dict[str, Any]:
    """An entry of the response Bundle: status, location and version, never the resource (as for ``Prefer:
    return=minimal``): a conditional create that matched would otherwise show a writer what is stored."""
    response: dict[str, Any] = {"status": _status_text(outcome.status), "etag": f'W/"{outcome.version}"'}
    if outcome.status != 204:
        response["location"] = f"{outcome.resource_type}/{outcome.resource_id}/_history/{outcome.version}"
        response["lastModified"] = outcome.last_modified
    return {"response": response}


def process_bundle(runtime: Runtime, body: dict[str, Any], *, principal: Principal) -> dict[str, Any]:
    """Process a transaction (all or nothing: the first failing entry fails the whole Bundle and nothing is
    written) or a batch (each entry on its own; failures answered per entry with an OperationOutcome).

    Returns:
        The transaction-response or batch-response Bundle.

    Raises:
        ServiceError: the Bundle is malformed, or a transaction entry failed (with that entry's status).
    """
    parsing = _Parsing(runtime, body)
    parsed = parsing.parsed
    total = len(body.get("entry") or [])
    if parsed.bundle_type == "transaction":
        if parsed.errors:
            index, error = parsed.errors[0]
            raise error
        with runtime.sessions.begin() as session:
            parsed = _settled(parsing, session, {r.entry_index for r in parsed.resources})
            outcomes = _apply(session, parsed, {r.entry_index for r in parsed.resources})
            _audit(session, principal, "transaction", parsed, outcomes)
        entries = [_entry(outcomes[i]) for i in range(total)]
    else:
        results: dict[int, dict[str, Any]] = {index: _error_entry(error) for index, error in parsed.errors}
        for resource in parsed.resources:
            try:
                with runtime.sessions.begin() as session:
                    current = _settled(parsing, session, {resource.entry_index})
                    outcomes = _apply(session, current, {resource.entry_index})
                    _audit(session, principal, "batch", current, outcomes)
                results[resource.entry_index] = _entry(outcomes[resource.entry_index])
            except ServiceError as e:
                results[resource.entry_index] = _error_entry(e)
            except Exception as e:  # this entry alone fails (rolled back); those written stand and are answered
                log.exception("batch entry %d failed", resource.entry_index)
                results[resource.entry_index] = _error_entry(
                    TransientError("the database or the disk failed for a moment; send the entry again")
                    if db.is_transient(e)
                    else ServiceError(f"internal error ({type(e).__name__}); see the server log", code="internal")
                )
        entries = [results[i] for i in range(total)]
    for entry in entries:
        status = entry["response"]["status"]
        metrics.FHIR_RESOURCES.labels(parsed.bundle_type, "stored" if status[0] == "2" else "rejected").inc()
    return {"resourceType": "Bundle", "type": f"{parsed.bundle_type}-response", "entry": entries}


def write_one(
    runtime: Runtime,
    *,
    principal: Principal,
    method: str,
    url: str,
    resource: dict[str, Any] | None = None,
    if_none_exist: str | None = None,
    if_match: int | None = None,
) -> WriteOutcome:
    """One REST write (POST Type, PUT Type/id, PUT Type?query, DELETE Type/id) as a one-entry transaction."""
    request: dict[str, Any] = {"method": method, "url": url}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    if if_match is not None:
        request["ifMatch"] = f'W/"{if_match}"'
    entry: dict[str, Any] = {"request": request}
    if resource is not None:
        entry["resource"] = resource
    parsing = _Parsing(runtime, {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    if parsing.parsed.errors:
        raise parsing.parsed.errors[0][1]
    with runtime.sessions.begin() as session:
        parsed = _settled(parsing, session, {0})
        outcomes = _apply(session, parsed, {0})
        _audit(session, principal, "single", parsed, outcomes)
    metrics.FHIR_RESOURCES.labels(outcomes[0].resource_type, "stored").inc()
    return outcomes[0]
