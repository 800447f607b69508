"""FHIR R4 server: CapabilityStatement, Bundles (transaction, batch), and REST on each resource type — read, vread,
history, search with paging, create (conditional), update (If-Match, conditional), delete. The resources we
produce (DiagnosticReport, result Observations, Provenance, Device) are read and searched the same way; AuditEvent
is read from the audit log, for administrators.

Every error is an OperationOutcome (service/api/errors.py). Every access is audited; a search never returns a
resource type the caller's scopes do not cover, and a SMART patient-level token only ever sees its patient.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api.auth import may_read, patient_compartment
from service.api.deps import AuthenticatedDep, RuntimeDep, audit_denial, check, checked
from service.api.errors import FHIR_JSON
from service.errors import Forbidden, InvalidInput, NotFound, PayloadTooLarge, UnsupportedMediaType
from service.flows import fhir as fhir_flow
from service.flows.runtime import Runtime
from service.ingest import fhir as fhir_ingest
from service.results import fhir as fhir_results
from service.schemas import Principal
from service.store import audit, clinical, db, fhir_store
from service.store.tables import AuditEvent as AuditRow

router = APIRouter(prefix="/fhir", tags=["FHIR R4"])

WRITABLE_TYPES = fhir_flow.WRITABLE_TYPES
PRODUCED_TYPES = ("DiagnosticReport", "Provenance", "Device")
SEARCHABLE_TYPES = tuple(fhir_store.SEARCH_PARAMETERS)
FHIR_VERSION = "4.0.1"
# the largest resource version (a 32-bit column) a row can have: a larger one in a URL is simply not found, never
# bound in SQL (where it overflows); an AuditEvent id likewise up to db.MAX_KEY
MAX_VERSION = 2**31 - 1
_DIGITS = re.compile(r"[0-9]{1,30}")  # ASCII only: str.isdigit() also takes "²", which int() refuses


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _resource_headers(body: dict[str, Any]) -> dict[str, str]:
    meta = body.get("meta") or {}
    headers = {}
    if meta.get("versionId"):
        headers["ETag"] = f'W/"{meta["versionId"]}"'
    if meta.get("lastUpdated"):
        headers["Last-Modified"] = meta["lastUpdated"]
    return headers


def _check_type(resource_type: str) -> None:
    if resource_type not in SEARCHABLE_TYPES and resource_type != "AuditEvent":
        supported = ", ".join(sorted([*SEARCHABLE_TYPES, "AuditEvent"]))
        raise NotFound(f"clinfer does not serve {resource_type} resources (supported: {supported})")


def _compartment(
    request: Request, runtime: Runtime, principal: Principal, resource_type: str, permission: str
) -> str | None:
    try:
        return patient_compartment(principal, resource_type, permission)
    except Forbidden:
        check(request, runtime, principal, resource_type, permission)  # audits the denial and raises
        raise


def _patient_pk(session: Any, patient_resource_id: str | None) -> int | None:
    if patient_resource_id is None:
        return None
    patient = clinical.get_patient(session=session, resource_id=patient_resource_id)
    return patient.id if patient is not None else -1  # an unknown launch patient sees nothing


def _check_fhir_version(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "fhirversion" and not value.strip().strip('"').startswith("4.0"):
            raise InvalidInput(f"fhirVersion={value.strip()} is not served: clinfer speaks FHIR R4 ({FHIR_VERSION})")
    accept = request.headers.get("accept", "")
    if "fhirversion=" in accept.lower() and "fhirversion=4.0" not in accept.lower().replace(" ", ""):
        raise InvalidInput(f"only FHIR R4 ({FHIR_VERSION}) can be returned; see the Accept header's fhirVersion")


async def _json_body(request: Request, runtime: Runtime) -> dict[str, Any]:
    _check_fhir_version(request)
    media = request.headers.get("content-type", "application/fhir+json").split(";")[0].strip().lower()
    if media not in ("application/fhir+json", "application/json", "application/json+fhir"):
        raise UnsupportedMediaType(f"send application/fhir+json, not {media}")
    limit = runtime.settings.max_fhir_bundle_bytes
    too_large = PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before a byte is read
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # never more than the limit in memory, whatever the body's length
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return fhir_ingest.load_json(b"".join(chunks))


def _number(text: str, maximum: int) -> int | None:
    """An id or version from a URL as an int, or None when no row can have it (not ASCII digits, or too large)."""
    if _DIGITS.fullmatch(text) is None:
        return None
    number = int(text)
    return number if number <= maximum else None


# --- CapabilityStatement ----------------------------------------------------------------------------------


def capability_statement(base: str) -> dict[str, Any]:
    resources = []
    for resource_type in sorted([*SEARCHABLE_TYPES, "AuditEvent"]):
        interactions = ["read", "search-type"]
        if resource_type in SEARCHABLE_TYPES:
            interactions += ["vread", "history-instance"]
        if resource_type in WRITABLE_TYPES:
            interactions += ["create", "update", "delete"]
        params = [
            {"name": "_id", "type": "token"},
            {"name": "_lastUpdated", "type": "date"},
        ]
        params += [
            {"name": p.name, "type": p.type, **({"documentation": p.description} if p.description else {})}
            for p in fhir_store.SEARCH_PARAMETERS.get(resource_type, ())
        ]
        if resource_type == "AuditEvent":
            params += [
                {"name": "type", "type": "token"},
                {"name": "patient", "type": "reference"},
                {"name": "outcome", "type": "token"},
            ]
        entry: dict[str, Any] = {
            "type": resource_type,
            "interaction": [{"code": code} for code in interactions],
            "searchParam": params,
        }
        includes = [
            f"{resource_type}:{p.name}"
            for p in fhir_store.SEARCH_PARAMETERS.get(resource_type, ())
            if p.type == "reference"
        ]
        revincludes = [
            f"{source}:{p.name}"
            for source, source_params in sorted(fhir_store.SEARCH_PARAMETERS.items())
            for p in source_params
            if p.type == "reference" and p.target in (None, resource_type) and resource_type in SEARCHABLE_TYPES
        ]
        if includes:
            entry["searchInclude"] = includes
        if revincludes:
            entry["searchRevInclude"] = revincludes
        if resource_type in SEARCHABLE_TYPES:
            entry["versioning"] = "versioned-update"
            entry["readHistory"] = True
        if resource_type in WRITABLE_TYPES:
            entry |= {
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalUpdate": True,
                "conditionalDelete": "not-supported",
            }
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "publisher": "clinfer",
        "kind": "instance",
        "software": {"name": "clinfer"},
        "implementation": {"description": "clinfer clinical inference service", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": "Bearer JWT with SMART v2 scopes; patient/ scopes need the patient claim",
                },
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "resource": resources,
            }
        ],
    }


@router.get("/metadata", summary="CapabilityStatement")
async def metadata(request: Request, principal: AuthenticatedDep) -> JSONResponse:
    return fhir_response(capability_statement(_base(request)))


# --- Bundles --------------------------------------------------------------------------------------------------


@router.post("", summary="Bundle: transaction (all or nothing) or batch (entry by entry)")
async def post_bundle(request: Request, runtime: RuntimeDep, principal: AuthenticatedDep) -> JSONResponse:
    body = await _json_body(request, runtime)
    if body.get("resourceType") != "Bundle":
        raise InvalidInput("POST /fhir takes a Bundle of type transaction or batch")
    if body.get("entry") is not None and not isinstance(body["entry"], list):  # before its entries are read here
        raise InvalidInput("Bundle.entry: must be an array", expression=["Bundle.entry"])
    for resource_type, permission in sorted(fhir_flow.bundle_permissions(body)):
        # writes take user/ or system/ scopes: nothing here holds a patient-level writer to its patient
        await checked(request, runtime, principal, resource_type, permission, patient_scopes=False)
    response = await run_in_threadpool(fhir_flow.process_bundle, runtime, body, principal=principal)
    return fhir_response(response)


# --- AuditEvent (from the audit log) ----------------------------------------------------------------------


def _audit_search(request: Request, runtime: Runtime, principal: Principal) -> JSONResponse:
    # the trail records every patient's accesses and nothing narrows it to one: user/ or system/ scopes only
    check(request, runtime, principal, "AuditEvent", "s", patient_scopes=False)
    params = list(request.query_params.multi_items())
    count, offset, event_type, patient, outcome = fhir_store.DEFAULT_COUNT, 0, None, None, None
    for name, value in params:
        if name == "_count":  # checked as on every other search
            count = fhir_store.integer_parameter("_count", value, 0, fhir_store.MAX_COUNT)
        elif name == "_offset":
            offset = fhir_store.integer_parameter("_offset", value, 0, fhir_store.MAX_OFFSET)
        elif name == "type":
            event_type = value
        elif name == "patient":
            patient = value if "/" in value else f"Patient/{value}"
        elif name == "outcome":
            outcome = value
        elif name not in ("_format", "_pretty", "_total"):
            raise InvalidInput(f"AuditEvent cannot be searched by {name!r}; supported: type, patient, outcome, _count")
    with runtime.sessions.begin() as session:
        rows = audit.list_events(
            session=session,
            after_id=0,
            limit=count + offset + 1,
            event_type=event_type,
            patient_ref=patient,
            outcome=outcome,
        )
        page = rows[offset : offset + count]
        resources = [fhir_results.audit_event(row) for row in page]
        audit.append(
            session=session,
            principal=principal,
            event_type="auditevent.search",
            action="E",
            entity_type="AuditEvent",
            entity_ref="AuditEvent?" + urlencode(params)[:200],
            patient_ref=patient,
            detail={"results": len(resources)},
        )
    more = len(rows) > offset + count
    return fhir_response(_searchset(request, resources, total=None, count=count, offset=offset, more=more))


def _searchset(
    request: Request,
    resources: list[dict[str, Any]],
    *,
    total: int | None,
    count: int,
    offset: int,
    more: bool,
    included: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    base = _base(request)
    path = request.url.path.removeprefix("/fhir")
    kept = [(k, v) for k, v in request.query_params.multi_items() if k not in ("_offset", "_count")]

    def page_url(page_offset: int) -> str:
        return f"{base}{path}?" + urlencode([*kept, ("_count", str(count)), ("_offset", str(page_offset))])

    links = {"self": page_url(offset)}
    if more:
        links["next"] = page_url(offset + count)
    if offset > 0:
        links["previous"] = page_url(max(0, offset - count))
    return fhir_results.searchset(resources, base_url=base, total=total, links=links, included=included or ())


# --- REST on each type ------------------------------------------------------------------------------------


@router.get("/{resource_type}", summary="search")
def search(resource_type: str, request: Request, runtime: RuntimeDep, principal: AuthenticatedDep) -> JSONResponse:
    _check_type(resource_type)
    if resource_type == "AuditEvent":
        return _audit_search(request, runtime, principal)
    compartment = _compartment(request, runtime, principal, resource_type, "s")
    search_request = fhir_store.parse_search(resource_type, request.query_params.multi_items())
    # What _include and _revinclude add is read as the matches are: each type added needs the token's read scope
    # (a 403 otherwise), and is held to the compartment of the scope that covers it, which may be narrower than
    # the searched type's (user/DiagnosticReport.rs with patient/Patient.rs includes that one patient only).
    added_compartments: dict[str, str | None] = {}

    def compartment_of(added: str) -> str | None:
        if added not in added_compartments:
            added_compartments[added] = _compartment(request, runtime, principal, added, "r")
        return added_compartments[added]

    for added in sorted(
        {i.target for i in search_request.includes if i.target} | {i.source for i in search_request.revincludes}
    ):
        compartment_of(added)  # refused before anything is read
    with runtime.sessions.begin() as session:
        patient_pk = _patient_pk(session, compartment)
        rows, total = fhir_store.search(session=session, request=search_request, patient_id=patient_pk)
        extra = fhir_store.included(
            session=session,
            request=search_request,
            matches=rows,
            # an _include without a target type may find any type: its scope is checked once the type is known
            patient_of=lambda added: _patient_pk(session, compartment_of(added)),
        )
        resources = [fhir_store.body_of(row) for row in rows]
        every_row = [*rows, *extra]
        patients = sorted(
            {p for row in every_row if (p := clinical.patient_reference(session=session, patient_id=row.patient_id))}
        )
        audit.append(
            session=session,
            principal=principal,
            event_type="fhir.search",
            action="E",
            entity_type=resource_type,
            entity_ref=f"{resource_type}?" + urlencode(search_request.filters)[:200],
            patient_ref=patients[0] if len(patients) == 1 else None,
            detail={
                "results": len(resources),
                "total": total,
                "patients": patients[:50],
                **({"included": [f"{r.resource_type}/{r.resource_id}" for r in extra][:100]} if extra else {}),
            },
        )
    more = search_request.offset + len(resources) < total
    return fhir_response(
        _searchset(
            request,
            resources,
            total=total,
            count=search_request.count,
            offset=search_request.offset,
            more=more and not search_request.summary_count,
            included=[fhir_store.body_of(row) for row in extra],
        )
    )


def _audit_read(session: Any, principal: Principal, resource_type: str, row: Any, version: int | None = None) -> None:
    audit.append(
        session=session,
        principal=principal,
        event_type="report.read" if resource_type == "DiagnosticReport" else "fhir.read",
        action="R",
        entity_type=resource_type,
        entity_ref=f"{resource_type}/{row.resource_id}" + (f"/_history/{version}" if version else ""),
        patient_ref=clinical.patient_reference(session=session, patient_id=row.patient_id),
        detail={"format": "fhir"},
    )


class _OutsideCompartment(NotFound):
    """A resource of another patient than the token's: answered as one never stored (404, so that what is hidden
    is never confirmed), and audited as a denial (``_reading``)."""

    code = "outside-compartment"

    def __init__(self, resource: str, patient_ref: str | None) -> None:
        super().__init__(f"{resource} is not known")
        self.resource = resource
        self.patient_ref = patient_ref


def _visible(session: Any, row: Any, compartment: str | None) -> None:
    if compartment is not None and row.patient_id != _patient_pk(session, compartment):
        patient_ref = clinical.patient_reference(session=session, patient_id=row.patient_id)
        raise _OutsideCompartment(f"{row.resource_type}/{row.resource_id}", patient_ref)


@contextmanager
def _reading(request: Request, runtime: Runtime, principal: Principal) -> Iterator[Any]:
    """A read's transaction. A resource outside the token's compartment rolls it back (nothing was read), and its
    refusal is recorded in a transaction of its own: every access to patient data is audited, a denied one too."""
    try:
        with runtime.sessions.begin() as session:
            yield session
    except _OutsideCompartment as hidden:
        audit_denial(runtime, request, principal, hidden, resource=hidden.resource, patient_ref=hidden.patient_ref)
        raise


@router.get("/{resource_type}/{resource_id}", summary="read")
def read(
    resource_type: str, resource_id: str, request: Request, runtime: RuntimeDep, principal: AuthenticatedDep
) -> JSONResponse:
    _check_type(resource_type)
    if resource_type == "AuditEvent":
        check(request, runtime, principal, "AuditEvent", "r", patient_scopes=False)
        with runtime.sessions.begin() as session:
            event_id = _number(resource_id, db.MAX_KEY)
            event = session.get(AuditRow, event_id) if event_id is not None else None
            if event is None:
                raise NotFound(f"AuditEvent/{resource_id} is not known")
            body = fhir_results.audit_event(event)
            audit.append(  # reading the trail is an access too (as its searches are)
                session=session,
                principal=principal,
                event_type="auditevent.read",
                action="R",
                entity_type="AuditEvent",
                entity_ref=f"AuditEvent/{event.id}",
                patient_ref=event.patient_ref,
            )
            return fhir_response(body)
    compartment = _compartment(request, runtime, principal, resource_type, "r")
    with _reading(request, runtime, principal) as session:
        row = fhir_store.current(session=session, resource_type=resource_type, resource_id=resource_id)
        if row is not None:
            _visible(session, row, compartment)
        row = fhir_store.read(session=session, resource_type=resource_type, resource_id=resource_id)
        body = fhir_store.body_of(row)
        _audit_read(session, principal, resource_type, row)
    return fhir_response(body, headers=_resource_headers(body))


@router.get("/{resource_type}/{resource_id}/_history/{version_id}", summary="vread")
def vread(
    resource_type: str,
    resource_id: str,
    version_id: str,
    request: Request,
    runtime: RuntimeDep,
    principal: AuthenticatedDep,
) -> JSONResponse:
    _check_type(resource_type)
    compartment = _compartment(request, runtime, principal, resource_type, "r")
    version = _number(version_id, MAX_VERSION)
    if version is None:
        raise NotFound(f"{resource_type}/{resource_id} has no version {version_id[:40]}")
    with _reading(request, runtime, principal) as session:
        row = fhir_store.current(session=session, resource_type=resource_type, resource_id=resource_id)
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        _visible(session, row, compartment)
        body = fhir_store.vread(session=session, resource_type=resource_type, resource_id=resource_id, version=version)
        _audit_read(session, principal, resource_type, row, version)
    return fhir_response(body, headers=_resource_headers(body))


@router.get("/{resource_type}/{resource_id}/_history", summary="history of one resource")
def instance_history(
    resource_type: str, resource_id: str, request: Request, runtime: RuntimeDep, principal: AuthenticatedDep
) -> JSONResponse:
    _check_type(resource_type)
    compartment = _compartment(request, runtime, principal, resource_type, "r")
    base = _base(request)
    with _reading(request, runtime, principal) as session:
        row = fhir_store.current(session=session, resource_type=resource_type, resource_id=resource_id)
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        _visible(session, row, compartment)
        versions = fhir_store.history(session=session, resource_type=resource_type, resource_id=resource_id)
        _audit_read(session, principal, resource_type, row)
    entries = []
    for version in versions:
        url = f"{base}/{resource_type}/{resource_id}"
        entry: dict[str, Any] = {"fullUrl": url}
        if version.body is not None:
            entry["resource"] = version.body
            entry["request"] = {"method": "POST" if version.version == 1 else "PUT", "url": f"{resource_type}"}
        else:
            entry["request"] = {"method": "DELETE", "url": f"{resource_type}/{resource_id}"}
        entry["response"] = {
            "status": "201 Created"
            if version.version == 1
            else ("204 No Content" if version.body is None else "200 OK"),
            "etag": f'W/"{version.version}"',
            "lastModified": version.updated_at.isoformat(),
        }
        entries.append(entry)
    return fhir_response({"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries})


def _write_allowed(resource_type: str) -> None:
    if resource_type not in WRITABLE_TYPES:
        raise fhir_flow.MethodNotAllowed(
            f"{resource_type} resources are produced by clinfer and cannot be written"
            if resource_type in (*PRODUCED_TYPES, "AuditEvent")
            else f"{resource_type} cannot be written"
        )


def _if_match(header: str | None) -> int | None:
    if header is None:
        return None
    text = header.strip().removeprefix("W/").strip('"')
    if _DIGITS.fullmatch(text) is None:
        raise InvalidInput(f'If-Match must be a version ETag such as W/"3", not {header[:40]!r}')
    return int(text)  # one that no version reaches fails as any other stale ETag (412)


def _write_response(
    request: Request, principal: Principal, outcome: fhir_flow.WriteOutcome, prefer: str | None
) -> Response:
    """The answer to a write: status, Location, ETag, Last-Modified, and the resource as stored unless the client
    prefers ``return=minimal`` or may not read it (a conditional create that matched writes nothing, and would
    otherwise hand a writer, such as an ingest system, the stored Patient or another patient's Observation)."""
    headers = {
        "Location": f"{_base(request)}/{outcome.resource_type}/{outcome.resource_id}/_history/{outcome.version}",
        "ETag": f'W/"{outcome.version}"',
        "Last-Modified": outcome.last_modified,
    }
    minimal = (prefer or "").strip() == "return=minimal"
    if minimal or not may_read(principal, outcome.resource_type, outcome.patient_ref):
        return Response(status_code=outcome.status, headers=headers)
    return fhir_response(outcome.resource, status=outcome.status, headers=headers)


async def _write(
    request: Request,
    runtime: Runtime,
    principal: Principal,
    *,
    resource_type: str,
    permission: str,
    method: str,
    url: str,
    prefer: str | None,
    **conditions: Any,
) -> Response:
    """One REST write: the type is served and writable, the scope allows it, the body is R4 JSON."""
    _check_type(resource_type)
    _write_allowed(resource_type)
    # user/ or system/ scopes only: a patient/ write scope would let a patient's app write into any patient's record
    await checked(request, runtime, principal, resource_type, permission, patient_scopes=False)
    body = await _json_body(request, runtime)
    outcome = await run_in_threadpool(
        fhir_flow.write_one, runtime, principal=principal, method=method, url=url, resource=body, **conditions
    )
    return _write_response(request, principal, outcome, prefer)


@router.post("/{resource_type}", summary="create (conditional with If-None-Exist)")
async def create(
    resource_type: str,
    request: Request,
    runtime: RuntimeDep,
    principal: AuthenticatedDep,
    if_none_exist: Annotated[str | None, Header()] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> Response:
    return await _write(
        request,
        runtime,
        principal,
        resource_type=resource_type,
        permission="c",
        method="POST",
        url=resource_type,
        prefer=prefer,
        if_none_exist=if_none_exist,
    )


@router.put("/{resource_type}/{resource_id}", summary="update or create with this id (If-Match)")
async def update(
    resource_type: str,
    resource_id: str,
    request: Request,
    runtime: RuntimeDep,
    principal: AuthenticatedDep,
    if_match: Annotated[str | None, Header()] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> Response:
    return await _write(
        request,
        runtime,
        principal,
        resource_type=resource_type,
        permission="u",
        method="PUT",
        url=f"{resource_type}/{resource_id}",
        prefer=prefer,
        if_match=_if_match(if_match),
    )


@router.put("/{resource_type}", summary="conditional update (PUT Type?identifier=...)")
async def conditional_update(
    resource_type: str,
    request: Request,
    runtime: RuntimeDep,
    principal: AuthenticatedDep,
    prefer: Annotated[str | None, Header()] = None,
) -> Response:
    if not request.url.query:
        raise InvalidInput(f"PUT /fhir/{resource_type} needs search criteria (a conditional update) or an id")
    return await _write(
        request,
        runtime,
        principal,
        resource_type=resource_type,
        permission="u",
        method="PUT",
        url=f"{resource_type}?{request.url.query}",
        prefer=prefer,
    )


@router.delete("/{resource_type}/{resource_id}", summary="delete (a later read answers 410 Gone)")
def delete(
    resource_type: str, resource_id: str, request: Request, runtime: RuntimeDep, principal: AuthenticatedDep
) -> Response:
    _check_type(resource_type)
    _write_allowed(resource_type)
    # user/ or system/ scopes only, as for every write: nothing holds a patient-level delete to its patient
    check(request, runtime, principal, resource_type, "d", patient_scopes=False)
    fhir_flow.write_one(runtime, principal=principal, method="DELETE", url=f"{resource_type}/{resource_id}")
    return Response(status_code=204)
