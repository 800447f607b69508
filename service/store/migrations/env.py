"""Alembic environment: the engine comes from the caller (service.store.db.upgrade)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from service.store.tables import Base

engine: Engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        # several replicas start at once: one migrates, the others wait and then find nothing to do
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7341001)")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    context.run_migrations()
