"""What one feedback request is made of: its samples, its training config, and what it produces.

`TrainingConfig` holds the SDPO hyper-parameters (the README's "How a feedback request trains"
table gives each default and the runs behind it, in benchmarks/defaults.md); `FeedbackSample` is
one rollout with the user's feedback; `TrainedCheckpoint` is the engine's result, which the
feedback queue registers as the adapter's next version.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from claas.sdpo.prompts import HindsightStyle, utf8_text

DivergenceMode = Literal["topk_gjs", "scalar_kl"]
ReplayChoice = Literal["preferences", "recent", "spread"]
DIVERGENCE_MODES: tuple[DivergenceMode, ...] = get_args(DivergenceMode)
FEEDBACK_MAX_CHARS = 8000
# Text that is not blank has a character outside both Python's and ECMA-262's whitespace, so the
# OpenAPI schema's pattern and `short_text` agree on every string.
NOT_BLANK = (
    r"[^\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
)


def short_text(value: str, name: str, when_empty: str, when_long: str) -> str:
    """The one check of a feedback message or an example: not blank, at most
    FEEDBACK_MAX_CHARS; each error names the field and says what to do."""
    if not re.search(NOT_BLANK, value):
        raise ValueError(f"{name} is empty; {when_empty}")
    if len(value) > FEEDBACK_MAX_CHARS:
        raise ValueError(
            f"{name} is {len(value)} characters, over the limit of {FEEDBACK_MAX_CHARS}; "
            f"{when_long}"
        )
    return value


def feedback_text(value: str) -> str:
    return short_text(
        value,
        "feedback",
        "say what should change in the answer",
        "say what should change in fewer words",
    )


def example_text(value: str) -> str:
    return short_text(
        value, "example", "give the answer you wanted, or leave example out", "give a shorter one"
    )


_SHORT_TEXT = Field(max_length=FEEDBACK_MAX_CHARS, json_schema_extra={"pattern": NOT_BLANK})
FeedbackText = Annotated[str, AfterValidator(utf8_text), AfterValidator(feedback_text), _SHORT_TEXT]
ExampleText = Annotated[str, AfterValidator(utf8_text), AfterValidator(example_text), _SHORT_TEXT]

# The learning-rate rule. Tinker's LoRA rule of thumb scales a learning rate with the model's
# hidden size H as (2000 / H) ** P, with P = 0.781 for Llama-family models and 0.0775 for Qwen
# (tinker-cookbook's `hyperparam_utils.get_lr`). claas keeps that shape and calibrates its
# constant on the embedded SmolLM2-135M (H = 576), where 1e-4 takes the `concise` preference
# from 0.17 to 1.0 compliance in 3 feedback requests without losing capability (`claas eval`,
# benchmarks/defaults.md), while 3e-5 barely moves it. That gives 3.7e-5 at H = 2048 (1B) and
# 2.2e-5 at H = 4096 (8B): about 13 times below Tinker's own fine-tuning rates, so a larger
# model is not pushed to diverge. Hidden sizes below 576 are not calibrated: they get 576's rate.
LR_AT_H2000 = 3.8e-5
LR_EXPONENTS = {"qwen2": 0.0775, "qwen3": 0.0775, "qwen3_moe": 0.0775}
LLAMA_LR_EXPONENT = 0.781
CALIBRATED_MIN_HIDDEN = 576
UNKNOWN_HIDDEN_SIZE = 4096  # a model whose config is not at hand: assume a large one


def default_learning_rate(hidden_size: int | None, model_type: str | None = None) -> float:
    """The learning rate a feedback request uses when it does not set one (see above)."""
    size = max(hidden_size or UNKNOWN_HIDDEN_SIZE, CALIBRATED_MIN_HIDDEN)
    exponent = LR_EXPONENTS.get(model_type or "", LLAMA_LR_EXPONENT)
    return float(LR_AT_H2000 * (2000 / size) ** exponent)


class TrainingConfig(BaseModel):
    """Hyper-parameters of one feedback request. `alpha` is the GJS mixing weight, nothing else."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={  # what `_demonstrations_need_topk` checks
            "if": {
                "properties": {"teacher_demonstrations": {"minimum": 1}},
                "required": ["teacher_demonstrations"],
            },
            "then": {"properties": {"use_topk_divergence": {"const": True}}},
        },
    )

    use_topk_divergence: bool = True
    teacher_top_k: int = Field(100, ge=1, le=1000)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="GJS weight of the teacher")
    learning_rate: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="None: scaled to the base model's hidden size (default_learning_rate)",
    )
    steps_per_batch: int = Field(
        8,
        ge=1,
        le=64,
        description="optimizer steps on the batch, each re-scoring the current student; 8 makes "
        "one request visible on SmolLM2-135M (benchmarks/defaults.md)",
    )
    is_clip: float = Field(5.0, ge=1.0, le=1e4)
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6, description="0 disables clipping")
    kl_reg_weight: float = Field(0.0, ge=0.0, le=1e3)
    kl_coef: float = Field(1.0, gt=0.0, le=1e3, description="scalar_kl mode only")
    feedback_repetitions: int = Field(1, ge=1, le=8)
    hindsight: HindsightStyle = Field(
        "instruction", description="how the feedback is put to the teacher (claas.sdpo.prompts)"
    )
    teacher: Literal["adapter", "base"] = Field(
        "adapter",
        description="adapter: the version being trained from, so earlier feedback is kept; "
        "base: the frozen base model",
    )
    teacher_demonstrations: int = Field(
        0,
        ge=0,
        le=16,
        description="greedy answers of the teacher to the batch's first prompts, added to the "
        "batch: they carry what the student never samples (a new name, say). Off by default: "
        "on SmolLM2-135M they cost capability (benchmarks/defaults.md)",
    )
    samples_per_request: int = Field(
        1,
        ge=1,
        le=16,
        description="a batch (a request, or the requests coalesced with it) with fewer answers "
        "gets fresh answers from the version being trained to the same prompts, trained with "
        "the same feedback (the feedback is about the behaviour, not one answer). 1 (off): "
        "on SmolLM2-135M fresh answers cost more than they teach (benchmarks/defaults.md)",
    )
    sample_temperature: float = Field(
        1.0, ge=0.0, le=2.0, description="temperature of fresh and replayed answers (seeded)"
    )
    replay: int = Field(
        2,
        ge=0,
        le=16,
        description="items of the adapter's memory of earlier feedback re-taught with each "
        "batch, on fresh answers from the version being trained; 0: off",
    )
    replay_choice: ReplayChoice = Field(
        "preferences",
        description="which memory items: preferences (one each of the most recently taught "
        "other feedback texts), recent (the newest items), spread (evenly over the memory)",
    )
    self_example: bool = Field(
        False,
        description="show the teacher its own greedy answer under the feedback as the example "
        "(a self-demonstration), where the user gave none",
    )

    @model_validator(mode="after")
    def _demonstrations_need_topk(self) -> TrainingConfig:
        if self.teacher_demonstrations and not self.use_topk_divergence:
            raise ValueError(
                "teacher_demonstrations need the top-K divergence (their loss is forward KL "
                "over the teacher's top-K); set use_topk_divergence=true or demonstrations=0"
            )
        return self

    @property
    def divergence_mode(self) -> DivergenceMode:
        return "topk_gjs" if self.use_topk_divergence else "scalar_kl"


class Lesson(BaseModel):
    """A prompt and the feedback it was taught with, without an answer: a memory item to
    replay. The engine draws its answers fresh from the version it trains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_id: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    prompt_tokens: list[int] = Field(min_length=1)
    feedback: FeedbackText
    example: ExampleText | None = Field(
        None,
        description="An answer the user wanted, shown to the teacher (prompts.hindsight_block)",
    )
    prompt_format: Literal["chat", "text"] = Field(
        "chat", description="text: the prompt was raw text (messages[-1] holds it), not chat"
    )


def lesson_key(prompt_format: str, messages: list[dict[str, Any]], feedback: str) -> str:
    """What makes two lessons one: the same prompt (its format and messages) taught with the
    same feedback. The store keeps one memory item per key (hashed), replay skips a memory item
    whose key the batch teaches anyway, and a self-example is drawn once per key."""
    return json.dumps([prompt_format, messages, feedback], sort_keys=True)


class FeedbackSample(Lesson):
    """One rollout plus the user's feedback on it."""

    response_tokens: list[int]
    behavior_logprobs: list[float]


class StepMetrics(BaseModel):
    """One optimizer step. The token means over the batch come from
    `strategies.rollout_statistics`; `distill_loss` and the scalar mode's `adv_*` and `kl_mean`
    are per-sample token means averaged over samples, under the names CLaaS reports them by
    (`strategies.SampleStatistics` defines each)."""

    step: int
    loss: float
    distill_loss: float
    divergence_mean: float
    mean_is_ratio: float
    clip_fraction: float
    kl_reg_mean: float
    grad_norm: float | None = None
    adv_mean: float | None = None
    adv_abs_mean: float | None = None
    adv_abs_mean_raw: float | None = None
    kl_mean: float | None = None
    adv_gain: float | None = None
    seconds: float


class TrainFrom(BaseModel):
    """The adapter version a request trains from: its number and checkpoints."""

    model_config = ConfigDict(frozen=True)

    version: int = Field(ge=0)
    state_path: str
    sampler_path: str


class TrainedCheckpoint(BaseModel):
    """What one feedback request produced: saved checkpoints, not yet a registered version."""

    lora_id: str
    trained_from: int
    state_path: str
    sampler_path: str
    divergence_mode: DivergenceMode
    metrics: dict[str, float | int | str]
    steps: list[StepMetrics]
    teacher_texts: list[str]  # the batch's own samples (and demonstrations): what is reported
    replayed_texts: list[str] = []  # replayed lessons': kept in memory only, never reported
    timings: dict[str, float]
