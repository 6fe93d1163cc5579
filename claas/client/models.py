"""What `claas.client` reads and sends: the server's answers, and the feedback it sends.

The server's own schemas (`claas.api.schemas`) import the server, so these mirror them instead;
tests/test_client.py checks that each mirror has the server model's fields and types. An answer
ignores fields a newer server adds, so an older client keeps working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from claas.records import FINISHED, Adapter, AdapterVersion, FeedbackStatus


class _Answer(BaseModel):
    # Fields a newer server adds are ignored, so an older client keeps working.
    model_config = ConfigDict(frozen=True, extra="ignore")


class AdapterDetail(Adapter):
    """An adapter and all its versions, oldest first."""

    versions: list[AdapterVersion]


class AdapterDeleted(_Answer):
    lora_id: str
    deleted: Literal[True]
    versions_removed: int


class MemoryItem(_Answer):
    """One lesson an adapter remembers (the server's `MemoryView`): replayed by later feedback."""

    id: str
    lora_id: str
    feedback_id: str
    messages: list[dict[str, Any]]
    prompt_format: Literal["chat", "text"]
    feedback: str
    example: str | None
    created_at: float


class MemoryForgotten(_Answer):
    lora_id: str
    forgotten: int


class FeedbackAccepted(_Answer):
    """A feedback request admitted to the queue; it is trained in arrival order."""

    feedback_id: str
    status: FeedbackStatus
    lora_id: str


class FeedbackView(_Answer):
    """A feedback request and, once trained, what it produced (`version`, `metrics`)."""

    feedback_id: str
    lora_id: str
    status: FeedbackStatus
    items: list[dict[str, Any]]
    training: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    metrics: dict[str, Any]
    version: int | None
    coalesced_into: str | None

    @property
    def finished(self) -> bool:
        """Done or failed: it will not change any more."""
        return self.status in FINISHED


class Score(_Answer):
    """The log-probability of each token of `completion` after the prompt (`Client.score`)."""

    model: str
    tokens: list[str]
    token_ids: list[int]
    logprobs: list[float]
    total_logprob: float
    logprob_sum: float  # CLaaS's name for total_logprob
    prompt_tokens: int
    completion_tokens: int


class Health(_Answer):
    """Readiness: status `ok`, or `unavailable` with the part that is not ready."""

    status: Literal["ok", "unavailable"]
    model: str
    model_loaded: bool
    ready: bool
    database_ok: bool
    queue_depth: int | None
    inference: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# What the client sends
# ---------------------------------------------------------------------------------------------


class FeedbackItem(BaseModel):
    """Feedback on one answer, named by its completion id or by adapter + prompt + response.

    The completion id (the `id` of the chat completion, or of any chunk of a streamed one) is
    exact; the texts are matched after normalising whitespace, for callers that did not keep
    the id. `example` is an answer you would have wanted: the teacher is shown it (what the
    model never says, a name, can be taught). `training` overrides fields of the server's
    training config for this request.
    """

    model_config = ConfigDict(extra="forbid")

    feedback: str
    example: str | None = None
    completion_id: str | None = None
    choice_index: int = 0
    lora_id: str | None = None
    prompt: str | None = None
    response: str | None = None
    training: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _names_an_answer(self) -> FeedbackItem:
        if self.completion_id is None and None in (self.lora_id, self.prompt, self.response):
            raise ValueError(
                "name the answer with completion_id, or with lora_id + prompt + response"
            )
        return self
