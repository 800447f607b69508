"""per-stage job timings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 20:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(
            sa.Column(
                "timings",
                sa.JSON(),
                nullable=True,
                comment="per-stage timestamps (epoch seconds) and durations, for latency breakdowns",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("timings")
