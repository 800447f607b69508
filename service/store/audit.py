"""The audit log: append-only and hash-chained.

Each event's hash covers its content and the previous event's hash, so editing, deleting or reordering a row
breaks the chain from that row on. Appends lock the single ``audit_head`` row, which serializes them across
processes on PostgreSQL (row lock) and SQLite (database write lock).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Insert, Table, Text, bindparam, func, insert, literal_column, select, update
from sqlalchemy.orm import Session

from service.schemas import Principal
from service.store.tables import AuditEvent, AuditHead

GENESIS = "0" * 64

# FHIR AuditEvent.outcome codes
SUCCESS = "0"
MINOR_FAILURE = "4"
SERIOUS_FAILURE = "8"


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def event_hash(event: AuditEvent, prev_hash: str) -> str:
    """The hash of one event given its predecessor's hash (canonical JSON, sorted keys)."""
    return _content_hash({name: getattr(event, name) for name in _HASHED}, prev_hash)


_HASHED = (
    "recorded_at",
    "event_type",
    "action",
    "outcome",
    "actor",
    "actor_role",
    "source_address",
    "entity_type",
    "entity_ref",
    "patient_ref",
    "detail",
)


def _content_hash(values: Mapping[str, Any], prev_hash: str) -> str:
    return _chain(prev_hash, _canonical(values))


def _canonical(values: Mapping[str, Any]) -> str:
    """An event's hashed content as canonical JSON (sorted keys, no spaces, UTC instant with microseconds)."""
    content = {name: values[name] for name in _HASHED}
    content["recorded_at"] = _utc(values["recorded_at"]).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _chain(prev_hash: str, canonical: str) -> str:
    """sha256 of the predecessor's hash followed by the content, in hex (PostgreSQL computes the same in
    :data:`_APPEND_POSTGRESQL`)."""
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


def append(
    *,
    session: Session,
    principal: Principal,
    event_type: str,
    action: str,
    outcome: str = SUCCESS,
    entity_type: str | None = None,
    entity_ref: str | None = None,
    patient_ref: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one event in the caller's transaction (so it commits, or rolls back, with the access it records).

    One statement on PostgreSQL (:data:`_APPEND_POSTGRESQL`: the head locked, chained and counted, and the event
    inserted with the predecessor's hash and its own); three on SQLite (the head's UPDATE that locks it and reads
    the last hash, the event's INSERT, the head's new hash).

    The head stays locked until the transaction ends, and every audited transaction of every process waits for
    it: the caller's pending changes are flushed first, so that only the event and the commit happen under the
    lock (append last in the transaction, for the same reason).
    """
    session.flush()
    values: dict[str, Any] = {
        "recorded_at": dt.datetime.now(dt.UTC),
        "event_type": event_type,
        "action": action,
        "outcome": outcome,
        "actor": principal.subject,
        "actor_role": principal.role,
        "source_address": principal.source_address,
        "entity_type": entity_type,
        "entity_ref": entity_ref,
        "patient_ref": patient_ref,
        "detail": detail or {},
    }
    canonical = _canonical(values)
    if session.get_bind().dialect.name == "postgresql":
        if session.execute(_APPEND_POSTGRESQL, {**values, "canonical": canonical}).first() is None:
            raise _missing_head()
        return
    head = session.execute(_LOCK_HEAD).scalar_one_or_none()
    if head is None:
        raise _missing_head()
    values["prev_hash"] = head
    values["hash"] = _chain(head, canonical)
    session.execute(_APPEND, values)
    session.execute(_NEW_HEAD, values)


def _missing_head() -> RuntimeError:
    return RuntimeError("audit_head row is missing: the schema was not migrated with `clinfer db upgrade`")


# Core statements on the tables, built once and given each event's values as parameters: an event is never loaded
# back, so the ORM's unit of work would be pure overhead
_EVENTS = cast(Table, AuditEvent.__table__)
_HEAD = cast(Table, AuditHead.__table__)
_LOCK_HEAD = update(_HEAD).where(_HEAD.c.id == 1).values(count=_HEAD.c.count + 1).returning(_HEAD.c.last_hash)
_APPEND = insert(_EVENTS).values(
    {name: bindparam(name, type_=_EVENTS.c[name].type) for name in (*_HASHED, "prev_hash", "hash")}
)
_NEW_HEAD = update(_HEAD).where(_HEAD.c.id == 1).values(last_hash=bindparam("hash", type_=_HEAD.c.last_hash.type))


def _append_postgresql() -> Insert:
    """One round trip: lock the head (``FOR UPDATE`` waits for the append before, then reads its hash), chain the
    event's canonical content to it with PostgreSQL's sha256 (the bytes :func:`_chain` hashes: the hex hash, then
    the content in UTF-8), count it, and insert the event with both hashes. The event's id is drawn after the lock,
    so ids follow the chain."""
    old = select(_HEAD.c.id, _HEAD.c.last_hash).where(_HEAD.c.id == 1).with_for_update().cte("old")
    content = old.c.last_hash + bindparam("canonical", type_=Text())
    chained = func.encode(func.sha256(func.convert_to(content, literal_column("'UTF8'"))), literal_column("'hex'"))
    head = (
        update(_HEAD)
        .where(_HEAD.c.id == old.c.id)
        .values(count=_HEAD.c.count + 1, last_hash=chained)
        .returning(old.c.last_hash.label("prev_hash"), _HEAD.c.last_hash.label("hash"))
        .cte("head")
    )
    event = [bindparam(name, type_=_EVENTS.c[name].type) for name in _HASHED]
    return (
        insert(_EVENTS)
        .from_select([*_HASHED, "prev_hash", "hash"], select(*event, head.c.prev_hash, head.c.hash))
        .returning(_EVENTS.c.id)  # no row: no head to chain to
    )


_APPEND_POSTGRESQL = _append_postgresql()


def list_events(
    *,
    session: Session,
    limit: int = 100,
    after_id: int = 0,
    event_type: str | None = None,
    entity_ref: str | None = None,
    patient_ref: str | None = None,
    outcome: str | None = None,
) -> list[AuditEvent]:
    query = select(AuditEvent).where(AuditEvent.id > after_id)
    if event_type:
        query = query.where(AuditEvent.event_type == event_type)
    if entity_ref:
        query = query.where(AuditEvent.entity_ref == entity_ref)
    if patient_ref:
        query = query.where(AuditEvent.patient_ref == patient_ref)
    if outcome:
        query = query.where(AuditEvent.outcome == outcome)
    return list(session.scalars(query.order_by(AuditEvent.id).limit(limit)))


@dataclass(frozen=True)
class ChainBreak:
    event_id: int
    reason: str


def _iter_all(session: Session, batch: int = 1000) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = list(
            session.scalars(select(AuditEvent).where(AuditEvent.id > last).order_by(AuditEvent.id).limit(batch))
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].id
        session.expunge_all()


def verify(*, session: Session) -> tuple[int, ChainBreak | None]:
    """Walk the chain from the start.

    Returns:
        (events checked, the first break or None when the chain is intact).
    """
    prev = GENESIS
    checked = 0
    for event in _iter_all(session):
        checked += 1
        if event.prev_hash != prev:
            return checked, ChainBreak(
                event.id, "prev_hash does not match the preceding event (row removed or reordered)"
            )
        if event_hash(event, prev) != event.hash:
            return checked, ChainBreak(event.id, "content does not match its hash (row edited)")
        prev = event.hash
    head = session.get(AuditHead, 1)
    if head is not None and head.last_hash != prev:
        return checked, ChainBreak(checked, "the chain's head does not match the last event (trailing rows removed)")
    return checked, None
