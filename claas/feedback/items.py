"""Feedback items: what a request names, resolved against the store before anything is queued,
and the training samples its items become.

An item names one rollout, by completion id or by adapter + prompt text + response text, and
carries the user's feedback (and, optionally, an example answer). `resolve_feedback` finds every
item's rollout and checks that the batch trains one adapter with one config; `samples_of` reads
the rollouts again when the request is checked and when it trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from claas.errors import InvalidFeedback, NothingToTrain, RolloutNotFound
from claas.ids import (
    LORA_ID_PATTERN,
    check_owner,
    rollout_missing,
    text_hash,
    validate_lora_id,
    visible_to,
)
from claas.records import Rollout
from claas.sdpo.config import ExampleText, FeedbackSample, FeedbackText, TrainingConfig
from claas.sdpo.prompts import MAX_TEXT_CHARS, Utf8Text
from claas.store import Store


class FeedbackItem(BaseModel):
    """One piece of feedback on one rollout, named by `completion_id` or by
    `lora_id` + `prompt` + `response`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # what `_names_a_rollout` checks
            "anyOf": [
                {
                    "properties": {"completion_id": {"type": "string"}},
                    "required": ["completion_id"],
                },
                {
                    "properties": {
                        "lora_id": {"type": "string"},
                        "prompt": {"type": "string"},
                        "response": {"type": "string"},
                    },
                    "required": ["lora_id", "prompt", "response"],
                },
            ]
        },
    )

    completion_id: str | None = Field(
        None, max_length=200, description="The `id` of the chat completion (preferred, exact)."
    )
    choice_index: int = Field(0, ge=0, le=63, description="Which choice of that completion.")
    lora_id: str | None = Field(
        None, max_length=200, json_schema_extra={"pattern": LORA_ID_PATTERN}
    )
    prompt: Utf8Text | None = Field(
        None, max_length=MAX_TEXT_CHARS, description="The user message text."
    )
    response: Utf8Text | None = Field(
        None, max_length=MAX_TEXT_CHARS, description="The answer's text."
    )
    feedback: FeedbackText
    example: ExampleText | None = Field(
        None,
        description="An answer you would have wanted. The teacher is shown it as an example "
        "(never trained on as a target), so what the model never says, a name, can be taught.",
    )
    training: TrainingConfig | None = None

    @model_validator(mode="after")
    def _names_a_rollout(self) -> FeedbackItem:
        by_text = None not in (self.lora_id, self.prompt, self.response)
        if self.completion_id is None and not by_text:
            raise ValueError(
                "name the rollout with completion_id, or with lora_id + prompt + response"
            )
        return self


@dataclass(frozen=True)
class ResolvedFeedback:
    lora_id: str
    items: list[dict[str, Any]]  # {"rollout_id", "feedback", "example" if given}
    training: TrainingConfig


def resolve_feedback(
    store: Store, items: Sequence[FeedbackItem], owner: str | None
) -> ResolvedFeedback:
    """Find each item's rollout and check the batch; raise a domain error otherwise.

    `owner` is the caller's (None: the admin, or a server without keys). An adapter the
    caller names is checked before any lookup (403), so a guessed prompt and response
    reveal nothing; a rollout found by completion id that belongs to another owner is
    answered exactly like one that does not exist.
    """
    if not items:
        raise InvalidFeedback("send at least one feedback item")
    rollouts = [_rollout(store, item, owner) for item in items]
    for rollout in rollouts:
        if rollout.lora_id is None:
            raise NothingToTrain(
                f"rollout {rollout.id} came from the base model {rollout.model!r}, which has "
                "no adapter to train; chat with an adapter (model 'owner/name') and give "
                "feedback on that answer"
            )
    lora_ids = sorted({r.lora_id for r in rollouts if r.lora_id})
    if len(lora_ids) != 1:
        raise InvalidFeedback(
            f"the items name rollouts of different adapters {lora_ids}; send one request "
            "per adapter"
        )
    configs = {item.training or TrainingConfig() for item in items}
    if len(configs) != 1:
        raise InvalidFeedback(
            "the items carry different training configs; use one config per request"
        )
    store.get_adapter(lora_ids[0])  # the adapter still exists
    return ResolvedFeedback(
        lora_id=lora_ids[0],
        items=[
            {"rollout_id": r.id, "feedback": item.feedback}
            | ({"example": item.example} if item.example is not None else {})
            for r, item in zip(rollouts, items, strict=True)
        ],
        training=configs.pop(),
    )


def _rollout(store: Store, item: FeedbackItem, owner: str | None) -> Rollout:
    if item.completion_id is not None:
        rollout_id = item.completion_id
        if item.choice_index:
            rollout_id = f"{item.completion_id}.{item.choice_index}"
        rollout = store.get_rollout(rollout_id)
        if rollout.lora_id is not None and not visible_to(owner, rollout.lora_id):
            raise rollout_missing(rollout_id)
        return rollout
    assert item.lora_id is not None and item.prompt is not None and item.response is not None
    lora_id = validate_lora_id(item.lora_id)
    check_owner(owner, lora_id)  # before the lookup: a 403 says nothing of the texts
    return store.find_rollout(lora_id, text_hash(item.prompt), text_hash(item.response))


def samples_of(store: Store, lora_id: str, items: Sequence[dict[str, Any]]) -> list[FeedbackSample]:
    """The training samples a request's items become: each names a rollout, which must still
    be stored (InvalidFeedback if it expired while the request was queued)."""
    return [_sample(store, lora_id, item) for item in items]


def _sample(store: Store, lora_id: str, item: dict[str, Any]) -> FeedbackSample:
    try:
        rollout = store.get_rollout(item["rollout_id"])
    except RolloutNotFound as error:
        raise InvalidFeedback(f"{error} (it expired while queued)") from error
    return FeedbackSample(
        lora_id=lora_id,
        messages=rollout.messages,
        prompt_tokens=rollout.prompt_tokens,
        response_tokens=rollout.response_tokens,
        behavior_logprobs=rollout.behavior_logprobs,
        feedback=item["feedback"],
        example=item.get("example"),
        prompt_format=rollout.prompt_format,
    )
