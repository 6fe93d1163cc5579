"""OpenAI's request bodies, as claas takes them: chat, plain completions, and /v1/score.

Field names and ranges are OpenAI's. What the sampler cannot honour is refused with a 400 naming
the field (`SamplingFields.refuse_unsupported`), never accepted and ignored, and the schema
documents only the values that are honoured (`only`). The answers are `openai_responses`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic.config import JsonDict

from claas.errors import UnsupportedParameter
from claas.ids import Int64
from claas.sdpo.prompts import MAX_TEXT_CHARS, Utf8Text


def only(description: str, *allowed: JsonDict) -> WithJsonSchema:
    """The documented schema of a field OpenAI has but this server honours only in part: just
    the values it accepts (and null). Others are refused with a 400 naming the field
    (`SamplingFields.refuse_unsupported`)."""
    return WithJsonSchema({"anyOf": [*allowed, {"type": "null"}], "description": description})


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = "text"
    text: Utf8Text = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Utf8Text | list[TextPart] = Field(max_length=MAX_TEXT_CHARS)

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


_STREAM_OPTIONS_NEED_STREAM: JsonDict = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
}
_LOGIT_BIAS_SCHEMA: JsonDict = {
    "anyOf": [
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,9}$", "maxLength": 9},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "maxProperties": 300,
        },
        {"type": "null"},
    ],
    "description": "Token id (as a string, like '1234') -> bias in -100..100 added to its logit.",
}
_STOP_STRING: JsonDict = {"type": "string", "minLength": 1, "maxLength": 200}
_STOP_SCHEMA: JsonDict = {
    "anyOf": [
        _STOP_STRING,
        {"type": "array", "items": _STOP_STRING, "maxItems": 8},
        {"type": "null"},
    ],
    "description": "Up to 8 strings; the answer ends before the first (not included).",
}


class SamplingFields(BaseModel):
    """The fields chat and plain completions share, OpenAI's names and ranges.

    Unknown fields are refused (422, naming the field), and fields OpenAI has that this server
    cannot honour are refused with a 400 naming them: a request is never half-obeyed. The
    schema documents what is accepted: the values of such a field that are honoured, and
    `stream_options` only with `stream: true`. The operator's caps (`max_tokens`, `n`,
    `messages`) are written into the served schema by `claas.api.openapi`.
    """

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]}
    )

    model: Utf8Text = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Chat: default the room left in the context, at most the server's cap.",
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")
    temperature: float = Field(
        1.0, ge=0.0, le=2.0, description="0 (or below 1e-5) is greedy: the likeliest token."
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling; the likeliest token is always kept, however small top_p.",
    )
    top_k: int | None = Field(
        None, ge=0, description="Beyond OpenAI (as vLLM): sample from the k likeliest; 0 = all."
    )
    stop: Annotated[Utf8Text | list[Utf8Text] | None, WithJsonSchema(_STOP_SCHEMA)] = None
    seed: Int64 | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float] | None, WithJsonSchema(_LOGIT_BIAS_SCHEMA)] = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
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


_NO_TOOLS = "the models served here are not trained for tool calls; send no tools"
_TOP_LOGPROBS_NEED_LOGPROBS: JsonDict = {
    "if": {
        "properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
        "required": ["top_logprobs"],
    },
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
}
_NONE_OR_AUTO: JsonDict = {"enum": ["none", "auto"]}
_NOTHING: JsonDict = {"type": "array", "maxItems": 0}


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM, _TOP_LOGPROBS_NEED_LOGPROBS]}
    )

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = Field(False, description="Return each answer token's log-prob.")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="With logprobs: also the k likeliest tokens per step (1..20 need "
        "`logprobs: true`).",
    )
    tools: Annotated[list[dict[str, Any]] | None, only(_NO_TOOLS, _NOTHING)] = None
    tool_choice: Annotated[str | dict[str, Any] | None, only(_NO_TOOLS, _NONE_OR_AUTO)] = None
    parallel_tool_calls: bool | None = Field(None, description="Accepted; no tools are called.")
    functions: Annotated[list[dict[str, Any]] | None, only(_NO_TOOLS, _NOTHING)] = None
    function_call: Annotated[str | dict[str, Any] | None, only(_NO_TOOLS, _NONE_OR_AUTO)] = None
    response_format: Annotated[
        dict[str, Any] | None,
        only(
            "Only {'type': 'text'}: ask for JSON in the prompt.",
            {
                "type": "object",
                "properties": {"type": {"const": "text"}},
                "required": ["type"],
                "additionalProperties": False,
            },
        ),
    ] = None
    modalities: Annotated[
        list[str] | None,
        only(
            "Text only.",
            {"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1},
        ),
    ] = None
    audio: Annotated[dict[str, Any] | None, only("Not supported: text only.")] = None
    prediction: Annotated[dict[str, Any] | None, only("Not supported.")] = None
    reasoning_effort: Annotated[str | None, only("Not supported.")] = None
    web_search_options: Annotated[dict[str, Any] | None, only("Not supported.")] = None
    verbosity: Annotated[str | None, only("Not supported: ask in the prompt.")] = None

    def _unsupported(self) -> list[tuple[str, list[Any], str]]:
        return [
            ("tools", [[]], _NO_TOOLS),
            ("tool_choice", ["none", "auto"], _NO_TOOLS),  # with no tools, both mean none
            ("functions", [[]], _NO_TOOLS),
            ("function_call", ["none", "auto"], _NO_TOOLS),
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


COMPLETION_MAX_TOKENS = 16  # OpenAI's default for plain completions


class CompletionRequest(SamplingFields):
    max_tokens: int | None = Field(
        None, ge=1, description=f"Default {COMPLETION_MAX_TOKENS}, as OpenAI's."
    )
    prompt: Utf8Text = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return each token's log-prob and the k likeliest (0..5)."
    )
    echo: Annotated[bool | None, only("The prompt is not echoed.", {"const": False})] = None
    suffix: Annotated[str | None, only("Not supported.")] = None
    best_of: Annotated[int | None, only("Only 1: ask for n answers.", {"const": 1})] = None

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
    completion: Utf8Text = Field(min_length=1, max_length=MAX_TEXT_CHARS)
