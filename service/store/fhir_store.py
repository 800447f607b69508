"""The FHIR resource store: current versions, every past version, deletions, and search.

Each write makes a new version (``meta.versionId``), keeps it in ``fhir_resource_versions`` for vread and history,
and re-extracts the resource's search parameter values into ``fhir_search_values``, in the same transaction.
Searches run in SQL over those values: token, reference, date (with FHIR prefixes) and string parameters, ANDed
across parameters and ORed across comma-separated values, with ``_id``, ``_lastUpdated``, ``_count``, paging,
``_sort`` and ``_total``/``_summary=count``. A search for a parameter we do not support is refused, never ignored.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import parse_qsl

from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    text,
    tuple_,
    union_all,
)
from sqlalchemy.orm import Session, make_transient_to_detached

from service.errors import Conflict, Gone, InvalidInput, NotFound, PreconditionFailed
from service.store import db
from service.store.tables import FhirResource, FhirResourceVersion, FhirSearchValue, UtcDateTime, utcnow

ParamType = Literal["token", "reference", "date", "string"]


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: ParamType
    paths: tuple[str, ...]
    target: str | None = None  # a reference parameter limited to one resource type (patient -> Patient)
    description: str = ""


def _p(name: str, type_: ParamType, *paths: str, target: str | None = None, description: str = "") -> SearchParam:
    return SearchParam(name, type_, paths, target, description)


_SUBJECT = (
    _p("subject", "reference", "subject", description="the subject (Patient/{id})"),
    _p("patient", "reference", "subject", target="Patient", description="the subject, when a Patient"),
)
_EFFECTIVE = ("effectiveDateTime", "effectivePeriod", "effectiveInstant")

SEARCH_PARAMETERS: dict[str, tuple[SearchParam, ...]] = {
    "Patient": (
        _p("identifier", "token", "identifier"),
        _p("gender", "token", "gender"),
        _p("birthdate", "date", "birthDate"),
        _p("name", "string", "name"),
        _p("family", "string", "name.family"),
    ),
    "Observation": (
        *_SUBJECT,
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("component-code", "token", "component.code"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("date", "date", *_EFFECTIVE),
        _p("device", "reference", "device"),
        _p("based-on", "reference", "basedOn"),
    ),
    "Condition": (
        *_SUBJECT,
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("clinical-status", "token", "clinicalStatus"),
        _p("onset-date", "date", "onsetDateTime", "onsetPeriod"),
        _p("recorded-date", "date", "recordedDate"),
    ),
    "MedicationStatement": (
        *_SUBJECT,
        _p("identifier", "token", "identifier"),
        _p("code", "token", "medicationCodeableConcept"),
        _p("status", "token", "status"),
        _p("effective", "date", "effectiveDateTime", "effectivePeriod"),
    ),
    "ImagingStudy": (
        *_SUBJECT,
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("started", "date", "started"),
        _p("modality", "token", "modality", "series.modality"),
        _p("basedon", "reference", "basedOn"),
    ),
    "ServiceRequest": (
        *_SUBJECT,
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("status", "token", "status"),
        _p("intent", "token", "intent"),
        _p("authored", "date", "authoredOn"),
    ),
    "DiagnosticReport": (
        *_SUBJECT,
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("date", "date", *_EFFECTIVE),
        _p("issued", "date", "issued"),
        _p("based-on", "reference", "basedOn"),
        _p("result", "reference", "result"),
        _p("conclusion", "token", "conclusionCode"),
    ),
    "Provenance": (
        _p("target", "reference", "target"),
        _p("patient", "reference", "target", target="Patient"),
        _p("agent", "reference", "agent.who"),
        _p("entity", "reference", "entity.what"),
        _p("recorded", "date", "recorded"),
    ),
    "Device": (
        _p("identifier", "token", "identifier"),
        _p("device-name", "string", "deviceName.name"),
        _p("manufacturer", "string", "manufacturer"),
        _p("status", "token", "status"),
    ),
}

# Result parameters we honour; any other parameter starting with "_" is refused.
CONTROL_PARAMETERS = frozenset(
    {"_count", "_offset", "_sort", "_total", "_summary", "_format", "_pretty", "_include", "_revinclude"}
)
MAX_COUNT = 1000
MAX_OFFSET = 10**9
DEFAULT_COUNT = 50


# --- extraction ---------------------------------------------------------------------------------------------


def _walk(node: Any, path: str) -> Iterator[Any]:
    head, _, rest = path.partition(".")
    values = node.get(head) if isinstance(node, dict) else None
    if values is None:
        return
    for value in values if isinstance(values, list) else [values]:
        if rest:
            yield from _walk(value, rest)
        else:
            yield value


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if isinstance(value.get("coding"), list):
            for coding in value["coding"]:
                yield from _tokens(coding)
        elif "code" in value and isinstance(value["code"], str):
            yield value.get("system"), value["code"]
        elif "value" in value and isinstance(value["value"], str):  # Identifier
            yield value.get("system"), value["value"]


_REFERENCE = re.compile(r"(?:^|/)([A-Za-z]+/[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


def normalize_reference(text: str) -> str | None:
    """``Patient/abc`` from a relative or absolute reference (a version suffix dropped); None for other forms."""
    found = _REFERENCE.search(text.strip())
    return found.group(1) if found else None


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        normalized = normalize_reference(value["reference"])
        if normalized:
            yield normalized


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value.lower()
    elif isinstance(value, dict):  # HumanName and the like
        for key in ("text", "family"):
            if isinstance(value.get(key), str):
                yield value[key].lower()
        for given in value.get("given") or []:
            if isinstance(given, str):
                yield given.lower()


_DATE = re.compile(
    r"^([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2})"
    r"(?:T([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?$"
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)
_LATEST = dt.datetime.max.replace(tzinfo=dt.UTC)


def _clamped(since_epoch: dt.timedelta) -> dt.datetime:
    """The UTC instant this long after 1970, or the calendar's edge for one beyond it: 9999-12-31 ends in year
    10000, and 0001-01-01T00:00:00+14:00 is in year 0, neither of which a datetime can hold."""
    try:
        return _EPOCH + since_epoch
    except OverflowError:
        return _EARLIEST if since_epoch < dt.timedelta(0) else _LATEST


def date_range(text: str) -> tuple[dt.datetime, dt.datetime]:
    """The half-open UTC range a FHIR date/dateTime/instant covers at its precision, clamped to the calendar
    (0001-01-01 to 9999-12-31T23:59:59.999999Z): a date at its ends is valid FHIR, stored and searched like any.

    Raises:
        InvalidInput: not a FHIR date, dateTime or instant.
    """
    match = _DATE.match(text.strip())
    if match is None:
        raise InvalidInput(f"{text!r} is not a FHIR date or dateTime (YYYY, YYYY-MM, YYYY-MM-DD, or with a time)")
    year, month, day, hour, minute, second, zone = match.groups()
    try:
        tz = dt.UTC
        if zone and zone != "Z":
            sign = 1 if zone[0] == "+" else -1
            tz = dt.timezone(sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
        start = dt.datetime(
            int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0), tzinfo=tz
        )
    except ValueError as e:
        raise InvalidInput(f"{text!r} is not a valid date: {e}") from e
    if month is None:
        length = dt.timedelta(days=366 if calendar.isleap(start.year) else 365)
    elif day is None:
        length = dt.timedelta(days=calendar.monthrange(start.year, start.month)[1])
    elif hour is None:
        length = dt.timedelta(days=1)
    else:
        length = dt.timedelta(seconds=1) if second is not None else dt.timedelta(minutes=1)
    # in timedeltas from 1970, which reach far beyond the calendar: an aware datetime's UTC may not fit in one
    since_epoch = start - _EPOCH
    return _clamped(since_epoch), _clamped(since_epoch + length)


def _dates(value: Any) -> Iterator[tuple[dt.datetime | None, dt.datetime | None]]:
    if isinstance(value, str):
        try:
            yield date_range(value)
        except InvalidInput:
            return
    elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        start = date_range(value["start"])[0] if isinstance(value.get("start"), str) else None
        end = date_range(value["end"])[1] if isinstance(value.get("end"), str) else None
        yield start, end


def search_values(resource_type: str, body: dict[str, Any]) -> list[FhirSearchValue]:
    """The search parameter values of one resource, as rows to insert (``resource_pk`` not yet set)."""
    return [FhirSearchValue(**row) for row in _search_value_rows(resource_type, body)]


def _search_value_rows(resource_type: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`search_values` as plain dicts with every column but ``resource_pk``: the writes here put them in one
    Core executemany, and building an ORM object per value cost more CPU than extracting it."""
    rows: list[dict[str, Any]] = []
    for param in SEARCH_PARAMETERS.get(resource_type, ()):
        name = param.name
        for path in param.paths:
            for element in _walk(body, path):
                if param.type == "token":
                    rows += [_search_row(name, system=s, value=c[:255]) for s, c in _tokens(element)]
                elif param.type == "reference":
                    for reference in _references(element):
                        if param.target is None or reference.startswith(f"{param.target}/"):
                            rows.append(_search_row(name, value=reference))
                elif param.type == "string":
                    rows += [_search_row(name, value=s[:255]) for s in _strings(element)]
                else:
                    rows += [_search_row(name, date_start=start, date_end=end) for start, end in _dates(element)]
    return rows


def _search_row(
    param: str,
    *,
    system: str | None = None,
    value: str | None = None,
    date_start: dt.datetime | None = None,
    date_end: dt.datetime | None = None,
) -> dict[str, Any]:
    return {"param": param, "system": system, "value": value, "date_start": date_start, "date_end": date_end}


def _search_rows(row: FhirResource) -> list[dict[str, Any]]:
    """The search value rows of a stored resource, every key present so that they go in one executemany."""
    values = _search_value_rows(row.resource_type, row.body)
    for value in values:
        value["resource_pk"] = row.id
    return values


def _reindex(session: Session, row: FhirResource, *, new: bool = False) -> None:
    if not new:
        session.execute(delete(FhirSearchValue).where(FhirSearchValue.resource_pk == row.id))
    if row.deleted:
        return
    values = _search_rows(row)
    if values:
        _insert_search_rows(session, values)


# Core INSERTs on the tables for the rows we write in bulk: they are never loaded back as objects, and the ORM's
# bulk path costs more than the statements themselves (every key is present in every row, so one executemany)
_RESOURCES = cast(Table, FhirResource.__table__)
_VERSIONS = cast(Table, FhirResourceVersion.__table__)
_SEARCH_VALUES = cast(Table, FhirSearchValue.__table__)


# PostgreSQL takes a resource's search values as one array per column in a single INSERT: one statement for the
# server to plan and run instead of one per row (a report's 73 values: 0.8 against 2.4 ms of client CPU)
_SEARCH_ARRAYS = {
    "resource_pk": "BIGINT",
    "param": "VARCHAR",
    "system": "VARCHAR",
    "value": "VARCHAR",
    "date_start": "TIMESTAMPTZ",
    "date_end": "TIMESTAMPTZ",
}
_UNNEST_SEARCH_VALUES = text(
    f"INSERT INTO {_SEARCH_VALUES.name} ({', '.join(_SEARCH_ARRAYS)}) SELECT * FROM unnest("
    + ", ".join(f"CAST(:{name} AS {sql_type}[])" for name, sql_type in _SEARCH_ARRAYS.items())
    + ")"
)
_UTC = UtcDateTime()


def _insert_search_rows(session: Session, values: list[dict[str, Any]]) -> None:
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql":
        session.execute(insert(_SEARCH_VALUES), values)
        return
    columns: dict[str, list[Any]] = {name: [row[name] for row in values] for name in _SEARCH_ARRAYS}
    for name in ("date_start", "date_end"):  # as the column's type would bind them: UTC, never naive
        columns[name] = [_UTC.process_bind_param(value, dialect) for value in columns[name]]
    session.execute(_UNNEST_SEARCH_VALUES, columns)


# --- reads and writes ---------------------------------------------------------------------------------------


def _instant(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def current(*, session: Session, resource_type: str, resource_id: str, for_update: bool = False) -> FhirResource | None:
    """The current row of a resource, deleted or not."""
    query = select(FhirResource).where(
        FhirResource.resource_type == resource_type, FhirResource.resource_id == resource_id
    )
    return session.scalar(query.with_for_update() if for_update else query)


def existing_keys(*, session: Session, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (resource type, id) have a current row (deleted or not), in one SELECT."""
    wanted = list(dict.fromkeys(keys))
    if not wanted:
        return set()
    rows = session.execute(
        select(FhirResource.resource_type, FhirResource.resource_id).where(
            tuple_(FhirResource.resource_type, FhirResource.resource_id).in_(wanted)
        )
    )
    return {(resource_type, resource_id) for resource_type, resource_id in rows}


def read(*, session: Session, resource_type: str, resource_id: str) -> FhirResource:
    """Raises:
    NotFound: never stored.  Gone: deleted.
    """
    row = current(session=session, resource_type=resource_type, resource_id=resource_id)
    if row is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    if row.deleted:
        raise Gone(f"{resource_type}/{resource_id} was deleted (version {row.version})")
    return row


def vread(*, session: Session, resource_type: str, resource_id: str, version: int) -> dict[str, Any]:
    found = session.scalar(
        select(FhirResourceVersion).where(
            FhirResourceVersion.resource_type == resource_type,
            FhirResourceVersion.resource_id == resource_id,
            FhirResourceVersion.version == version,
        )
    )
    if found is None:
        raise NotFound(f"{resource_type}/{resource_id} has no version {version}")
    if found.body is None:
        raise Gone(f"version {version} of {resource_type}/{resource_id} is its deletion")
    return dict(found.body)


def history(*, session: Session, resource_type: str, resource_id: str) -> list[FhirResourceVersion]:
    return list(
        session.scalars(
            select(FhirResourceVersion)
            .where(FhirResourceVersion.resource_type == resource_type, FhirResourceVersion.resource_id == resource_id)
            .order_by(FhirResourceVersion.version.desc())
        )
    )


def _stored(body: dict[str, Any], resource_id: str, version: int, last_updated: str) -> dict[str, Any]:
    """The body as stored: its id, and ``meta.versionId`` and ``meta.lastUpdated`` set here."""
    meta = {k: v for k, v in (body.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    return {**body, "id": resource_id, "meta": {**meta, "versionId": str(version), "lastUpdated": last_updated}}


def _check_update(row: FhirResource, origin: str, if_match: int | None) -> None:
    if row.origin != origin:
        raise Conflict(
            f"{row.resource_type}/{row.resource_id} is produced by clinfer and cannot be written by a client"
        )
    if if_match is not None and if_match != row.version:
        raise PreconditionFailed(
            f"{row.resource_type}/{row.resource_id} is at version {row.version}, not {if_match} (If-Match)"
        )


def put(
    *,
    session: Session,
    resource_type: str,
    resource_id: str,
    body: dict[str, Any],
    patient_id: int | None,
    origin: str = "received",
    if_match: int | None = None,
) -> tuple[FhirResource, bool]:
    """Create or update (a new version of) a resource; ``meta.versionId`` and ``meta.lastUpdated`` are set here.

    Args:
        if_match: the version the caller last saw (If-Match); another current version fails the update.
        origin: "received" for clients' resources, "result" for the ones we produce (clients may not write them).

    Returns:
        (the row, True when the resource was created).

    Raises:
        PreconditionFailed: ``if_match`` is not the current version.
        Conflict: a client write to a resource we produce, or the other way round.
    """
    row = current(session=session, resource_type=resource_type, resource_id=resource_id, for_update=True)
    now = utcnow()

    def stored(version: int) -> dict[str, Any]:
        return _stored(body, resource_id, version, _instant(now))

    created = row is None
    if row is None:
        if if_match is not None:
            raise PreconditionFailed(f"{resource_type}/{resource_id} does not exist; If-Match cannot hold")
        row = db.insert_unless_clash(
            session,
            FhirResource,
            resource_type=resource_type,
            resource_id=resource_id,
            version=1,
            origin=origin,
            body=stored(1),
            patient_id=patient_id,
            deleted=False,
            updated_at=now,
        )
        if row is None:  # created meanwhile by another request: update it instead
            return put(
                session=session,
                resource_type=resource_type,
                resource_id=resource_id,
                body=body,
                patient_id=patient_id,
                origin=origin,
                if_match=if_match,
            )
    else:
        _check_update(row, origin, if_match)
        row.version += 1
        row.body, row.patient_id, row.deleted, row.updated_at = stored(row.version), patient_id, False, now
    session.execute(
        insert(_VERSIONS),
        [
            {
                "resource_type": resource_type,
                "resource_id": resource_id,
                "version": row.version,
                "body": row.body,
                "updated_at": now,
            }
        ],
    )
    if not created:
        session.flush()
    _reindex(session, row, new=created)
    return row, created


@dataclass(frozen=True)
class PutRequest:
    """One write for :func:`put_many`; the fields mean what :func:`put`'s arguments mean.

    ``create_only``: when the resource exists, leave it as it is (its row is returned, not created).
    ``where``: a label for error messages (``Bundle.entry[3]``), prefixed to them and given as their expression.
    ``complete``: called before ``body`` is stored with the versions (by ``Type/id``) that the requests before this
    one will have once written; it may change ``body`` in place (a Provenance that names the versions it covers).
    ``new``: the writer made this id for this write (a new report's resources), or looked for it in this transaction
    and did not find it (a Bundle's new resources), so :func:`put_many` does not look for its current row. The
    outcome is the same when that is wrong: the INSERT then clashes on the unique key and the requests are written
    one by one, with every check of :func:`put`. A request with ``if_match`` is looked for all the same.
    """

    resource_type: str
    resource_id: str
    body: dict[str, Any]
    patient_id: int | None
    origin: str = "received"
    if_match: int | None = None
    create_only: bool = False
    where: str | None = None
    complete: Callable[[dict[str, int]], None] | None = None
    new: bool = False


def _current_many(
    session: Session, keys: list[tuple[str, str]], *, for_update: bool
) -> dict[tuple[str, str], FhirResource]:
    """The current rows of many resources in one SELECT."""
    if not keys:
        return {}
    query = select(FhirResource).where(tuple_(FhirResource.resource_type, FhirResource.resource_id).in_(keys))
    rows = session.scalars(query.with_for_update() if for_update else query)
    return {(row.resource_type, row.resource_id): row for row in rows}


def _refuse(request: PutRequest, error: PreconditionFailed | Conflict) -> PreconditionFailed | Conflict:
    if request.where is None:
        return error
    return type(error)(f"{request.where}: {error.message}", expression=[request.where])


def put_many(*, session: Session, requests: list[PutRequest]) -> list[tuple[FhirResource, bool]]:
    """:func:`put` for each request, with the same rows, versions, search values and errors, in a few statements:
    one SELECT of the current rows (none for requests marked ``new``), one INSERT of the new ones, one of their
    versions, one of their search values.

    Returns:
        (row, True when created) per request, in order.

    Raises:
        PreconditionFailed, Conflict: as :func:`put`, for the first request (in order) that fails; nothing is
        written then.
    """
    keys = [(r.resource_type, r.resource_id) for r in requests]
    if len(set(keys)) != len(keys):  # a resource twice: each write must see the one before it
        return _put_each(session, requests)
    # the rows to update are locked; one that is only created when missing (create_only) is not, so that writers
    # sharing it (every report of a model version names its Device) do not wait for each other; one the writer
    # knows to be new is not looked for (the unique key stands guard: see PutRequest.new)
    looked_for = [(k, r) for k, r in zip(keys, requests, strict=True) if not r.new or r.if_match is not None]
    found = _current_many(session, [k for k, r in looked_for if not r.create_only], for_update=True) | _current_many(
        session, [k for k, r in looked_for if r.create_only], for_update=False
    )
    for request, key in zip(requests, keys, strict=True):
        row = found.get(key)
        try:
            if row is None:
                if request.if_match is not None:
                    raise PreconditionFailed(f"{key[0]}/{key[1]} does not exist; If-Match cannot hold")
            elif not request.create_only:
                _check_update(row, request.origin, request.if_match)
        except (PreconditionFailed, Conflict) as e:
            raise _refuse(request, e) from e
    planned: dict[str, int] = {}
    for request, key in zip(requests, keys, strict=True):
        if request.complete is not None:
            request.complete(dict(planned))
        row = found.get(key)
        planned[f"{key[0]}/{key[1]}"] = 1 if row is None else row.version if request.create_only else row.version + 1
    now = utcnow()
    last_updated = _instant(now)
    created_rows = [
        FhirResource(
            resource_type=request.resource_type,
            resource_id=request.resource_id,
            version=1,
            origin=request.origin,
            body=_stored(request.body, request.resource_id, 1, last_updated),
            patient_id=request.patient_id,
            deleted=False,
            updated_at=now,
        )
        for request, key in zip(requests, keys, strict=True)
        if key not in found
    ]
    if created_rows:
        columns = ("resource_type", "resource_id", "version", "origin", "body", "patient_id", "deleted", "updated_at")
        inserted = session.execute(  # one INSERT of all new rows; one created meanwhile by another request is skipped
            db.insert_skipping_clashes(session, _RESOURCES).returning(
                _RESOURCES.c.id, _RESOURCES.c.resource_type, _RESOURCES.c.resource_id
            ),
            [{name: getattr(row, name) for name in columns} for row in created_rows],
        )
        ids = {(resource_type, resource_id): pk for pk, resource_type, resource_id in inserted}
        if len(ids) < len(created_rows):  # then the ones inserted are taken back, and all written one by one
            if ids:
                session.execute(delete(_RESOURCES).where(_RESOURCES.c.id.in_(list(ids.values()))))
            return _put_each(session, requests)
        for row in created_rows:
            row.id = ids[(row.resource_type, row.resource_id)]
            make_transient_to_detached(row)  # persistent as inserted, without another INSERT
            session.add(row)
    results: list[tuple[FhirResource, bool]] = []
    versions: list[dict[str, Any]] = []
    search_rows: list[dict[str, Any]] = []
    updated_pks: list[int] = []
    created_by_key = {(row.resource_type, row.resource_id): row for row in created_rows}
    for request, key in zip(requests, keys, strict=True):
        row = found.get(key)
        if row is None:
            row = created_by_key[key]
            results.append((row, True))
        elif request.create_only:
            results.append((row, False))
            continue
        else:
            row.version += 1
            row.body = _stored(request.body, request.resource_id, row.version, last_updated)
            row.patient_id, row.deleted, row.updated_at = request.patient_id, False, now
            updated_pks.append(row.id)
            results.append((row, False))
        versions.append(
            {
                "resource_type": row.resource_type,
                "resource_id": row.resource_id,
                "version": row.version,
                "body": row.body,
                "updated_at": now,
            }
        )
        search_rows += _search_rows(row)
    if versions:
        session.execute(insert(_VERSIONS), versions)
    if updated_pks:
        session.flush()
        session.execute(delete(FhirSearchValue).where(FhirSearchValue.resource_pk.in_(updated_pks)))
    if search_rows:
        _insert_search_rows(session, search_rows)
    return results


def _put_each(session: Session, requests: list[PutRequest]) -> list[tuple[FhirResource, bool]]:
    results: list[tuple[FhirResource, bool]] = []
    versions: dict[str, int] = {}
    for request in requests:
        if request.complete is not None:
            request.complete(dict(versions))
        row, created = _put_one(session, request)
        versions[f"{row.resource_type}/{row.resource_id}"] = row.version
        results.append((row, created))
    return results


def _put_one(session: Session, request: PutRequest) -> tuple[FhirResource, bool]:
    if request.create_only:
        existing = current(
            session=session, resource_type=request.resource_type, resource_id=request.resource_id, for_update=True
        )
        if existing is not None:
            return existing, False
    try:
        return put(
            session=session,
            resource_type=request.resource_type,
            resource_id=request.resource_id,
            body=request.body,
            patient_id=request.patient_id,
            origin=request.origin,
            if_match=request.if_match,
        )
    except (PreconditionFailed, Conflict) as e:
        raise _refuse(request, e) from e


def delete_resource(*, session: Session, resource_type: str, resource_id: str) -> FhirResource:
    """Delete (a new, empty version); reading it then answers 410. Deleting a deleted resource changes nothing.

    Raises:
        NotFound: never stored.  Conflict: a resource we produce.
    """
    row = current(session=session, resource_type=resource_type, resource_id=resource_id, for_update=True)
    if row is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    if row.origin != "received":
        raise Conflict(f"{resource_type}/{resource_id} is produced by clinfer and cannot be deleted by a client")
    if row.deleted:
        return row
    now = utcnow()
    row.version += 1
    row.deleted, row.updated_at = True, now
    session.add(
        FhirResourceVersion(
            resource_type=resource_type, resource_id=resource_id, version=row.version, body=None, updated_at=now
        )
    )
    session.flush()
    _reindex(session, row)
    return row


def body_of(row: FhirResource) -> dict[str, Any]:
    return dict(row.body)


# --- search ------------------------------------------------------------------------------------------------

_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")


@dataclass(frozen=True)
class SearchRequest:
    resource_type: str
    filters: list[tuple[str, str]]  # (name[:modifier], value) as given
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: str | None = None
    summary_count: bool = False
    includes: tuple[Include, ...] = ()  # _include: resources the matches refer to
    revincludes: tuple[Include, ...] = ()  # _revinclude: resources that refer to the matches


@dataclass(frozen=True)
class Include:
    """``_include=source:param[:target]`` or ``_revinclude=source:param[:target]``: a reference search parameter of
    ``source`` followed forwards (to what the matches refer to) or backwards (to what refers to the matches)."""

    source: str
    param: str
    target: str | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.param}" + (f":{self.target}" if self.target else "")


MAX_INCLUDES = 5  # _include and _revinclude parameters, each
MAX_INCLUDED = 1000  # resources added to one page by them


def _parse_include(resource_type: str, name: str, value: str) -> Include:
    """Check an ``_include`` or ``_revinclude`` value against our reference search parameters.

    Raises:
        InvalidInput: not ``Type:param[:Target]``, a wildcard, a parameter that is not a reference, or one that does
            not start (``_include``) or end (``_revinclude``) at the searched type.
    """
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(parts) or "*" in parts:
        raise InvalidInput(f"{name}={value[:80]!r}: give SourceType:parameter[:TargetType] (no wildcard)")
    include = Include(*parts)
    reference = next(
        (p for p in SEARCH_PARAMETERS.get(include.source, ()) if p.name == include.param and p.type == "reference"),
        None,
    )
    if reference is None:
        raise InvalidInput(f"{name}={value}: {include.param!r} is not a reference search parameter of {include.source}")
    if name == "_include" and include.source != resource_type:
        raise InvalidInput(f"_include={value}: a search of {resource_type} includes from {resource_type}:<parameter>")
    if name == "_revinclude" and include.target not in (None, resource_type):
        raise InvalidInput(f"_revinclude={value}: a search of {resource_type} includes what refers to {resource_type}")
    if include.target is not None and reference.target not in (None, include.target):
        raise InvalidInput(f"{name}={value}: {include.source}.{include.param} refers to {reference.target} only")
    return include


def parse_search(resource_type: str, params: Iterable[tuple[str, str]]) -> SearchRequest:
    """Check a search's parameters against what we support.

    Raises:
        InvalidInput: an unknown parameter or modifier, or a bad _count/_offset/_sort (the message names it).
    """
    supported = {p.name: p for p in SEARCH_PARAMETERS.get(resource_type, ())}
    filters: list[tuple[str, str]] = []
    count, offset, sort, summary_count = DEFAULT_COUNT, 0, None, False
    includes: dict[str, list[Include]] = {"_include": [], "_revinclude": []}
    for name, value in params:
        base, _, modifier = name.partition(":")
        if base in includes:
            if modifier:
                raise InvalidInput(f"{name} is not supported (no :{modifier}; one level of inclusion only)")
            if len(includes[base]) == MAX_INCLUDES:
                raise InvalidInput(f"at most {MAX_INCLUDES} {base} parameters in one search")
            includes[base].append(_parse_include(resource_type, base, value))
        elif base == "_count":
            count = integer_parameter("_count", value, 0, MAX_COUNT)
        elif base == "_offset":
            offset = integer_parameter("_offset", value, 0, MAX_OFFSET)
        elif base == "_sort":
            if value not in ("_lastUpdated", "-_lastUpdated", "_id", "-_id"):
                raise InvalidInput(f"_sort={value} is not supported (use _lastUpdated, -_lastUpdated, _id or -_id)")
            sort = value
        elif base == "_summary":
            if value not in ("count", "false"):
                raise InvalidInput(f"_summary={value} is not supported (use count)")
            summary_count = value == "count"
        elif base in ("_total", "_format", "_pretty"):
            continue  # the total is always counted; JSON is the only format
        elif base in ("_id", "_lastUpdated"):
            if modifier:
                raise InvalidInput(f"the modifier :{modifier} is not supported on {base}")
            filters.append((base, value))
        elif base in supported:
            param = supported[base]
            allowed = {"token": ("", "exact"), "reference": ("",), "date": ("",), "string": ("", "exact", "contains")}
            if modifier not in allowed[param.type] and not (param.type == "token" and modifier == "not"):
                raise InvalidInput(f"the modifier :{modifier} is not supported on {resource_type}.{base}")
            filters.append((name, value))
        else:
            known = ", ".join(sorted([*supported, "_id", "_lastUpdated", *CONTROL_PARAMETERS]))
            raise InvalidInput(f"{resource_type} cannot be searched by {name!r}; supported: {known}")
    return SearchRequest(
        resource_type,
        filters,
        count,
        offset,
        sort,
        summary_count,
        tuple(dict.fromkeys(includes["_include"])),
        tuple(dict.fromkeys(includes["_revinclude"])),
    )


_INTEGER = re.compile(r"-?[0-9]+")


def integer_parameter(name: str, value: str, low: int, high: int) -> int:
    """A search's integer parameter (``_count``, ``_offset``): ASCII digits within [low, high].

    Raises:
        InvalidInput: not an integer (digits of other scripts included: "²" passes str.isdigit()), or out of range.
    """
    if _INTEGER.fullmatch(value) is None:
        raise InvalidInput(f"{name}={value[:40]!r} is not an integer")
    if len(value) > 30 or not low <= int(value) <= high:  # int() of thousands of digits is refused, and slow
        raise InvalidInput(f"{name} must be between {low} and {high}, not {value[:40]}")
    return int(value)


def _split_prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in _PREFIXES and not value[:2].isdigit():
        return value[:2], value[2:]
    return "eq", value


def _date_condition(start_col: Any, end_col: Any, value: str) -> ColumnElement[bool]:
    prefix, text = _split_prefix(value)
    low, high = date_range(text)
    if prefix == "ap":
        prefix = "eq"
    conditions: dict[str, ColumnElement[bool]] = {
        "eq": and_(start_col >= low, end_col <= high),
        "ne": not_(and_(start_col >= low, end_col <= high)),
        "lt": start_col < low,
        "le": start_col < high,
        "gt": end_col > high,
        "ge": end_col > low,
        "sa": start_col >= high,
        "eb": end_col <= low,
    }
    return conditions[prefix]


_ESCAPED = re.compile(r"\\([\\,|$])")


def escape(value: str) -> str:
    """A literal value made safe for a search parameter: its backslash, ``,``, ``|`` and ``$`` escaped (FHIR R4
    3.1.1.6), so that an accession number "A,B" is one value, not two."""
    return re.sub(r"([\\,|$])", r"\\\1", value)


def _unescape(value: str) -> str:
    return _ESCAPED.sub(r"\1", value)


def _split_unescaped(value: str, separator: str, maxsplit: int = -1) -> list[str]:
    """``value`` split at each ``separator`` that no backslash escapes; the parts keep their escapes."""
    parts: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == "\\" and index + 1 < len(value):
            current.append(value[index : index + 2])
            index += 2
            continue
        if char == separator and (maxsplit < 0 or len(parts) < maxsplit):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def _token_condition(value: str) -> ColumnElement[bool]:
    pieces = _split_unescaped(value, "|", maxsplit=1)
    if len(pieces) == 2:
        system, code = (_unescape(piece) for piece in pieces)
        parts = []
        parts.append(FhirSearchValue.system.is_(None) if system == "" else FhirSearchValue.system == system)
        if code:
            parts.append(FhirSearchValue.value == code)
        return and_(*parts)
    return FhirSearchValue.value == _unescape(value)


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _value_exists(name: str, condition: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists().where(FhirSearchValue.resource_pk == FhirResource.id, FhirSearchValue.param == name, condition)


def _filter(resource_type: str, name: str, values: list[str]) -> ColumnElement[bool]:
    base, _, modifier = name.partition(":")
    if base == "_id":
        return FhirResource.resource_id.in_(values)
    if base == "_lastUpdated":
        return or_(*(_date_condition(FhirResource.updated_at, FhirResource.updated_at, v) for v in values))
    param = next(p for p in SEARCH_PARAMETERS[resource_type] if p.name == base)
    if param.type == "token":  # split at its unescaped "|" first
        matched = or_(*(_token_condition(v) for v in values))
        return not_(_value_exists(base, matched)) if modifier == "not" else _value_exists(base, matched)
    values = [_unescape(v) for v in values]
    if param.type == "reference":
        options = []
        for value in values:
            reference = normalize_reference(value) if "/" in value else None
            if reference is not None:
                options.append(FhirSearchValue.value == reference)
            elif param.target is not None:
                options.append(FhirSearchValue.value == f"{param.target}/{value}")
            else:
                options.append(FhirSearchValue.value.like(f"%/{value}"))
        return _value_exists(base, or_(*options))
    if param.type == "string":
        if modifier == "exact":
            return _value_exists(base, FhirSearchValue.value.in_([v.lower() for v in values]))
        pattern = "%{}%" if modifier == "contains" else "{}%"
        return _value_exists(
            base, or_(*(FhirSearchValue.value.like(pattern.format(_like(v.lower())), escape="\\") for v in values))
        )
    return _value_exists(
        base, or_(*(_date_condition(FhirSearchValue.date_start, FhirSearchValue.date_end, v) for v in values))
    )


def search(
    *, session: Session, request: SearchRequest, patient_id: int | None = None
) -> tuple[list[FhirResource], int]:
    """Run a checked search.

    Args:
        patient_id: limit the search to one patient's compartment (a patient-context token).

    Returns:
        (one page of current, non-deleted rows, the total number of matches).
    """
    conditions = _conditions(request, patient_id)
    total = session.scalar(select(func.count(FhirResource.id)).where(*conditions)) or 0
    if request.summary_count or request.count == 0:
        return [], total
    return list(session.scalars(_page(select(FhirResource), request, conditions))), total


def included(
    *,
    session: Session,
    request: SearchRequest,
    matches: list[FhirResource],
    patient_of: Callable[[str], int | None] = lambda resource_type: None,
) -> list[FhirResource]:
    """The resources a page's ``_include`` and ``_revinclude`` add: current, not deleted, not among the matches,
    each within the compartment ``patient_of(its type)`` names when it names one (Devices, which hold no patient's
    data, excepted), at most :data:`MAX_INCLUDED`, in storage order. Two SELECTs per parameter at most.

    Args:
        patient_of: the patient (primary key) a resource type added is limited to, None for none; it may raise
            (a type the caller may not read) once a type is found.
    """
    if not matches or not (request.includes or request.revincludes):
        return []
    pks = [match.id for match in matches]

    def scope(resource_type: str) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = [FhirResource.deleted == false()]
        patient_id = patient_of(resource_type)
        if patient_id is not None and resource_type != "Device":
            conditions.append(FhirResource.patient_id == patient_id)
        return conditions

    found: dict[int, FhirResource] = {}
    for include in request.includes:
        references = session.scalars(
            select(FhirSearchValue.value).where(
                FhirSearchValue.resource_pk.in_(pks), FhirSearchValue.param == include.param
            )
        )
        wanted: dict[str, set[str]] = {}
        for reference in references:
            resource_type, _, resource_id = (reference or "").partition("/")
            if resource_id and include.target in (None, resource_type):
                wanted.setdefault(resource_type, set()).add(resource_id)
        for resource_type, ids in sorted(wanted.items()):
            query = select(FhirResource).where(
                FhirResource.resource_type == resource_type,
                FhirResource.resource_id.in_(sorted(ids)),
                *scope(resource_type),
            )
            found.update((row.id, row) for row in session.scalars(query.limit(MAX_INCLUDED)))
    referred = [f"{request.resource_type}/{match.resource_id}" for match in matches]
    for include in request.revincludes:
        query = select(FhirResource).where(
            FhirResource.resource_type == include.source,
            _value_exists(include.param, FhirSearchValue.value.in_(referred)),
            *scope(include.source),
        )
        found.update((row.id, row) for row in session.scalars(query.order_by(FhirResource.id).limit(MAX_INCLUDED)))
    matched = set(pks)
    return [found[pk] for pk in sorted(found) if pk not in matched][:MAX_INCLUDED]


def condition(resource_type: str, query: str) -> SearchRequest:
    """A conditional write's criteria (``If-None-Exist``, ``PUT Type?query``, a Bundle entry's ``ifNoneExist``) as a
    search that tells no match, one and several apart: its result parameters (``_count``, ``_offset``, ``_sort``,
    ``_summary``...) are left out, since a condition is about which resources match, not which page of them
    is shown (``_count=0`` would match nothing, ``_count=1`` would hide a second match).

    Raises:
        InvalidInput: a parameter we do not support, or no criteria at all (a condition on every resource).
    """
    request = parse_search(resource_type, parse_qsl(query, keep_blank_values=True))
    if not request.filters:
        raise InvalidInput(f"the condition {query!r} has no search criteria")
    return SearchRequest(resource_type, request.filters, count=2)


def condition_key(request: SearchRequest) -> str:
    """One name for a condition however its criteria are ordered (an advisory lock's key)."""
    return f"fhir-condition:{request.resource_type}?" + "&".join(sorted(f"{n}={v}" for n, v in request.filters))


def matching_ids(*, session: Session, request: SearchRequest) -> list[str]:
    """The ids of the resources on the first page of a checked search, without counting them all or reading
    their bodies (for conditional writes and order links)."""
    if request.summary_count or request.count == 0:
        return []
    return list(session.scalars(_page(select(FhirResource.resource_id), request, _conditions(request, None))))


def matching_ids_of_each(*, session: Session, requests: list[SearchRequest]) -> list[list[str]]:
    """:func:`matching_ids` of several searches in one SELECT (a UNION ALL of their first pages), in the order of
    the searches; each search's ids in the default order (of storage), so none may ask for another (``_sort``)."""
    if any(request.sort is not None for request in requests):
        raise ValueError("matching_ids_of_each keeps the default order only")
    pages = [
        _page(
            select(literal(index).label("search"), FhirResource.id.label("pk"), FhirResource.resource_id),
            request,
            _conditions(request, None),
        ).subquery()
        for index, request in enumerate(requests)
        if not (request.summary_count or request.count == 0)
    ]
    found: list[list[str]] = [[] for _ in requests]
    if not pages:
        return found
    every = union_all(*(select(page.c.search, page.c.pk, page.c.resource_id) for page in pages)).subquery()
    for search, _, resource_id in session.execute(select(every).order_by(every.c.search, every.c.pk)):
        found[search].append(resource_id)
    return found


def _conditions(request: SearchRequest, patient_id: int | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        FhirResource.resource_type == request.resource_type,
        FhirResource.deleted == false(),
    ]
    if patient_id is not None:
        conditions.append(FhirResource.patient_id == patient_id)
    for name, value in request.filters:
        values = [v.strip() for v in _split_unescaped(value, ",") if v.strip()]
        if not values:
            raise InvalidInput(f"the search parameter {name} has no value")
        conditions.append(_filter(request.resource_type, name, values))
    return conditions


def _page(query: Any, request: SearchRequest, conditions: list[ColumnElement[bool]]) -> Any:
    order: Any = {
        None: FhirResource.id.asc(),
        "_id": FhirResource.resource_id.asc(),
        "-_id": FhirResource.resource_id.desc(),
        "_lastUpdated": FhirResource.updated_at.asc(),
        "-_lastUpdated": FhirResource.updated_at.desc(),
    }[request.sort]
    return query.where(*conditions).order_by(order, FhirResource.id).limit(request.count).offset(request.offset)
