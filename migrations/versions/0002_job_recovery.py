"""job recovery: when a queued job's message was last sent (the reconciler re-sends lost ones),
how often, and the job's latest checkpoint (resume after a lost worker)

Revision ID: 0002_job_recovery
Revises: 0001_initial
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_job_recovery"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("dispatch_count", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("checkpoint", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_status_dispatched", "jobs", ["status", "dispatched_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_dispatched", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("checkpoint")
        batch.drop_column("dispatch_count")
        batch.drop_column("dispatched_at")
