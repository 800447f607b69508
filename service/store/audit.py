"""The audit log: append-only and hash-chained.

Each event's hash covers its content and the previous event's hash, so editing, deleting or reordering a row
breaks the chain from that row on. Appends lock the single ``audit_head`` row, which serializes them across
processes on PostgreSQL (row lock) and SQLite (database write lock).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
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
    content = {
        "recorded_at": _utc(event.recorded_at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event_type": event.event_type,
        "action": event.action,
        "outcome": event.outcome,
        "actor": event.actor,
        "actor_role": event.actor_role,
        "source_address": event.source_address,
        "entity_type": event.entity_type,
        "entity_ref": event.entity_ref,
        "patient_ref": event.patient_ref,
        "detail": event.detail,
    }
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
) -> AuditEvent:
    """Append one event in the caller's transaction (so it commits, or rolls back, with the access it records)."""
    head = session.execute(
        update(AuditHead).where(AuditHead.id == 1).values(count=AuditHead.count + 1).returning(AuditHead.last_hash)
    ).scalar_one_or_none()
    if head is None:
        raise RuntimeError("audit_head row is missing: the schema was not migrated with `clinfer db upgrade`")
    event = AuditEvent(
        recorded_at=dt.datetime.now(dt.UTC),
        event_type=event_type,
        action=action,
        outcome=outcome,
        actor=principal.subject,
        actor_role=principal.role,
        source_address=principal.source_address,
        entity_type=entity_type,
        entity_ref=entity_ref,
        patient_ref=patient_ref,
        detail=detail or {},
        prev_hash=head,
    )
    event.hash = event_hash(event, head)
    session.add(event)
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(last_hash=event.hash))
    return event


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
