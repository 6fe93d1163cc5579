"""The records claas keeps: adapters, their versions, rollouts, feedback requests, memory.

Immutable pydantic models, as `claas.store` reads them from its database; the layers above pass
them around without importing the store.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

FeedbackStatus = Literal["queued", "running", "done", "failed"]
PENDING: tuple[FeedbackStatus, ...] = ("queued", "running")  # not finished yet
FINISHED: tuple[FeedbackStatus, ...] = ("done", "failed")  # will not change again


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Adapter(_Frozen):
    lora_id: str
    base_model: str
    rank: int
    lora_alpha: float
    target_modules: list[str]
    created_at: float
    current_version: int | None  # served and trained from; None before the first version

    def unchanged_since(self, before: Adapter) -> bool:
        """Whether this is still the adapter `before` was read as: not rolled back, nor deleted
        and re-created, since (what a training result started from `before` needs)."""
        return (self.current_version, self.created_at) == (
            before.current_version,
            before.created_at,
        )


class AdapterVersion(_Frozen):
    lora_id: str
    version: int
    state_path: str
    sampler_path: str
    created_at: float
    feedback_id: str | None
    metrics: dict[str, Any]


class Rollout(_Frozen):
    id: str
    lora_id: str | None  # None: sampled from the base model
    adapter_version: int | None
    model: str
    messages: list[dict[str, Any]]
    prompt_tokens: list[int]
    response_tokens: list[int]
    behavior_logprobs: list[float]
    sampling_params: dict[str, Any]
    response_text: str
    prompt_hash: str
    response_hash: str
    created_at: float
    expires_at: float | None  # None: never expires
    # "chat": prompt_tokens are `messages` through the chat template; "text": a raw prompt
    # (/v1/completions), whose teacher prompt is the raw text plus the hindsight block.
    prompt_format: Literal["chat", "text"] = "chat"


class FeedbackRequest(_Frozen):
    id: str
    lora_id: str
    status: FeedbackStatus
    items: list[dict[str, Any]]
    training: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    metrics: dict[str, Any]
    version: int | None  # the adapter version this request produced
    coalesced_into: str | None  # the id of the request whose training step carried this one


class MemoryItem(_Frozen):
    """One lesson an adapter was taught: a prompt (the conversation up to the answer) and the
    feedback on it, replayed by later feedback requests on fresh answers. The answer itself is
    not kept: replay draws a new one from the version being trained."""

    id: str
    lora_id: str
    feedback_id: str  # the request that taught it last
    messages: list[dict[str, Any]]
    prompt_tokens: list[int]
    prompt_format: Literal["chat", "text"]
    feedback: str
    example: str | None
    created_at: float
