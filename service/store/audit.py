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

from sqlalchemy import Table, insert, select, update
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
    content = {name: values[name] for name in _HASHED}
    content["recorded_at"] = _utc(values["recorded_at"]).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
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

    Two statements on PostgreSQL: the UPDATE of the head that locks it and reads the last hash, then the event's
    INSERT and the head's new hash in one statement (a data-modifying WITH); three on SQLite.

    The head stays locked until the transaction ends, and every audited transaction of every process waits for
    it: the caller's pending changes are flushed first, so that only the event and the commit happen under the
    lock (append last in the transaction, for the same reason).
    """
    session.flush()
    head = session.execute(_LOCK_HEAD).scalar_one_or_none()
    if head is None:
        raise RuntimeError("audit_head row is missing: the schema was not migrated with `clinfer db upgrade`")
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
        "prev_hash": head,
    }
    values["hash"] = _content_hash(values, head)
    new_head = update(_HEAD).where(_HEAD.c.id == 1).values(last_hash=values["hash"])
    if session.get_bind().dialect.name == "postgresql":
        session.execute(new_head.add_cte(insert(_EVENTS).values(values).cte("appended")))
    else:
        session.execute(insert(_EVENTS).values(values))
        session.execute(new_head)


# Core statements on the tables: an event is never loaded back, so the ORM's unit of work would be pure overhead
_EVENTS = cast(Table, AuditEvent.__table__)
_HEAD = cast(Table, AuditHead.__table__)
_LOCK_HEAD = update(_HEAD).where(_HEAD.c.id == 1).values(count=_HEAD.c.count + 1).returning(_HEAD.c.last_hash)


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
