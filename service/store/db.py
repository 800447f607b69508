"""Engine, sessions and schema migrations (Alembic), for SQLite and PostgreSQL alike."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Table, create_engine, event, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout so threads can share it."""
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # the session's time zone pinned to UTC: times are kept in UTC, and one near the calendar's end (9999-12-31,
    # the edge that dates beyond it are clamped to) overflows when a server in another zone converts it
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args={"options": "-c timezone=UTC"}
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


Row = TypeVar("Row")


def insert_skipping_clashes(session: Session, target: Any) -> Any:
    """An INSERT into ``target`` (an entity or a table) that skips each row clashing with a row already there on a
    unique key (``ON CONFLICT DO NOTHING``, PostgreSQL and SQLite alike); its RETURNING gives the rows it inserted.

    A clash neither raises nor aborts the transaction, so no savepoint is needed around it (two round trips less
    than INSERT under SAVEPOINT). On PostgreSQL a row that clashes with one another transaction inserted but has not
    committed waits for that transaction; the caller's next SELECT then sees it.
    """
    return dialect_insert(session)(target).on_conflict_do_nothing()


def dialect_insert(session: Session) -> Any:
    """The ``insert`` of the session's dialect (PostgreSQL's or SQLite's), which has ``ON CONFLICT``."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def insert_unless_clash(session: Session, entity: type[Row], **values: Any) -> Row | None:
    """INSERT one row of ``entity`` (:func:`insert_skipping_clashes`): the new row, persistent in the session, or
    None on a clash.

    The statement is built once per entity and dialect and given the values as parameters, and the row comes back
    through the ORM's loading of a plain RETURNING (``from_statement``) rather than an ORM bulk INSERT: about half
    the client's CPU of building ``insert(entity).values(...)`` for every row. Column defaults apply as in any
    INSERT; pending changes are flushed first, as before any ORM statement.
    """
    dialect = session.get_bind().dialect.name
    statement = _INSERTS.get((dialect, entity))
    if statement is None:
        table = cast(Table, entity.__table__)  # type: ignore[attr-defined]
        statement = select(entity).from_statement(insert_skipping_clashes(session, table).returning(*table.c))
        _INSERTS[(dialect, entity)] = statement
    return session.scalars(statement, values).first()


_INSERTS: dict[tuple[str, type], Any] = {}

# the largest 64-bit key a row can have: a larger one from a request is not found or refused, never bound in SQL,
# where it overflows
MAX_KEY = 2**63 - 1


def serialize_on(session: Session, keys: Iterable[str]) -> None:
    """Make this transaction, from now until it ends, wait for and then exclude every other transaction that calls
    this with one of ``keys``; for a read that decides a write another transaction's read-then-write depends on
    (two transactions that each read before the other commits would both miss the other's row).

    Take them in one call per transaction, before any row lock: then two callers never wait on each other in a
    cycle. PostgreSQL: one transaction-level advisory lock per key (a 64-bit hash of it), taken in one statement in
    a fixed order. SQLite: the database's write lock, taken now rather than at the transaction's first write (one
    writer at a time: all keys alike).
    """
    wanted = sorted({_advisory_key(key) for key in keys})
    if not wanted:
        return
    if session.get_bind().dialect.name == "postgresql":
        # a function scan yields the array's elements in order: the locks are taken in that order
        session.execute(_ADVISORY_LOCKS, {"keys": wanted})
    else:
        session.execute(_SQLITE_WRITE_LOCK)


def _advisory_key(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"clinfer").digest(), "big", signed=True)


_ADVISORY_LOCKS = text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k")
_SQLITE_WRITE_LOCK = text("UPDATE audit_head SET id = id WHERE 0")  # writes nothing; begins the write transaction


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run schema migrations up to ``revision`` (start-up does this; so does ``clinfer db upgrade``)."""
    command.upgrade(alembic_config(engine), revision)


def is_transient(error: BaseException) -> bool:
    """An error of the infrastructure, not of the work: the database unreachable or failing for a moment, or the
    disk (full, an I/O error, a network file system away). The same work may succeed when tried again. A file that
    does not exist, or may not be read, is not transient."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    permanent = FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
    return isinstance(error, OSError) and not isinstance(error, permanent)


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
