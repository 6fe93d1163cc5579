"""The schema of claas 0.1 before Alembic (SQLite `user_version` 2).

Every table and index is created only if missing, so a database made by that release (which
has them all, or all but `memory` at `user_version` 1) is adopted in place with nothing lost.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("lora_id", sa.Text, primary_key=True),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("lora_alpha", sa.Float, nullable=False),
        sa.Column("target_modules", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("current_version", sa.Integer),
        if_not_exists=True,
    )
    op.create_table(
        "adapter_versions",
        sa.Column(
            "lora_id",
            sa.Text,
            sa.ForeignKey("adapters.lora_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state_path", sa.Text, nullable=False),
        sa.Column("sampler_path", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("feedback_id", sa.Text),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("lora_id", "version"),
        if_not_exists=True,
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("lora_id", sa.Text),
        sa.Column("adapter_version", sa.Integer),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("messages", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.Text, nullable=False),
        sa.Column("response_tokens", sa.Text, nullable=False),
        sa.Column("behavior_logprobs", sa.Text, nullable=False),
        sa.Column("sampling_params", sa.Text, nullable=False),
        sa.Column("response_text", sa.Text, nullable=False),
        sa.Column("prompt_hash", sa.Text, nullable=False),
        sa.Column("response_hash", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("prompt_format", sa.Text, nullable=False, server_default="chat"),
        if_not_exists=True,
    )
    op.create_index(
        "rollouts_by_text",
        "rollouts",
        ["lora_id", "prompt_hash", "response_hash"],
        if_not_exists=True,
    )
    op.create_index("rollouts_by_expiry", "rollouts", ["expires_at"], if_not_exists=True)
    op.create_table(
        "feedback",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, unique=True, nullable=False),
        sa.Column("lora_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("items", sa.Text, nullable=False),
        sa.Column("training", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("coalesced_into", sa.Text),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed')", name="feedback_status"
        ),
        sqlite_autoincrement=True,
        if_not_exists=True,
    )
    op.create_index(
        "feedback_by_adapter", "feedback", ["lora_id", "status", "seq"], if_not_exists=True
    )
    op.create_table(
        "memory",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "lora_id",
            sa.Text,
            sa.ForeignKey("adapters.lora_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("lesson_hash", sa.Text, nullable=False),
        sa.Column("feedback_id", sa.Text, nullable=False),
        sa.Column("messages", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.Text, nullable=False),
        sa.Column("prompt_format", sa.Text, nullable=False),
        sa.Column("feedback", sa.Text, nullable=False),
        sa.Column("example", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("lora_id", "lesson_hash"),
        if_not_exists=True,
    )
    op.create_index("memory_by_adapter", "memory", ["lora_id", "created_at"], if_not_exists=True)
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("lora_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("results", sa.Text, nullable=False),
        if_not_exists=True,
    )


def downgrade() -> None:
    for table in ("eval_runs", "memory", "feedback", "rollouts", "adapter_versions", "adapters"):
        op.drop_table(table)
