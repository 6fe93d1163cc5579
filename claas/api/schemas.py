"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has one).

Every JSON route declares its response model, so `/docs` shows, and the schema fuzz test
checks, what each one answers. Errors share one body, `claas.api.errors.ErrorEnvelope`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from claas.adapters import AdapterSpec
from claas.errors import UnsupportedParameter
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(
        False, description="End the stream with a chunk of token counts (and empty `choices`)."
    )
    include_obfuscation: bool | None = Field(
        None, description="Accepted; claas adds no obfuscation padding either way."
    )


class SamplingFields(BaseModel):
    """The fields chat and plain completions share, OpenAI's names and ranges.

    Unknown fields are refused (422, naming the field), and fields OpenAI has that this server
    cannot honour are refused with a 400 naming them: a request is never half-obeyed.
    """

    model_config = ConfigDict(extra="forbid")

    model: Utf8Text = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(
        None, ge=0, description="Beyond OpenAI (as vLLM): sample from the k likeliest; 0 = all."
    )
    stop: Utf8Text | list[Utf8Text] | None = Field(
        None, description="Up to 8 strings; the answer ends before the first (not included)."
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in -100..100 added to its logit."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="Accepted; not used.")
    metadata: dict[str, str] | None = Field(None, description="Accepted; not used.")
    store: bool | None = Field(
        None, description="Accepted; claas always stores the rollout, for feedback."
    )
    service_tier: str | None = Field(None, description="Accepted; there is one tier.")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted; not used.")
    prompt_cache_key: str | None = Field(None, max_length=256, description="Accepted; not used.")
    prompt_cache_retention: str | None = Field(
        None, max_length=64, description="Accepted; prompts are not cached across requests."
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 8 or any(not s or len(s) > 200 for s in stops):
            raise ValueError("stop takes up to 8 non-empty strings of at most 200 characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > 300:
            raise ValueError("logit_bias takes at most 300 tokens")
        for token, bias in value.items():
            if not (token.isascii() and token.isdigit() and len(token) <= 9):
                raise ValueError(
                    f"logit_bias keys are token ids as strings, like '1234'; got {token!r}"
                )
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in -100..100; got {bias} for {token}")
        return value

    def refuse_unsupported(self) -> None:
        """Raise a 400 naming the first field set to something this server cannot do."""
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameter(
                "stream_options is only allowed with stream: true", param="stream_options"
            )
        for name, allowed, why in self._unsupported():
            value = getattr(self, name, None)
            if value is not None and value not in allowed:
                raise UnsupportedParameter(f"{name} is not supported here: {why}", param=name)

    def _unsupported(self) -> list[tuple[str, list[Any], str]]:
        return []


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = Field(False, description="Return each answer token's log-prob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: also the k likeliest tokens per step."
    )
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(None, description="Accepted; no tools are called.")
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None

    def _unsupported(self) -> list[tuple[str, list[Any], str]]:
        no_tools = "the models served here are not trained for tool calls; send no tools"
        return [
            ("tools", [[]], no_tools),
            ("tool_choice", ["none", "auto"], no_tools),  # with no tools, both mean none
            ("functions", [[]], no_tools),
            ("function_call", ["none", "auto"], no_tools),
            (
                "response_format",
                [{"type": "text"}],
                "only {'type': 'text'}; JSON mode and JSON schemas cannot be guaranteed by "
                "this sampler, so ask for JSON in the prompt instead",
            ),
            ("modalities", [["text"]], "text is the only modality"),
            ("audio", [], "text is the only modality"),
            ("prediction", [], "predicted outputs are not implemented"),
            ("reasoning_effort", [], "the served models have no reasoning-effort setting"),
            ("web_search_options", [], "there is no web search"),
            ("verbosity", [], "there is no verbosity setting; ask in the prompt"),
        ]


class CompletionRequest(SamplingFields):
    prompt: Utf8Text = Field(min_length=1, max_length=200_000)
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return each token's log-prob and the k likeliest (0..5)."
    )
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def _unsupported(self) -> list[tuple[str, list[Any], str]]:
        return [
            ("echo", [False], "the prompt is not echoed; prepend it yourself"),
            ("suffix", [], "insertion (suffix) is not implemented"),
            ("best_of", [1], "best_of is not implemented; ask for n answers and pick"),
        ]


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
    created: int = Field(description="Unix time: the adapter's creation, or server start.")
    owned_by: str = Field(description="The adapter's owner, or `claas` for the base model.")


class ModelList(BaseModel):
    """The models this key may chat with: the base model, then the owner's adapters."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str = Field(description="The token as text (`bytes:\\x..` when not valid UTF-8).")
    logprob: float = Field(description="The model's own log-prob (temperature 1, no penalties).")
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(
        default_factory=list, description="The `top_logprobs` likeliest tokens at this step."
    )


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape of log-probs (`logprobs: k`)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] = Field(description="The k likeliest per token.")
    text_offset: list[int] = Field(description="Where each token starts in the answer text.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


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
    logprobs: CompletionLogprobs | None = Field(None, description="With `logprobs` only.")


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
    # CLaaS's names for the same numbers, so its eval scripts read this answer unchanged.
    logprob_sum: float
    prompt_tokens: int
    completion_tokens: int


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
