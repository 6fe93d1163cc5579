"""claas's own request and response bodies: feedback, adapters, memory, health.

Every JSON route declares its response model, so `/docs` shows, and the schema fuzz test
checks, what each one answers. OpenAI's bodies are `openai_requests` and `openai_responses`;
errors share one body, `claas.api.errors.ErrorEnvelope`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from claas.adapters import AdapterSpec
from claas.feedback import FeedbackItem
from claas.ids import LORA_ID_PATTERN
from claas.records import Adapter, AdapterVersion, FeedbackStatus, MemoryItem
from claas.records import FeedbackRequest as FeedbackRecord

MAX_OFFSET = 10**9  # a page offset; SQLite's OFFSET is an int64, and anything near it is a bug


class FeedbackRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[FeedbackItem] = Field(min_length=1, max_length=64)


class AdapterCreate(AdapterSpec):
    # The pattern is documented, and checked by `parse_lora_id`, whose error says what to do.
    lora_id: str = Field(
        max_length=200, description="owner/name", json_schema_extra={"pattern": LORA_ID_PATTERN}
    )


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31)


class FeedbackAccepted(BaseModel):
    """A feedback request admitted to the queue (without `wait`)."""

    model_config = ConfigDict(extra="forbid")

    feedback_id: str
    status: FeedbackStatus
    lora_id: str


class FeedbackView(BaseModel):
    """A feedback request and, once trained, what it produced."""

    model_config = ConfigDict(extra="forbid")  # a new record field fails loudly, not silently

    feedback_id: str
    lora_id: str
    status: FeedbackStatus
    items: list[dict[str, Any]]
    training: dict[str, Any] = Field(description="The training config it was trained with.")
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None = Field(description="Why it failed (status `failed`).")
    metrics: dict[str, Any]
    version: int | None = Field(description="The adapter version this request produced.")
    coalesced_into: str | None = Field(
        description="The request whose training step carried this one."
    )

    @classmethod
    def of(cls, request: FeedbackRecord) -> FeedbackView:
        return cls(feedback_id=request.id, **request.model_dump(exclude={"id"}))


class FeedbackLog(BaseModel):
    """One page of an adapter's feedback requests, newest first."""

    lora_id: str
    data: list[FeedbackView]
    limit: int
    offset: int


class MemoryView(BaseModel):
    """One lesson the adapter remembers: what it was taught, on which prompt, by which request.
    Later feedback requests replay it on fresh answers (the answer itself is not kept)."""

    id: str
    lora_id: str
    feedback_id: str
    messages: list[dict[str, Any]]
    prompt_format: Literal["chat", "text"]
    feedback: str
    example: str | None
    created_at: float

    @classmethod
    def of(cls, item: MemoryItem) -> MemoryView:
        return cls.model_validate(item.model_dump(exclude={"prompt_tokens"}))


class MemoryPage(BaseModel):
    """One page of an adapter's memory, newest first; `total` counts all of it."""

    lora_id: str
    data: list[MemoryView]
    total: int
    limit: int
    offset: int


class MemoryForgotten(BaseModel):
    lora_id: str
    forgotten: int


class AdapterView(Adapter):
    """An adapter and all its versions, oldest first."""

    versions: list[AdapterVersion]


class AdapterList(BaseModel):
    data: list[Adapter]


class AdapterDeleted(BaseModel):
    lora_id: str
    deleted: Literal[True] = True
    versions_removed: int


class Health(BaseModel):
    """Readiness: 200 with status `ok`, else 503 with status `unavailable`."""

    status: Literal["ok", "unavailable"]
    model: str
    model_loaded: bool
    ready: bool
    database_ok: bool
    queue_depth: int | None = Field(description="Queued feedback; null if the database is down.")
    inference: dict[str, Any] | None = Field(
        None,
        description="The vLLM backend's report (status ok | unreachable | error, url, loaded "
        "adapters) when chat is served by vLLM; null when the training service samples.",
    )
