"""The store's tables, declared once with SQLAlchemy Core for both backends (SQLite, PostgreSQL).

JSON columns are text holding `json.dumps` output on both, as the SQLite databases of earlier
releases already do; times are Unix seconds as floats. The migrations under `migrations/` create
and change these tables; `Store` queries them.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class JSONText(TypeDecorator[Any]):
    """A JSON value kept as text (json.dumps in, json.loads out)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


metadata = MetaData()

adapters = Table(
    "adapters",
    metadata,
    Column("lora_id", Text, primary_key=True),
    Column("base_model", Text, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("lora_alpha", Float, nullable=False),
    Column("target_modules", JSONText, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("current_version", Integer),
)

adapter_versions = Table(
    "adapter_versions",
    metadata,
    Column("lora_id", Text, ForeignKey("adapters.lora_id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state_path", Text, nullable=False),
    Column("sampler_path", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("feedback_id", Text),
    Column("metrics", JSONText, nullable=False),
    PrimaryKeyConstraint("lora_id", "version"),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", Text, primary_key=True),
    Column("lora_id", Text),
    Column("adapter_version", Integer),
    Column("model", Text, nullable=False),
    Column("messages", JSONText, nullable=False),
    Column("prompt_tokens", JSONText, nullable=False),
    Column("response_tokens", JSONText, nullable=False),
    Column("behavior_logprobs", JSONText, nullable=False),
    Column("sampling_params", JSONText, nullable=False),
    Column("response_text", Text, nullable=False),
    Column("prompt_hash", Text, nullable=False),
    Column("response_hash", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("prompt_format", Text, nullable=False, server_default="chat"),
    Index("rollouts_by_text", "lora_id", "prompt_hash", "response_hash"),
    Index("rollouts_by_expiry", "expires_at"),
)

# `seq` is the arrival order. `worker` and `lease_expires_at` are the claim of a running request:
# the worker training it, and until when its heartbeat keeps the claim (migration 0002).
feedback = Table(
    "feedback",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", Text, unique=True, nullable=False),
    Column("lora_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("items", JSONText, nullable=False),
    Column("training", JSONText, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("error", Text),
    Column("metrics", JSONText, nullable=False),
    Column("version", Integer),
    Column("coalesced_into", Text),
    Column("worker", Text),
    Column("lease_expires_at", Float),
    CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name="feedback_status"),
    Index("feedback_by_adapter", "lora_id", "status", "seq"),
    sqlite_autoincrement=True,
)

memory = Table(
    "memory",
    metadata,
    Column("id", Text, primary_key=True),
    Column("lora_id", Text, ForeignKey("adapters.lora_id", ondelete="CASCADE"), nullable=False),
    Column("lesson_hash", Text, nullable=False),
    Column("feedback_id", Text, nullable=False),
    Column("messages", JSONText, nullable=False),
    Column("prompt_tokens", JSONText, nullable=False),
    Column("prompt_format", Text, nullable=False),
    Column("feedback", Text, nullable=False),
    Column("example", Text),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("lora_id", "lesson_hash"),
    Index("memory_by_adapter", "lora_id", "created_at"),
)
