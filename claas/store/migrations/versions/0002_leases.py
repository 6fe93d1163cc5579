"""Claims as leases, for workers in other processes; eval runs leave the database.

A running request now names the `worker` that claimed it and the time its lease ends
(`lease_expires_at`), which the worker's heartbeat pushes forward; a request whose lease ended
goes back to the queue. The `eval_runs` table, which nothing wrote, is dropped: an eval run lives
in its output directory.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("worker", sa.Text))
        batch.add_column(sa.Column("lease_expires_at", sa.Float))
    op.drop_table("eval_runs")


def downgrade() -> None:
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("lora_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("results", sa.Text, nullable=False),
    )
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("worker")
