"""OpenAI's answer bodies, as claas sends them: models, completions, streamed chunks, log-probs.

Every field OpenAI's clients read is here with OpenAI's name; a streamed answer is a series of
`ChatCompletionChunk` or `TextCompletionChunk` events (built by `claas.api.serving`). `/v1/score`
answers `ScoreResponse`, claas's own, with CLaaS's names for the same numbers beside them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="On each choice's first chunk.")
    content: str | None = Field(None, description="The next piece of the answer's text.")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta = Field(description="Empty on the choice's last chunk.")
    logprobs: ChoiceLogprobs | None = Field(
        description="With `logprobs: true`, the whole answer's, on the choice's last chunk."
    )
    finish_reason: Literal["stop", "length"] | None = Field(
        description="On the choice's last chunk."
    )


class _Chunk(BaseModel):
    """What every server-sent event of a streamed answer has, besides its choices."""

    id: str
    created: int
    model: str
    usage: Usage | None = Field(
        None,
        description="Only with `stream_options.include_usage`: null, then the counts on a last "
        "chunk with empty `choices`.",
    )


class ChatCompletionChunk(_Chunk):
    """One server-sent event of a streamed chat answer."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class TextChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = Field(
        description="With `logprobs`, the whole answer's, on the choice's last chunk."
    )
    finish_reason: Literal["stop", "length"] | None = Field(
        description="On the choice's last chunk."
    )


class TextCompletionChunk(_Chunk):
    """One server-sent event of a streamed plain completion."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChunkChoice]


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
