"""auto-compress: a job's child jobs (the trials of an `auto` search) and the coordinator's
state — jobs.parent_id (the search a trial belongs to; deleted with it), jobs.kind (job | auto
| one of the trial phases) and jobs.search (the coordinator's state, or a trial's candidate)

Revision ID: 0004_job_search
Revises: 0003_model_report
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_job_search"
down_revision = "0003_model_report"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="job"))
        batch.add_column(sa.Column("search", sa.JSON(), nullable=True))
        batch.create_foreign_key("fk_jobs_parent", "jobs", ["parent_id"], ["id"],
                                 ondelete="CASCADE")
        batch.create_index("ix_jobs_parent_id", ["parent_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_parent_id")
        batch.drop_constraint("fk_jobs_parent", type_="foreignkey")
        batch.drop_column("search")
        batch.drop_column("kind")
        batch.drop_column("parent_id")
