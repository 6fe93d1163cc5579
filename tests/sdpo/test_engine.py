"""The SDPO engine on the local service: the training steps, the teacher's prompt, fresh and
replayed answers, failure hygiene and validation, on the tiny model.

The exact gradients are checked in test_gradient.py, the learning signal on the real model in
tests/api/test_real_model.py (through the API, in both divergence modes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sdpo_harness import (
    FEEDBACK,
    LORA,
    GradientSpy,
    Harness,
    metric,
    perturb_latest,
    started,
)
from tinker import types

from claas.errors import Conflict, ContextTooLong, InvalidFeedback
from claas.models import LoadedModel, tiny_llama
from claas.sdpo import datums, divergence
from claas.sdpo.config import Lesson, TrainFrom, default_learning_rate
from claas.sdpo.engine import FeedbackSample, TrainingConfig
from claas.sdpo.prompts import (
    EXAMPLE_INTRO,
    EXAMPLE_OUTRO,
    chat_prompt_tokens,
    rollout_teacher_prompt_tokens,
)
from claas.services.local import LocalTrainingClient


@pytest.fixture(scope="module")
def pristine(model_cache: Path) -> LoadedModel:
    """The tiny model, built once: each harness serves a copy of it."""
    return tiny_llama(model_cache, seed=0)


@pytest.fixture
def harness(pristine: LoadedModel, tmp_path: Path) -> Iterator[Harness]:
    h = started(pristine, tmp_path)
    yield h
    h.close()


def test_first_step_is_topk_and_moves_gjs(harness: Harness) -> None:
    perturb_latest(harness)
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    # The base teacher: far from the perturbed version, so one step visibly closes the gap.
    config = TrainingConfig(steps_per_batch=1, learning_rate=1e-2, teacher="base")
    result = harness.distill(samples, config)
    assert result.divergence_mode == "topk_gjs"
    assert result.metrics["divergence_mode"] == "topk_gjs"
    assert result.metrics["steps_per_batch_applied"] == 1
    assert metric(result, "gjs_mean_after") < metric(result, "gjs_mean")
    assert result.steps[0].mean_is_ratio == pytest.approx(1.0, abs=1e-3)  # on-policy step 1
    assert harness.version == 3 and result.trained_from == 2
    assert harness.store.latest_version(LORA).version == 3  # type: ignore[union-attr]
    assert "(Instruction for your answer: " + FEEDBACK + ")" in result.teacher_texts[0]
    assert set(result.timings) >= {"teacher_scoring", "train", "final_scoring", "save"}


def test_demonstrations_are_weighted_one_at_every_step(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollout keeps its behaviour log-probs across steps (its ratio drifts); a teacher
    demonstration is compared with the current student (ratio 1) and trained at alpha 0."""
    calls: list[tuple[np.ndarray, np.ndarray, float]] = []
    real = datums.topk_loss_terms

    def spy(student: Any, teacher: Any, behavior: Any, *args: Any) -> Any:
        calls.append((np.asarray(student.sampled), np.asarray(behavior), args[1]))
        return real(student, teacher, behavior, *args)

    monkeypatch.setattr(datums, "topk_loss_terms", spy)
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    config = TrainingConfig(steps_per_batch=3, learning_rate=5e-3, teacher_demonstrations=1)
    result = harness.distill(samples, config)
    assert result.metrics["samples"] == 1 and result.metrics["demonstrations"] == 1
    rollout_calls, demo_calls = calls[0::2], calls[1::2]
    assert len(demo_calls) == 4  # 3 steps and the final scoring
    for sampled, behavior, alpha in demo_calls:
        np.testing.assert_array_equal(behavior, sampled)
        assert alpha == 0.0
    assert all(alpha == config.alpha for _, _, alpha in rollout_calls)
    first, last = rollout_calls[0], rollout_calls[-1]
    np.testing.assert_array_equal(first[1], last[1])  # the rollout's behaviour, unchanged
    assert not np.allclose(last[0], last[1])  # while the student moved


def test_multi_step_keeps_the_rollout_behavior(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    spy = GradientSpy(monkeypatch)
    config = TrainingConfig(steps_per_batch=4, learning_rate=5e-3)
    result = harness.distill(samples, config)
    assert len(spy.grads) == 4 and len(result.steps) == 4
    assert result.metrics["steps_per_batch_applied"] == 4
    ratios = [s.mean_is_ratio for s in result.steps]
    assert ratios[0] == pytest.approx(1.0, abs=1e-3)
    # Later steps compare the moved student with the *rollout's* log-probs, so r drifts from 1.
    assert abs(ratios[-1] - 1.0) > 1e-3
    moved = [
        any(not torch.equal(a[n], b[n]) for n in a)
        for a, b in zip(spy.weights, spy.weights[1:], strict=False)
    ]
    assert all(moved)  # every step changed the weights


def test_student_scores_take_back_a_trainers_rounding() -> None:
    """A trainer's rounded normaliser shifts a whole row: a top-K mass over 1 (which the
    divergence refuses) is shifted back; a row within 1 is untouched; an overshoot beyond
    rounding is an error."""
    teacher = np.log(np.array([[0.7, 0.2]]))
    exact = np.log(np.array([[0.8, 0.2 - 1e-9, 1e-9]]))  # top-2, then y_t outside them
    prompt = [1, 2, 3]
    rows = np.vstack([np.zeros((2, 3)), exact])  # two prompt rows, then the response row
    untouched = datums.student_scores(rows, len(prompt), k=2)
    assert untouched.at_teacher_ids is not None
    np.testing.assert_array_equal(untouched.at_teacher_ids, exact[:, :2])
    np.testing.assert_array_equal(untouched.sampled, exact[:, 2])
    with pytest.raises(ValueError, match="top-K mass"):
        divergence.gjs(exact[:, :2] + 3e-6, teacher, 0.5)  # what the shift avoids
    for shift in (3e-6, 5e-5):
        student = datums.student_scores(rows + shift, len(prompt), k=2)
        assert student.at_teacher_ids is not None
        assert np.logaddexp.reduce(student.at_teacher_ids, axis=1).max() <= 1e-12
        np.testing.assert_allclose(student.at_teacher_ids, exact[:, :2], rtol=0, atol=1e-8)
        np.testing.assert_allclose(student.sampled, exact[:, 2], rtol=0, atol=1e-8)
        divergence.gjs(student.at_teacher_ids, teacher, 0.5)  # accepted
    with pytest.raises(ValueError, match="full-vocabulary"):
        datums.student_scores(rows + 1e-3, len(prompt), k=2)
    sampled = datums.student_scores(np.array([0.0, 0.0, 2e-6, -0.5]), len(prompt), k=None)
    np.testing.assert_array_equal(sampled.sampled, [0.0, -0.5])
    assert sampled.at_teacher_ids is None


def test_scalar_mode_trains_with_importance_sampling_advantages(harness: Harness) -> None:
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    config = TrainingConfig(use_topk_divergence=False, steps_per_batch=2, learning_rate=1e-2)
    result = harness.distill(samples, config)
    assert result.divergence_mode == "scalar_kl"
    assert result.metrics["divergence_mode"] == "scalar_kl"
    assert "gjs_mean" not in result.metrics
    assert 1.0 <= metric(result, "adv_gain") <= 4.0
    assert result.steps[0].adv_abs_mean is not None and result.steps[0].adv_abs_mean > 0


def test_failure_mid_request_leaves_no_trace(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    before_version = harness.store.latest_version(LORA)
    before_files = harness.checkpoint_files()

    def broken_save(*args: Any, **kwargs: Any) -> Any:  # injected failure after save_state
        raise OSError("disk full (injected)")

    monkeypatch.setattr(LocalTrainingClient, "save_weights_for_sampler", broken_save)
    with pytest.raises(OSError, match="injected"):
        harness.distill(samples, TrainingConfig(steps_per_batch=1))
    assert harness.store.latest_version(LORA) == before_version
    assert [v.version for v in harness.store.list_versions(LORA)] == [1]
    harness.service.host.submit(lambda: None).result()  # let queued cleanup finish
    assert harness.checkpoint_files() == before_files
    staging = [p for p in (harness.root / "checkpoints").rglob(".*")]
    assert staging == []


def test_validation_errors(harness: Harness) -> None:
    good = harness.sample_for("Tell me about the sea.", seed=1)
    config = TrainingConfig(steps_per_batch=1)

    def distill(samples: list[FeedbackSample]) -> Any:
        return harness.distill(samples, config)

    with pytest.raises(InvalidFeedback, match="one request trains one adapter"):
        distill([good, good.model_copy(update={"lora_id": "bob/other"})])
    with pytest.raises(InvalidFeedback, match="must align"):
        distill([good.model_copy(update={"behavior_logprobs": good.behavior_logprobs[:-1]})])
    with pytest.raises(InvalidFeedback, match="response is empty"):
        distill([good.model_copy(update={"response_tokens": [], "behavior_logprobs": []})])
    with pytest.raises(InvalidFeedback, match="finite"):
        distill([good.model_copy(update={"behavior_logprobs": [float("nan")] * 12})])
    long_turns = [{"role": "user", "content": "word " * 2500}, *good.messages]
    with pytest.raises(ContextTooLong, match="never truncated"):
        distill([good.model_copy(update={"messages": long_turns})])
    with pytest.raises(InvalidFeedback, match="no user turn"):
        distill([good.model_copy(update={"messages": [{"role": "system", "content": "x"}]})])
    with pytest.raises(ValidationError, match="feedback is empty"):
        FeedbackSample.model_validate({**good.model_dump(), "feedback": " "})
    for field, value in [("alpha", 1.5), ("teacher_top_k", 0), ("steps_per_batch", 65)]:
        with pytest.raises(ValidationError, match=field):
            TrainingConfig.model_validate({field: value})
    with pytest.raises(ValidationError, match="extra"):
        TrainingConfig.model_validate({"beta": 0.5})
    with pytest.raises(ValidationError, match="need the top-K divergence"):
        TrainingConfig(teacher_demonstrations=1, use_topk_divergence=False)
    with pytest.raises(ValidationError, match="teacher"):
        TrainingConfig.model_validate({"teacher": "gpt-4"})
    assert [v.version for v in harness.store.list_versions(LORA)] == [1]


def test_rollback_during_training_discards_the_result(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    perturb_latest(harness)  # versions 1, 2
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    before_files = harness.checkpoint_files()
    real_save = LocalTrainingClient.save_state

    def save_then_rollback(client: LocalTrainingClient, *args: Any, **kwargs: Any) -> Any:
        harness.store.rollback(LORA, 1)  # the user rolls back while the step is saving
        return real_save(client, *args, **kwargs)

    monkeypatch.setattr(LocalTrainingClient, "save_state", save_then_rollback)
    with pytest.raises(Conflict, match="changed while this request trained"):
        harness.distill(samples, TrainingConfig(steps_per_batch=1))
    assert harness.store.get_adapter(LORA).current_version == 1  # the rollback stands
    assert [v.version for v in harness.store.list_versions(LORA)] == [1, 2]
    harness.service.host.submit(lambda: None).result()
    assert harness.checkpoint_files() == before_files


def test_text_prompt_rollouts_get_a_raw_teacher_prompt(harness: Harness) -> None:
    prompt_text = "The capital of France is"
    prompt = [int(t) for t in harness.tokenizer.encode(prompt_text)]
    version = harness.store.latest_version(LORA)
    assert version is not None
    sampler = harness.service.create_sampling_client(model_path=version.sampler_path).result()
    out = sampler.sample(
        types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=6, seed=0)
    ).result()
    sample = FeedbackSample(
        lora_id=LORA,
        messages=[{"role": "user", "content": prompt_text}],
        prompt_tokens=prompt,
        response_tokens=out.sequences[0].tokens,
        behavior_logprobs=list(out.sequences[0].logprobs or []),
        feedback="Answer with one word.",
        prompt_format="text",
    )
    result = harness.distill([sample], TrainingConfig(steps_per_batch=1))
    teacher_text = result.teacher_texts[0]
    assert teacher_text.startswith(prompt_text + "\n\n(Instruction for your answer: Answer with")
    assert "<|im_start|>" not in teacher_text


def test_an_example_goes_into_the_teachers_prompt_only(harness: Harness) -> None:
    """`example` is shown to the teacher after the feedback, in both hindsight styles; the
    student's prompt and the response it trains on are its own."""
    example = "I'm Kuro, your assistant."
    sample = harness.sample_for("Who are you?", max_tokens=6).model_copy(
        update={"feedback": "Your name is Kuro.", "example": example}
    )
    for style in ("instruction", "context"):
        config = TrainingConfig(steps_per_batch=1, hindsight=style)
        teacher = harness.distill([sample], config).teacher_texts[0]
        feedback_at, example_at = teacher.index("Your name is Kuro."), teacher.index(example)
        assert feedback_at < teacher.index(EXAMPLE_INTRO) < example_at
        assert teacher.index(EXAMPLE_OUTRO) > example_at
        assert teacher.endswith(harness.tokenizer.decode(sample.response_tokens))
        plain = sample.model_copy(update={"example": None})
        assert EXAMPLE_INTRO not in harness.distill([plain], config).teacher_texts[0]
    with pytest.raises(ValidationError, match="example is empty"):
        FeedbackSample.model_validate({**sample.model_dump(), "example": " \n "})


def test_the_default_learning_rate_follows_the_hidden_size() -> None:
    """Calibrated at SmolLM2-135M (H=576, 1e-4), falling with size as Tinker's LoRA rule does."""
    assert default_learning_rate(576, "llama") == pytest.approx(1e-4, rel=0.02)
    sizes = (576, 960, 2048, 3072, 4096, 8192)
    rates = [default_learning_rate(size, "llama") for size in sizes]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)
    assert default_learning_rate(4096, "llama") == pytest.approx(2.17e-5, rel=0.02)
    assert default_learning_rate(64, "llama") == default_learning_rate(576, "llama")
    assert default_learning_rate(None) == default_learning_rate(4096, "llama")
    # Qwen's exponent is flatter: a larger rate than a Llama of the same width
    assert default_learning_rate(4096, "qwen3") == pytest.approx(3.59e-5, rel=0.02)


def test_fresh_answers_fill_the_batch_from_the_version_trained_seeded(harness: Harness) -> None:
    """samples_per_request: the version trained from answers the batch's prompts again (at the
    config's temperature, seeded by version and place), each trained with the same feedback; a
    replayed lesson gets its own answer, with its own feedback in its teacher prompt, and its
    text is not reported with the batch's (it belongs to the memory); a lesson whose teacher
    prompt cannot fit is left out, not the user's batch."""
    sample = harness.sample_for("Tell me about the sea.", max_tokens=8, seed=1)

    def lesson(content: str) -> Lesson:
        messages = [{"role": "user", "content": content}]
        return Lesson(
            lora_id=LORA,
            messages=messages,
            prompt_tokens=chat_prompt_tokens(harness.tokenizer, messages),
            feedback="Your name is Kuro.",
        )

    words = harness.engine.max_context
    while len((too_long := lesson("sea " * words)).prompt_tokens) > harness.engine.max_context - 4:
        words -= len(too_long.prompt_tokens) - (harness.engine.max_context - 4)
    # the student's prompt fits (4 tokens to spare), its teacher's (with the feedback) does not
    config = TrainingConfig(steps_per_batch=1, samples_per_request=3, sample_temperature=1.0)
    current = harness.store.latest_version(LORA)
    assert current is not None
    start = TrainFrom(
        version=current.version, state_path=current.state_path, sampler_path=current.sampler_path
    )
    replay = [lesson("Who are you?"), too_long]
    first = harness.run(harness.engine.distill([sample], config, start, replay))
    again = harness.run(harness.engine.distill([sample], config, start, replay))
    assert first.teacher_texts == again.teacher_texts  # seeded: the same answers
    metrics = first.metrics
    assert (metrics["rollouts"], metrics["fresh_samples"], metrics["replayed"]) == (1, 2, 1)
    assert metrics["samples"] == 4 and metrics["extra_dropped"] == 1
    texts = first.teacher_texts
    assert len(texts) == 3 and all("Tell me about the sea." in t and FEEDBACK in t for t in texts)
    assert len(set(texts)) == 3  # three different answers to the one prompt
    (replayed,) = first.replayed_texts
    assert "Who are you?" in replayed and "Your name is Kuro." in replayed
    assert FEEDBACK not in replayed  # the lesson keeps its own feedback
    cooler = TrainingConfig(steps_per_batch=1, samples_per_request=3, sample_temperature=0.0)
    greedy = harness.run(harness.engine.distill([sample], cooler, start)).teacher_texts
    assert greedy[1] == greedy[2] != texts[1]  # the temperature reaches the sampler
    alone = harness.distill([sample], TrainingConfig(steps_per_batch=1))
    assert "sampling" not in alone.timings and alone.metrics["fresh_samples"] == 0


def test_a_self_example_is_the_teachers_greedy_answer_under_the_feedback(harness: Harness) -> None:
    """The teacher answers greedily under the feedback, and that answer is shown to it as the
    example; a blank answer (the tiny model's newlines) is no example."""
    sample = harness.sample_for("Who are you?", max_tokens=6)
    config = TrainingConfig(steps_per_batch=1, self_example=True)
    blank = harness.distill([sample], config)  # the unperturbed tiny model says "\n" * 6
    assert EXAMPLE_INTRO not in blank.teacher_texts[0] and "self_example" in blank.timings
    perturb_latest(harness, scale=0.5)
    trained = harness.distill([sample], config)
    teacher = trained.teacher_texts[0]
    assert teacher.index(FEEDBACK) < teacher.index(EXAMPLE_INTRO) < teacher.index(EXAMPLE_OUTRO)
    shown = teacher[
        teacher.index(EXAMPLE_INTRO) + len(EXAMPLE_INTRO) : teacher.index(EXAMPLE_OUTRO)
    ]
    prompt = rollout_teacher_prompt_tokens(harness.tokenizer, sample.messages, "chat", FEEDBACK)
    version = harness.store.get_version(LORA, harness.version - 1)  # the version trained from
    sampler = harness.service.create_sampling_client(model_path=version.sampler_path).result()
    params = types.SamplingParams(max_tokens=len(sample.response_tokens), temperature=0.0)
    greedy = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    assert (
        shown.strip() == harness.tokenizer.decode(greedy.tokens, skip_special_tokens=True).strip()
    )
    given = sample.model_copy(update={"example": "I'm Kuro."})
    kept = harness.distill([given], config).teacher_texts[0]
    assert "I'm Kuro." in kept  # the user's example wins
