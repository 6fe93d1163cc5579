"""The answers the engine adds to a feedback batch before it is scored.

- `fresh_samples`: answers of the version trained from, to the batch's prompts (up to
  `samples_per_request`) and to each replayed lesson of the adapter's memory, which keeps its
  own feedback;
- `self_examples`: with `self_example`, the teacher's greedy answer under the feedback becomes
  the example of each sample that has none;
- `demonstrations`: `teacher_demonstrations` greedy answers of the teacher, trained toward on
  their response positions.

Each is sampled through the Tinker `SamplingClient` of the model that answers, is no longer
than the batch's longest answer, and fits the context after the teacher's prompt; an answer that
is only a stop token teaches nothing but ending at once, and is left out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

import numpy as np
from tinker import types
from transformers import PreTrainedTokenizerBase

from claas.sdpo.config import (
    FEEDBACK_MAX_CHARS,
    FeedbackSample,
    Lesson,
    TrainFrom,
    TrainingConfig,
    lesson_key,
)
from claas.sdpo.samples import lesson_teacher_prompt, teacher_prompt_length
from claas.sdpo.strategies import Prepared
from claas.services.protocol import SamplingClient


async def fresh_samples(
    student: SamplingClient,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[FeedbackSample],
    replay: Sequence[Lesson],
    config: TrainingConfig,
    start: TrainFrom,
    max_context: int,
) -> tuple[list[FeedbackSample | None], list[FeedbackSample | None]]:
    """Answers of the version trained from: to the batch's prompts in turn, until the batch
    holds `samples_per_request` (its feedback is about the behaviour, so a new answer to the
    same prompt is as good a sample as the user's), and one to each replayed lesson, which
    keeps its own feedback. Seeded by the version and the place in the batch, and no longer
    than the batch's longest answer. An answer that is only a stop token teaches nothing but
    ending at once, and a lesson without room for one token after its teacher's prompt
    cannot be trained: both are None, left out."""
    lessons: list[Lesson] = [
        samples[i % len(samples)] for i in range(config.samples_per_request - len(samples))
    ]
    lessons += replay
    if not lessons:
        return [], []
    longest = max(len(s.response_tokens) for s in samples)
    teacher_prompts = await asyncio.to_thread(
        lambda: [
            teacher_prompt_length(tokenizer, lesson, config, max_context) for lesson in lessons
        ]
    )
    calls: list[Awaitable[types.SampleResponse | None]] = []
    for index, (lesson, teacher_length) in enumerate(zip(lessons, teacher_prompts, strict=True)):
        # Room for the answer after the longer prompt: the teacher scores it after its own.
        room = max_context - max(len(lesson.prompt_tokens), teacher_length) - 1
        if room < 1:  # not even one token fits after the teacher's prompt: left out
            calls.append(_nothing())
            continue
        params = types.SamplingParams(
            max_tokens=min(longest, room),
            temperature=config.sample_temperature,
            seed=(start.version * 1_000_003 + index) % 2**31,
        )
        prompt = types.ModelInput.from_ints(lesson.prompt_tokens)
        calls.append(student.sample(prompt, 1, params))
    answers: list[FeedbackSample | None] = []
    for lesson, result in zip(lessons, await asyncio.gather(*calls), strict=True):
        if result is None:
            answers.append(None)
            continue
        sequence = result.sequences[0]
        tokens = [int(t) for t in sequence.tokens]
        if not tokens or (len(tokens) == 1 and sequence.stop_reason == "stop"):
            answers.append(None)
            continue
        if sequence.logprobs is None or len(sequence.logprobs) != len(tokens):
            raise RuntimeError(
                "the sampler returned no log-probs for a fresh answer; training needs them "
                "for its importance ratios"
            )
        logprobs = sequence.logprobs
        answers.append(
            FeedbackSample(
                **lesson.model_dump(include=set(Lesson.model_fields)),
                response_tokens=tokens,
                behavior_logprobs=[min(float(v), 0.0) for v in logprobs],
            )
        )
    split = len(lessons) - len(replay)
    return answers[:split], answers[split:]


async def self_examples(
    teacher: SamplingClient,
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[FeedbackSample],
    config: TrainingConfig,
    max_context: int,
) -> list[FeedbackSample]:
    """Where the user gave no example, the teacher's own greedy answer under the feedback
    becomes it (a self-demonstration): one answer per distinct prompt and feedback, no
    longer than the batch's longest answer."""
    wanted: dict[str, FeedbackSample] = {}
    for sample in batch:
        if sample.example is None:
            wanted.setdefault(_lesson_key(sample), sample)
    if not wanted:
        return list(batch)
    longest = max(len(s.response_tokens) for s in batch)
    calls = []
    for sample in wanted.values():
        prompt = await asyncio.to_thread(lesson_teacher_prompt, tokenizer, sample, config)
        room = max_context - len(prompt) - 1
        params = types.SamplingParams(max_tokens=max(1, min(longest, room)), temperature=0.0)
        calls.append(teacher.sample(types.ModelInput.from_ints(prompt), 1, params))
    examples: dict[str, str] = {}
    for key, result in zip(wanted, await asyncio.gather(*calls), strict=True):
        text = tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True).strip()
        if text:
            examples[key] = text[:FEEDBACK_MAX_CHARS]

    def with_example(sample: FeedbackSample) -> FeedbackSample:
        example = examples.get(_lesson_key(sample))
        if sample.example is not None or example is None:
            return sample
        shown = sample.model_copy(update={"example": example})
        fits = teacher_prompt_length(tokenizer, shown, config, max_context) + len(
            sample.response_tokens
        )
        return shown if fits < max_context else sample  # never at the batch's cost

    return await asyncio.to_thread(lambda: [with_example(s) for s in batch])


async def demonstrations(
    teacher: SamplingClient, prepared: list[Prepared], config: TrainingConfig, max_context: int
) -> list[Prepared]:
    """The teacher's own greedy answers to the batch's first prompts, as extra samples.

    On-policy distillation corrects only the tokens the student samples. A string it never
    samples gets no signal: "Kuro" is `' K'` + `'uro'`, and a student that never says `' K'`
    never shows the teacher a position where `'uro'` is due. A teacher answer puts those
    tokens on the response positions (`loss_terms` trains them with forward KL at weight 1).
    A demonstration is no longer than the batch's longest rollout and stops where the
    model's turn ends (the sampler's default stops, as for rollouts); one that is only a
    stop token is dropped, since it would teach nothing but ending at once.
    """
    sources = prepared[: config.teacher_demonstrations]
    if not sources:
        return []
    longest = max(len(p.response) for p in prepared)
    calls = []
    for p in sources:
        room = max_context - max(len(p.teacher_prompt), len(p.prompt)) - 1
        params = types.SamplingParams(max_tokens=max(1, min(longest, room)), temperature=0.0)
        calls.append(teacher.sample(types.ModelInput.from_ints(p.teacher_prompt), 1, params))
    demonstrations = []
    for p, result in zip(sources, await asyncio.gather(*calls), strict=True):
        sequence = result.sequences[0]
        answer = [int(t) for t in sequence.tokens]
        if not answer or (len(answer) == 1 and sequence.stop_reason == "stop"):
            continue
        # The log-probs it was sampled with (the teacher's), for the record: training
        # compares a demonstration with the current student, not with these.
        behavior = np.minimum(np.asarray(sequence.logprobs or [0.0] * len(answer)), 0.0)
        sample = p.sample.model_copy(
            update={"response_tokens": answer, "behavior_logprobs": behavior.tolist()}
        )
        demonstrations.append(
            Prepared(
                sample=sample,
                teacher_prompt=p.teacher_prompt,
                behavior=behavior,
                demonstration=True,
            )
        )
    return demonstrations


async def _nothing() -> None:
    """An answer not asked for, in a list of sampling calls."""


def _lesson_key(lesson: Lesson) -> str:
    return lesson_key(lesson.prompt_format, lesson.messages, lesson.feedback)
