"""CLaaS's request and answer bodies, in CLaaS's shapes with claas's ranges (which contain CLaaS's).

CLaaS (github.com/kfallah/CLaaS, `claas/core/types.py`) names its bodies `LoraInitRequest`,
`FeedbackBatchRequest`, `FeedbackResponse`, ...; the models here accept and answer those shapes,
and `FeedbackBody` tells a CLaaS feedback body (`requests`) from claas's own (`items`). How the
names and fields map onto claas's is in `claas.api.routes.claas_compat`, whose routes use them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from claas.adapters import ALL_TARGETS
from claas.api.schemas import FeedbackRequestBody
from claas.ids import LORA_ID_PATTERN
from claas.sdpo.config import FeedbackText, TrainingConfig
from claas.sdpo.prompts import MAX_TEXT_CHARS, Utf8Text

ORCHESTRATION_NOTE = (
    "not needed: claas samples from the adapter version it trains and loads each new version "
    "for serving itself, so there is no vLLM to sleep or wake"
)


# ---------------------------------------------------------------------------------------------
# Bodies, in CLaaS's shapes (claas's ranges, which contain CLaaS's)
# ---------------------------------------------------------------------------------------------


class ClaasLoraInit(BaseModel):
    """CLaaS's `LoraInitRequest`."""

    model_config = ConfigDict(extra="forbid")

    lora_id: str = Field(
        max_length=200,
        description="owner/name (owner/name-latest creates owner/name)",
        json_schema_extra={"pattern": LORA_ID_PATTERN},
    )
    base_model: str | None = Field(
        None, max_length=300, description="Omitted: the served model (CLaaS's default is Qwen3-8B)."
    )
    lora_r: int = Field(32, ge=1, le=256, description="The rank.")
    lora_alpha: float | None = Field(None, gt=0, le=4096, description="Omitted: claas's 32.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        json_schema_extra={"items": {"enum": list[JsonValue](ALL_TARGETS)}},
        description="Omitted: attention + MLP.",
    )


def _one_step_per_call(value: Any) -> Any:
    """A CLaaS call is one optimizer step on the answers it sends: `steps_per_batch` is 1 and
    `replay` 0 unless the body sets them."""
    return {"steps_per_batch": 1, "replay": 0, **value} if isinstance(value, dict) else value


ClaasTraining = Annotated[TrainingConfig, BeforeValidator(_one_step_per_call)]


class ClaasFeedbackItem(BaseModel):
    """CLaaS's `FeedbackItem`: one answer, found by its adapter, prompt and response text."""

    model_config = ConfigDict(extra="forbid")

    lora_id: str = Field(max_length=200, json_schema_extra={"pattern": LORA_ID_PATTERN})
    prompt: Utf8Text = Field(
        min_length=1, max_length=MAX_TEXT_CHARS, description="The user message."
    )
    response: Utf8Text = Field(
        min_length=1, max_length=MAX_TEXT_CHARS, description="The answer's visible text."
    )
    feedback: FeedbackText
    training: ClaasTraining = Field(
        default_factory=lambda: TrainingConfig(steps_per_batch=1, replay=0),
        description="claas's TrainingConfig; CLaaS's six fields keep their meaning, and "
        "steps_per_batch is 1 and replay 0 unless set (one optimizer step per call on the "
        "answers it sends, as in CLaaS).",
    )


class ClaasOrchestration(BaseModel):
    """CLaaS's vLLM sleep/wake options: accepted, and not needed (`ORCHESTRATION_NOTE`)."""

    model_config = ConfigDict(extra="forbid")

    sleep_before: bool = True
    wake_after: bool = True
    wake_on_failure: bool = True
    sleep_level: int = Field(1, ge=1, le=2)


class ClaasFeedbackBatch(BaseModel):
    """CLaaS's `FeedbackBatchRequest`: answered once trained, in CLaaS's response shape."""

    model_config = ConfigDict(extra="forbid")

    requests: list[ClaasFeedbackItem] = Field(min_length=1, max_length=64)
    orchestration: ClaasOrchestration = Field(default_factory=ClaasOrchestration)


def _by_shape(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A body with `requests` is CLaaS's; any other is claas's. Only the one chosen is
    validated, instead of the union's own `handler`, which would try both and report the errors
    of each: the messages stay those of that body, with field paths as the client sent them."""
    if isinstance(value, dict) and "requests" in value:
        return ClaasFeedbackBatch.model_validate(value)
    return FeedbackRequestBody.model_validate(value)


FeedbackBody = Annotated[FeedbackRequestBody | ClaasFeedbackBatch, WrapValidator(_by_shape)]


# ---------------------------------------------------------------------------------------------
# Answers, in CLaaS's shapes
# ---------------------------------------------------------------------------------------------


class ClaasLoraInitResponse(BaseModel):
    lora_id: str = Field(description="The adapter's claas id, owner/name.")
    versions_removed: int = Field(
        description="An init of an adapter that exists starts it afresh, as in CLaaS: how many "
        "versions it had."
    )


class ClaasLoraList(BaseModel):
    loras: list[str] = Field(description="Each adapter's owner/name and owner/name-latest.")


class ClaasLoraDeleted(BaseModel):
    deleted: bool = Field(description="False if there was no such adapter (as in CLaaS).")


class ClaasDistillResult(BaseModel):
    lora_id: str = Field(description="The adapter trained; it now serves the new version.")
    metadata: dict[str, Any] = Field(description="CLaaS's metric names, and `version`.")


class ClaasVllmState(BaseModel):
    slept: bool
    woke: bool


class ClaasTimingMs(BaseModel):
    sleep: int = 0
    distill: int = 0
    save: int = 0
    wake: int = 0
    logprobs: int = 0
    total: int = 0


class ClaasFeedbackResponse(BaseModel):
    """CLaaS's `FeedbackResponse`; `status` is `ok` once trained, else claas's queue status."""

    status: str
    request_id: str = Field(description="claas's feedback_id (GET /v1/feedback/{id}).")
    lora_id: str
    distill_result: ClaasDistillResult | None
    vllm: ClaasVllmState
    feedback_log_path: str = Field(description="Where this request's full record is served.")
    timing_ms: ClaasTimingMs
    batch_size: int
    orchestration_note: str = ORCHESTRATION_NOTE
