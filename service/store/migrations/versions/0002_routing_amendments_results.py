"""routing rules, report amendments, DICOM results and their deliveries

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 19:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch_op:
        batch_op.add_column(
            sa.Column("calling_ae_title", sa.String(length=16), nullable=True, comment="DIMSE sender; None for STOW-RS")
        )
        batch_op.add_column(
            sa.Column(
                "origin",
                sa.String(length=16),
                server_default="received",
                nullable=False,
                comment="received | result (ours: SR, heatmap)",
            )
        )

    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(
            sa.Column(
                "revision",
                sa.Integer(),
                server_default="1",
                nullable=False,
                comment="1, then +1 for each analysis of new instances (amendment)",
            )
        )
        batch_op.add_column(
            sa.Column("rule", sa.String(length=64), nullable=True, comment="the routing rule that created the job")
        )
        batch_op.add_column(
            sa.Column("sop_instance_uid", sa.String(length=64), nullable=True, comment="the instance the model reads")
        )
        batch_op.add_column(
            sa.Column(
                "destinations",
                sa.JSON(),
                server_default=sa.text("'[]'"),
                nullable=False,
                comment="where its results are pushed",
            )
        )
        batch_op.drop_constraint("uq_job_study_model", type_="unique")
        batch_op.create_unique_constraint(
            "uq_job_study_model_revision", ["study_id", "model_name", "model_version", "revision"]
        )

    with op.batch_alter_table("reports") as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(
            sa.Column(
                "sr_sop_instance_uid", sa.String(length=64), nullable=True, comment="the DICOM SR of this version"
            )
        )
        batch_op.add_column(
            sa.Column("heatmap_sop_instance_uid", sa.String(length=64), nullable=True, comment="its Secondary Capture")
        )
        batch_op.add_column(
            sa.Column(
                "dicom_state",
                sa.String(length=16),
                nullable=True,
                comment="DICOM results of the current version: pending | stored | failed; None: not made",
            )
        )
        batch_op.add_column(sa.Column("dicom_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("dicom_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_reports_dicom_requested_at"), ["dicom_requested_at"], unique=False)
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column(
            "status", existing_type=sa.String(length=16), comment="preliminary | amended", existing_nullable=False
        )

    op.create_table(
        "report_versions",
        sa.Column("id", BigId, nullable=False),
        sa.Column("report_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("findings", sa.JSON(), nullable=False, comment="schemas.Findings as JSON"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id"),
        sa.UniqueConstraint("report_id", "version", name="uq_report_version"),
    )
    with op.batch_alter_table("report_versions") as batch_op:
        batch_op.create_index(batch_op.f("ix_report_versions_report_id"), ["report_id"], unique=False)

    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("report_id", sa.String(length=36), nullable=False),
        sa.Column("report_version", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False, comment="pending | delivered | failed"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("report_id", "report_version", "destination", name="uq_delivery"),
    )
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.create_index("ix_deliveries_state_next", ["state", "next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_deliveries_report_id"), ["report_id"], unique=False)


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("report_versions")
    with op.batch_alter_table("reports") as batch_op:
        batch_op.drop_column("updated_at")
        batch_op.drop_index(batch_op.f("ix_reports_dicom_requested_at"))
        batch_op.drop_column("dicom_requested_at")
        batch_op.drop_column("dicom_error")
        batch_op.drop_column("dicom_state")
        batch_op.drop_column("heatmap_sop_instance_uid")
        batch_op.drop_column("sr_sop_instance_uid")
        batch_op.drop_column("version")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint("uq_job_study_model_revision", type_="unique")
        batch_op.create_unique_constraint("uq_job_study_model", ["study_id", "model_name", "model_version"])
        batch_op.drop_column("destinations")
        batch_op.drop_column("sop_instance_uid")
        batch_op.drop_column("rule")
        batch_op.drop_column("revision")
    with op.batch_alter_table("instances") as batch_op:
        batch_op.drop_column("origin")
        batch_op.drop_column("calling_ae_title")
