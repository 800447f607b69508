"""FHIR server: resource versions, search values, deletions, produced resources, orders linked to studies

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 19:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("fhir_resources") as batch_op:
        batch_op.add_column(
            sa.Column(
                "deleted", sa.Boolean(), server_default=sa.false(), nullable=False, comment="read answers 410 Gone"
            )
        )
        batch_op.add_column(
            sa.Column(
                "origin",
                sa.String(length=16),
                server_default="received",
                nullable=False,
                comment="received | result (ours: read-only)",
            )
        )
    with op.batch_alter_table("observations") as batch_op:
        batch_op.alter_column(
            "resource_id",
            existing_type=sa.String(length=64),
            type_=sa.String(length=80),
            existing_nullable=False,
            comment="Observation id, or <id>#<LOINC> for a component",
        )
    with op.batch_alter_table("studies") as batch_op:
        batch_op.add_column(
            sa.Column(
                "order_resource_id",
                sa.String(length=64),
                nullable=True,
                comment="the FHIR ServiceRequest ordering its AI read, when one is linked",
            )
        )
    op.create_table(
        "fhir_resource_versions",
        sa.Column("id", BigId, nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=True, comment="None for a deletion"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("resource_type", "resource_id", "version", name="uq_fhir_resource_version"),
    )
    op.create_table(
        "fhir_search_values",
        sa.Column("id", BigId, nullable=False),
        sa.Column("resource_pk", BigId, nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(length=255), nullable=True),
        sa.Column(
            "value",
            sa.String(length=255),
            nullable=True,
            comment="token code, reference Type/id, lower-case string",
        ),
        sa.Column("date_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("date_end", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["resource_pk"], ["fhir_resources.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("fhir_search_values") as batch_op:
        batch_op.create_index("ix_fhir_search_date", ["param", "date_start"], unique=False)
        batch_op.create_index("ix_fhir_search_token", ["param", "value"], unique=False)
        batch_op.create_index(batch_op.f("ix_fhir_search_values_resource_pk"), ["resource_pk"], unique=False)
    # resources stored before this revision: their current body becomes their history, and they are indexed
    op.execute(
        "INSERT INTO fhir_resource_versions (resource_type, resource_id, version, body, updated_at) "
        "SELECT resource_type, resource_id, version, body, updated_at FROM fhir_resources"
    )
    from service.store.fhir_store import search_values

    connection = op.get_bind()
    resources = sa.table("fhir_resources", sa.column("id"), sa.column("resource_type"), sa.column("body", sa.JSON))
    values = sa.table(
        "fhir_search_values",
        sa.column("resource_pk"),
        sa.column("param"),
        sa.column("system"),
        sa.column("value"),
        sa.column("date_start", sa.DateTime(timezone=True)),
        sa.column("date_end", sa.DateTime(timezone=True)),
    )
    for pk, resource_type, body in connection.execute(
        sa.select(resources.c.id, resources.c.resource_type, resources.c.body)
    ):
        rows = [
            {
                "resource_pk": pk,
                "param": v.param,
                "system": v.system,
                "value": v.value,
                "date_start": v.date_start,
                "date_end": v.date_end,
            }
            for v in search_values(resource_type, body)
        ]
        if rows:
            connection.execute(values.insert(), rows)


def downgrade() -> None:
    op.drop_table("fhir_search_values")
    op.drop_table("fhir_resource_versions")
    with op.batch_alter_table("studies") as batch_op:
        batch_op.drop_column("order_resource_id")
    with op.batch_alter_table("observations") as batch_op:
        batch_op.alter_column(
            "resource_id", existing_type=sa.String(length=80), type_=sa.String(length=64), existing_nullable=False
        )
    with op.batch_alter_table("fhir_resources") as batch_op:
        batch_op.drop_column("origin")
        batch_op.drop_column("deleted")
