"""imported models: a model's prunability report (per layer kind, shape, MACs and the methods
that apply; coupled groups; what is left untouched and why), computed when it is registered

Revision ID: 0003_model_report
Revises: 0002_job_recovery
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_model_report"
down_revision = "0002_job_recovery"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("report", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("report")
