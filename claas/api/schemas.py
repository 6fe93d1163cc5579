"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has one)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from claas.adapters import AdapterSpec
from claas.feedback import FeedbackItem
from claas.prompts import Utf8Text
from claas.store import LORA_ID_PATTERN

MAX_OFFSET = 10**9  # a page offset; SQLite's OFFSET is an int64, and anything near it is a bug


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = "text"
    text: Utf8Text = Field(max_length=200_000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Utf8Text | list[TextPart] = Field(max_length=200_000)

    def as_template_message(self) -> dict[str, Any]:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class SamplingFields(BaseModel):
    """The sampling knobs shared by chat and plain completions."""

    model: Utf8Text = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Utf8Text | list[Utf8Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)  # accepted, not computed (only 0)
    stream: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 8 or any(not s or len(s) > 200 for s in stops):
            raise ValueError("stop takes up to 8 non-empty strings of at most 200 characters")
        return value


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    prompt: Utf8Text = Field(min_length=1, max_length=200_000)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Utf8Text = Field(min_length=1, max_length=300)
    messages: list[ChatMessage] = Field(min_length=1)
    completion: Utf8Text = Field(min_length=1, max_length=200_000)


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


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, and what to do next.")
    type: str = Field(description="The error's class, e.g. AdapterNotFound.")
    code: int = Field(description="The HTTP status.")


class ErrorEnvelope(BaseModel):
    """Every error answer of the API (OpenAI's shape): `{"error": {...}}`."""

    error: ErrorDetail


_STATUS_MEANING = {
    400: "The body could not be read.",
    401: "No API key, or an unknown one.",
    403: "The API key does not reach this adapter, or the owner is at a quota.",
    404: "No such adapter, version, rollout or feedback request (for this key).",
    409: "Conflicts with the current state (exists already, base-model rollout, …).",
    413: "The request body is over the server's limit.",
    422: "A field is invalid; the message names it.",
    429: "The owner has too much feedback queued; retry after `Retry-After` seconds.",
    503: "The server is not ready.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the real error body."""
    return {code: {"model": ErrorEnvelope, "description": _STATUS_MEANING[code]} for code in codes}
