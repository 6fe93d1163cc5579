"""The samples of a batch, checked and prepared for the teacher before any model work.

`validate_samples` refuses what cannot be trained (a domain error the API maps to a status
code); `prepare` pairs a sample with its teacher prompt (`lesson_teacher_prompt`: its
conversation, the feedback and example, through `claas.sdpo.prompts`) and refuses a teacher
prompt plus response that does not fit the context, since the response is never truncated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from claas.errors import ContextTooLong, InvalidFeedback
from claas.ids import validate_lora_id
from claas.sdpo.config import FeedbackSample, Lesson, TrainingConfig
from claas.sdpo.divergence import LOGPROB_ROUNDING_TOL
from claas.sdpo.prompts import rollout_teacher_prompt_tokens
from claas.sdpo.strategies import Prepared


def validate_samples(samples: Sequence[FeedbackSample], max_context: int) -> str:
    """Refuse a batch that cannot be trained: one adapter, aligned lengths, a non-empty
    response, log-probs <= 0, a prompt and response within the context. Returns the adapter."""
    if not samples:
        raise InvalidFeedback("no samples given; send at least one feedback item")
    lora_ids = {s.lora_id for s in samples}
    if len(lora_ids) != 1:
        raise InvalidFeedback(
            f"one request trains one adapter, but the samples name {sorted(lora_ids)}; "
            "send one request per adapter"
        )
    lora_id = validate_lora_id(lora_ids.pop())
    for index, sample in enumerate(samples):
        where = f"sample {index}"
        if not sample.response_tokens:
            raise InvalidFeedback(f"{where}: the response is empty; nothing to train on")
        if len(sample.response_tokens) != len(sample.behavior_logprobs):
            raise InvalidFeedback(
                f"{where}: {len(sample.response_tokens)} response tokens but "
                f"{len(sample.behavior_logprobs)} behavior log-probs; they must align"
            )
        behavior = np.asarray(sample.behavior_logprobs, dtype=np.float64)
        if not np.all(np.isfinite(behavior)) or behavior.max() > LOGPROB_ROUNDING_TOL:
            raise InvalidFeedback(f"{where}: behavior log-probs must be finite and <= 0")
        if len(sample.prompt_tokens) + len(sample.response_tokens) >= max_context:
            raise ContextTooLong(
                f"{where}: prompt + response exceed the model's context of {max_context} tokens"
            )
    return lora_id


def prepare(
    tokenizer: PreTrainedTokenizerBase,
    sample: FeedbackSample,
    config: TrainingConfig,
    max_context: int,
) -> Prepared:
    """The sample with its teacher prompt; ContextTooLong if the teacher cannot score it."""
    try:
        teacher_prompt = lesson_teacher_prompt(tokenizer, sample, config)
    except (ValueError, KeyError) as error:
        raise InvalidFeedback(f"cannot build the teacher prompt: {error}") from error
    total = len(teacher_prompt) + len(sample.response_tokens)
    if total >= max_context:  # scoring needs room for one sampled token
        raise ContextTooLong(
            f"the teacher prompt (conversation + hindsight feedback) plus the response is "
            f"{total} tokens, over the model's context of {max_context}; shorten the "
            "conversation or the feedback (the response is never truncated)"
        )
    return Prepared(
        sample=sample,
        teacher_prompt=teacher_prompt,
        behavior=np.asarray(sample.behavior_logprobs, dtype=np.float64),
    )


def prepare_extra(
    tokenizer: PreTrainedTokenizerBase,
    sample: FeedbackSample,
    config: TrainingConfig,
    max_context: int,
) -> Prepared | None:
    """`prepare` for an answer the engine added: None if it cannot be trained on (its
    teacher prompt does not fit, say), so that it is left out, not the user's batch."""
    try:
        validate_samples([sample], max_context)
        return prepare(tokenizer, sample, config, max_context)
    except (InvalidFeedback, ContextTooLong):
        return None


def lesson_teacher_prompt(
    tokenizer: PreTrainedTokenizerBase, lesson: Lesson, config: TrainingConfig
) -> list[int]:
    """The teacher's prompt for a lesson (or sample): its conversation, feedback and example."""
    return rollout_teacher_prompt_tokens(
        tokenizer,
        lesson.messages,
        lesson.prompt_format,
        lesson.feedback,
        config.feedback_repetitions,
        config.hindsight,
        lesson.example,
    )


def teacher_prompt_length(
    tokenizer: PreTrainedTokenizerBase, lesson: Lesson, config: TrainingConfig, max_context: int
) -> int:
    """How long the lesson's teacher prompt is (the context when it cannot be built, so
    that the lesson gets no room and is dropped)."""
    try:
        return len(lesson_teacher_prompt(tokenizer, lesson, config))
    except (ValueError, KeyError):
        return max_context
