"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has one).

Every JSON route declares its response model, so `/docs` shows, and the schema fuzz test
checks, what each one answers. Errors share one body, `claas.api.errors.ErrorEnvelope`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from claas.adapters import AdapterSpec
from claas.feedback import FeedbackItem
from claas.ids import LORA_ID_PATTERN
from claas.records import Adapter, AdapterVersion, FeedbackStatus
from claas.records import FeedbackRequest as FeedbackRecord
from claas.sdpo.prompts import Utf8Text

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


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str = Field(description="The base model's name, or an adapter's owner/name.")
    object: Literal["model"] = "model"
    owned_by: Literal["claas"] = "claas"


class ModelList(BaseModel):
    """The models this key may chat with: the base model, then the owner's adapters."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = Field(
        default_factory=list, description="Always empty: top log-probs are not computed."
    )


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str = Field(description="`stop` or `length`.")
    logprobs: ChoiceLogprobs | None = Field(description="With `logprobs: true` only.")


class ChatCompletion(BaseModel):
    """A chat answer (without `stream`); `id` is the completion_id to give feedback on."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str = Field(description="`stop` or `length`.")


class TextCompletion(BaseModel):
    """A plain completion (without `stream`); `id` is the completion_id to give feedback on."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ScoreResponse(BaseModel):
    """The log-probability of each token of `completion` after the prompt."""

    model: str
    tokens: list[str]
    token_ids: list[int]
    logprobs: list[float]
    total_logprob: float


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
