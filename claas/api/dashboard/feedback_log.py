"""The feedback log's rows: each request with its samples, metrics and the teacher's prompts.

A row opens to its samples: the conversation, the response, the feedback, and the teacher's
hindsight prompt exactly as the engine tokenised it (the functions of `claas.sdpo.prompts` the
engine trains with, decoded). A part that cannot be shown (a purged rollout, no tokenizer) says
why instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from claas.records import PENDING, FeedbackRequest, Rollout
from claas.runtime import Runtime
from claas.sdpo.prompts import HindsightStyle, message_text, rollout_teacher_prompt_tokens

PAGE_SIZE = 25
MAX_PAGE_SIZE = 100  # each row renders its teacher prompts


@dataclass(frozen=True)
class SampleView:
    """One item of a feedback request, with what the teacher was shown for it."""

    rollout_id: str
    feedback: str
    messages: list[tuple[str, str]]  # (role, text); empty when the rollout is gone
    response: str | None
    teacher_prompt: str | None
    note: str | None  # why a part is missing


@dataclass(frozen=True)
class FeedbackRow:
    request: FeedbackRequest
    samples: list[SampleView]
    scalars: dict[str, Any]  # the request's scalar metrics
    timings: dict[str, float]
    steps: list[dict[str, Any]]

    @property
    def waited(self) -> float | None:
        started = self.request.started_at
        return None if started is None else started - self.request.created_at

    @property
    def trained(self) -> float | None:
        request = self.request
        if request.started_at is None or request.finished_at is None:
            return None
        return request.finished_at - request.started_at


def teacher_prompt_text(
    tokenizer: Any,
    rollout: Rollout,
    feedback: str,
    repetitions: int,
    style: HindsightStyle,
    example: str | None = None,
) -> str:
    """The teacher's prompt for one sample, as text: the engine's own tokens, decoded.

    The tokens come from the functions in `claas.sdpo.prompts` that the engine trains with, so the
    page shows exactly what the teacher was conditioned on (the special tokens of the
    chat template included).
    """
    tokens = rollout_teacher_prompt_tokens(
        tokenizer, rollout.messages, rollout.prompt_format, feedback, repetitions, style, example
    )
    return str(tokenizer.decode(tokens))


def _sample_view(
    tokenizer: Any,
    item: Mapping[str, Any],
    rollout: Rollout | None,
    repetitions: int,
    style: HindsightStyle,
) -> SampleView:
    rollout_id, feedback = str(item.get("rollout_id", "")), str(item.get("feedback", ""))
    if rollout is None:
        return SampleView(
            rollout_id, feedback, [], None, None, "the rollout has expired and was purged"
        )
    messages = [
        (str(m.get("role", "?")), message_text(m.get("content", ""))) for m in rollout.messages
    ]
    teacher, note = None, None
    if tokenizer is None:
        note = "no tokenizer loaded: the teacher prompt cannot be rendered"
    else:
        try:
            example = item.get("example")
            teacher = teacher_prompt_text(
                tokenizer, rollout, feedback, repetitions, style, str(example) if example else None
            )
        except (ValueError, KeyError, TypeError) as error:
            note = f"the teacher prompt cannot be rendered: {error}"
    return SampleView(rollout_id, feedback, messages, rollout.response_text, teacher, note)


def read_feedback_page(
    runtime: Runtime, owner: str | None, lora_id: str | None, limit: int, start: int
) -> tuple[int, int, list[FeedbackRow]]:
    """One page of the feedback log, its totals and its rows (blocking: run in a thread)."""
    store = runtime.store
    requests = store.list_feedback(owner=owner, lora_id=lora_id, limit=limit, offset=start)
    total = store.count_feedback(owner=owner, lora_id=lora_id)
    pending = store.count_feedback(owner=owner, lora_id=lora_id, statuses=PENDING)
    return total, pending, feedback_rows(runtime, requests)


def feedback_rows(runtime: Runtime, requests: Sequence[FeedbackRequest]) -> list[FeedbackRow]:
    ids = [str(item.get("rollout_id", "")) for r in requests for item in r.items]
    rollouts = runtime.store.rollouts_by_id(ids)
    rows = []
    for request in requests:
        repetitions = int(request.training.get("feedback_repetitions", 1) or 1)
        # Requests from before the hindsight setting existed were trained with the context block.
        hindsight = request.training.get("hindsight", "context")
        style: HindsightStyle = "context" if hindsight == "context" else "instruction"
        samples = [
            _sample_view(
                runtime.tokenizer,
                item,
                rollouts.get(str(item.get("rollout_id"))),
                repetitions,
                style,
            )
            for item in request.items
        ]
        metrics = request.metrics
        timings = metrics.get("timings")
        steps = metrics.get("steps")
        rows.append(
            FeedbackRow(
                request=request,
                samples=samples,
                scalars={
                    k: v
                    for k, v in metrics.items()
                    if isinstance(v, str | int | float | bool) and k != "coalesced"
                },
                timings=(
                    {str(k): float(v) for k, v in timings.items() if isinstance(v, int | float)}
                    if isinstance(timings, dict)
                    else {}
                ),
                steps=[s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else [],
            )
        )
    return rows


@dataclass(frozen=True)
class Pagination:
    offset: int
    limit: int
    total: int
    lora_id: str | None

    @property
    def page(self) -> int:
        return self.offset // self.limit + 1

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.limit))

    def _link(self, offset: int) -> str:
        query: dict[str, str | int] = {"offset": max(0, offset)}
        if self.limit != PAGE_SIZE:
            query["limit"] = self.limit
        if self.lora_id:
            query["lora_id"] = self.lora_id
        return f"/dashboard?{urlencode(query)}"

    @property
    def previous(self) -> str | None:
        return self._link(self.offset - self.limit) if self.offset > 0 else None

    @property
    def next(self) -> str | None:
        return (
            self._link(self.offset + self.limit) if self.offset + self.limit < self.total else None
        )
