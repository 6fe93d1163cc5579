"""The SDPO engine: one feedback batch in, one better adapter version out.

SDPO (self-distillation policy optimisation; Hübotter et al. 2026, "Reinforcement Learning via
Self-Distillation", arXiv:2601.20802; Kleine Buening et al. 2026, "Aligning Language Models from
User Interactions") needs no labels and no reward model. The **teacher** is the adapter's
version being trained from (or, with `teacher="base"`, the frozen base model) shown the
student's conversation with the user's feedback appended to the last user turn
(`claas.sdpo.prompts.teacher_prompt_tokens`); it scores the *same* response tokens the student
produced. Because the teacher is the adapter itself, it already carries the earlier feedback, and
a new preference is taught on top of the old ones instead of pulling the adapter back to the
base. The **student** is the user's LoRA adapter, and it moves its token distribution toward
the teacher's by minimising, per response position, a generalised Jensen-Shannon divergence over
the teacher's top-K tokens plus a tail bucket (`claas.sdpo.divergence`).

The engine is written once against the Tinker client API and runs unchanged on the local service
(`claas.services.local`) and on hosted Tinker. One request:

1. validates the samples (one adapter, aligned lengths, a non-empty response, a teacher prompt
   that fits the context);
2. fills the batch up to `samples_per_request` with fresh answers of the version trained from
   to the same prompts, and answers each replayed lesson (an earlier feedback from the adapter's
   memory, `claas.feedback`) the same way, with its own feedback in its teacher prompt; with
   `self_example`, the teacher's greedy answer under the feedback becomes each sample's example;
3. adds `teacher_demonstrations` greedy answers of the teacher to the batch, then scores
   teacher prompt + unchanged response on the teacher once: in top-K mode one
   `sample(max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=K)`, in scalar mode
   `compute_logprobs`; with `kl_reg_weight > 0` also the student prompt on the base;
4. runs `steps_per_batch` steps, each one `forward_backward_custom` with `SDPOLoss` and an
   `optim_step`, pipelined: the loss reads the *current* student's log-probs at the teacher's ids
   and at each sampled token from the step's own forward, and turns them into the loss terms of
   `claas.sdpo.datums` (on the local service the scores cost no pass of their own);
5. saves state (with optimizer) and sampler weights, written while the final scoring runs, and
   returns them as a `TrainedCheckpoint`;
   the feedback queue registers it as the adapter's next version (`claas.feedback`).

The divergence-specific parts (what is scored, the loss terms, the datum) are the strategies of
`claas.sdpo.strategies`; the engine never touches the database. This module holds the request's
order of phases; the phases are their own modules: `claas.sdpo.samples` (1: validation, teacher
prompts), `claas.sdpo.answers` (2-3: the answers added to the batch) and `claas.sdpo.step`
(3-4: scoring, the loss, the step and its metrics).

    engine = SDPOEngine(service, base_model="SmolLM2-135M-Instruct", max_context=8192)
    trained = await engine.distill(samples, TrainingConfig(), start=TrainFrom(...))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from transformers import PreTrainedTokenizerBase

from claas.sdpo.answers import demonstrations, fresh_samples, self_examples
from claas.sdpo.config import (
    FeedbackSample,
    Lesson,
    StepMetrics,
    TrainedCheckpoint,
    TrainFrom,
    TrainingConfig,
    default_learning_rate,
)
from claas.sdpo.samples import prepare, prepare_extra, validate_samples
from claas.sdpo.step import loss_terms, request_metrics, score, score_student, train_step
from claas.sdpo.strategies import Prepared, ScalarKL, Strategy, TeacherT, TopKGJS
from claas.services.protocol import SamplingClient, ServiceClient, delete_checkpoints


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the time the block takes to `timings[phase]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


class SDPOEngine:
    """Turns feedback batches into trained adapter checkpoints, on any Tinker-style service."""

    def __init__(
        self,
        service: ServiceClient,
        base_model: str,
        max_context: int,
        hidden_size: int | None = None,
        model_type: str | None = None,
    ) -> None:
        self.service = service
        self.base_model = base_model
        self.max_context = max_context
        self.learning_rate = default_learning_rate(hidden_size, model_type)
        self._base_sampler: SamplingClient | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def learning_rate_for(self, config: TrainingConfig) -> float:
        return config.learning_rate if config.learning_rate is not None else self.learning_rate

    async def base_sampler(self) -> SamplingClient:
        if self._base_sampler is None:
            self._base_sampler = await self.service.create_sampling_client(
                base_model=self.base_model
            )
            self._tokenizer = self._base_sampler.get_tokenizer()
        return self._base_sampler

    async def tokenizer(self) -> PreTrainedTokenizerBase:
        await self.base_sampler()
        assert self._tokenizer is not None  # set with the base sampler
        return self._tokenizer

    # -- the request ------------------------------------------------------------------------
    async def distill(
        self,
        samples: Sequence[FeedbackSample],
        config: TrainingConfig,
        start: TrainFrom,
        replay: Sequence[Lesson] = (),
        before_step: Callable[[int], Awaitable[None]] | None = None,
    ) -> TrainedCheckpoint:
        """Train the adapter version `start` on one feedback batch, and on fresh answers to
        `replay`'s earlier lessons; return the new checkpoint. `before_step(step)` is awaited
        before each optimiser step: what it raises stops the training there."""
        if config.use_topk_divergence:
            return await self._distill(TopKGJS(config), samples, config, start, replay, before_step)
        return await self._distill(ScalarKL(config), samples, config, start, replay, before_step)

    async def _distill(
        self,
        strategy: Strategy[TeacherT],
        samples: Sequence[FeedbackSample],
        config: TrainingConfig,
        start: TrainFrom,
        replay: Sequence[Lesson],
        before_step: Callable[[int], Awaitable[None]] | None,
    ) -> TrainedCheckpoint:
        timings: dict[str, float] = {}
        with timed(timings, "validate"):
            # The user's samples now; the batch, fresh answers included, is checked below.
            validate_samples(samples, self.max_context)
            base = await self.base_sampler()
            tokenizer = await self.tokenizer()
        fresh: list[FeedbackSample | None] = []
        replayed: list[FeedbackSample | None] = []
        wants_answers = bool(replay) or config.samples_per_request > len(samples)
        student: SamplingClient | None = None
        if config.teacher == "adapter" or wants_answers:  # the version trained from
            student = await self.service.create_sampling_client(model_path=start.sampler_path)
        teacher = student if config.teacher == "adapter" and student is not None else base
        if wants_answers:
            assert student is not None
            with timed(timings, "sampling"):
                fresh, replayed = await fresh_samples(
                    student, tokenizer, samples, replay, config, start, self.max_context
                )
        drawn: tuple[list[FeedbackSample], list[FeedbackSample]] = (
            [s for s in fresh if s is not None],
            [s for s in replayed if s is not None],
        )
        batch = [*samples, *drawn[0], *drawn[1]]
        if config.self_example:
            with timed(timings, "self_example"):
                batch = await self_examples(teacher, tokenizer, batch, config, self.max_context)
        with timed(timings, "validate"):
            # The user's own answers must fit (they were checked at admission); an answer the
            # engine added (fresh, replayed) that does not is dropped instead of failing them.
            own = len(samples)
            prepared = await self.check(batch[:own], config)
            extras = await asyncio.to_thread(
                lambda: [prepare_extra(tokenizer, s, config, self.max_context) for s in batch[own:]]
            )
            fresh_kept = [p for p in extras[: len(drawn[0])] if p is not None]
            replayed_kept = [p for p in extras[len(drawn[0]) :] if p is not None]
            # asked for, less kept: not sampled (no room, only a stop token) or not preparable
            dropped = len(fresh) + len(replayed) - len(fresh_kept) - len(replayed_kept)
            prepared += fresh_kept
            replay_at = len(prepared)  # the replayed lessons' texts are not reported
            prepared += replayed_kept
        with timed(timings, "demonstrations"):
            prepared += await demonstrations(teacher, prepared, config, self.max_context)
        with timed(timings, "teacher_scoring"):
            scored = await score(strategy, teacher, base, prepared, config)
        with timed(timings, "load_adapter"):
            trainer = await self.service.create_training_client_from_state_with_optimizer(
                start.state_path
            )
        writes: list[Awaitable[Any]] = []
        data = [strategy.targets(s) for s in scored]  # the student's log-probs each step needs
        try:
            steps = []
            rate = self.learning_rate_for(config)
            for step in range(config.steps_per_batch):
                if before_step is not None:
                    await before_step(step)
                with timed(timings, "train"):
                    steps.append(
                        await train_step(strategy, trainer, scored, data, config, step, rate)
                    )
            # The trained weights are final: their checkpoints are written while the final
            # scoring runs (the local service writes them off its worker thread).
            name = f"v{start.version + 1}-{int(time.time())}"
            writes.append(trainer.save_state(name))
            writes.append(trainer.save_weights_for_sampler(name))
            with timed(timings, "final_scoring"):
                final = await score_student(strategy, trainer, scored, data)
                after = loss_terms(strategy, scored, final)
            with timed(timings, "save"):  # what is left of the writing
                state, sampler = await asyncio.gather(*writes, return_exceptions=True)
                if isinstance(state, BaseException):
                    raise state
                if isinstance(sampler, BaseException):
                    raise sampler
        except BaseException:
            if writes:  # no half-made checkpoint remains
                results = await asyncio.gather(*writes, return_exceptions=True)
                written = [r.path for r in results if not isinstance(r, BaseException)]
                await delete_checkpoints(self.service, written)
            raise
        return TrainedCheckpoint(
            lora_id=samples[0].lora_id,
            trained_from=start.version,
            state_path=state.path,
            sampler_path=sampler.path,
            divergence_mode=strategy.mode,
            metrics={
                **request_metrics(scored, steps, after, config, rate),
                "rollouts": len(samples),
                "fresh_samples": len(fresh_kept),
                "replayed": len(replayed_kept),
                "extra_dropped": dropped,
            },
            steps=steps,
            teacher_texts=[
                tokenizer.decode(p.teacher_prompt + p.response)
                for p in prepared[:replay_at] + prepared[replay_at + len(replayed_kept) :]
            ],
            replayed_texts=[tokenizer.decode(p.teacher_prompt + p.response) for p in replayed_kept],
            timings=timings,
        )

    async def check(
        self, samples: Sequence[FeedbackSample], config: TrainingConfig
    ) -> list[Prepared]:
        """Everything that can be refused before any model work: raises a domain error."""
        tokenizer = await self.tokenizer()
        validate_samples(samples, self.max_context)
        # Teacher prompts are tokenised off the event loop: a long conversation takes a while.
        return await asyncio.to_thread(
            lambda: [prepare(tokenizer, s, config, self.max_context) for s in samples]
        )


__all__ = [
    "FeedbackSample",
    "SDPOEngine",
    "StepMetrics",
    "TrainFrom",
    "TrainedCheckpoint",
    "TrainingConfig",
    "timed",
]
