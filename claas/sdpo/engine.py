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
5. saves state (with optimizer) and sampler weights, and returns them as a `TrainedCheckpoint`;
   the feedback queue registers it as the adapter's next version (`claas.feedback`).

The divergence-specific parts (what is scored, the loss terms, the datum) are the strategies of
`claas.sdpo.strategies`; the engine never touches the database.

    engine = SDPOEngine(service, base_model="SmolLM2-135M-Instruct", max_context=8192)
    trained = await engine.distill(samples, TrainingConfig(), start=TrainFrom(...))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic

import numpy as np
import torch
from tinker import types
from transformers import PreTrainedTokenizerBase

from claas.errors import ContextTooLong, InvalidFeedback
from claas.ids import validate_lora_id
from claas.sdpo import datums
from claas.sdpo.config import (
    FEEDBACK_MAX_CHARS,
    FeedbackSample,
    Lesson,
    StepMetrics,
    TrainedCheckpoint,
    TrainFrom,
    TrainingConfig,
    default_learning_rate,
    lesson_key,
)
from claas.sdpo.divergence import LOGPROB_ROUNDING_TOL
from claas.sdpo.prompts import rollout_teacher_prompt_tokens
from claas.sdpo.strategies import (
    Prepared,
    ScalarKL,
    Scored,
    Strategy,
    TeacherT,
    TopKGJS,
    rollout_statistics,
    sample_statistics,
)
from claas.services.protocol import (
    SamplingClient,
    ServiceClient,
    TrainingClient,
    delete_checkpoints,
)


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the time the block takes to `timings[phase]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


def loss_terms(
    strategy: Strategy[TeacherT],
    scored: Sequence[Scored[TeacherT]],
    student: Sequence[datums.StudentScores],
) -> list[tuple[datums.LossTerms, float | None]]:
    """Per sample: the loss terms at the current student (and the scalar-mode gain), scaled by
    1 / (B·T): a token mean, then a sample mean."""
    batch = len(scored)
    return [
        strategy.terms(s, st, 1.0 / (batch * len(s.prepared.response)))
        for s, st in zip(scored, student, strict=True)
    ]


class SDPOLoss(Generic[TeacherT]):
    """One step's SDPO loss as a Tinker custom loss (`forward_backward_custom`).

    It is called with each datum's log-probs at its targets, from the forward of the step's own
    pass: the local service calls it inside its one forward/backward; hosted Tinker's SDK calls it
    between a forward and a backward. It computes the loss terms there (numpy float64,
    `claas.sdpo.divergence`), keeps them for the step's metrics, and returns a tensor whose value
    is the loss and whose gradient with respect to the log-probs is −weights, the strategy's
    `cross_entropy` weights: the gradient of the loss, importance ratios and gain held constant.
    """

    def __init__(self, strategy: Strategy[TeacherT], scored: Sequence[Scored[TeacherT]]) -> None:
        self.strategy: Strategy[TeacherT] = strategy
        self.scored: Sequence[Scored[TeacherT]] = scored
        self.terms: list[tuple[datums.LossTerms, float | None]] | None = None

    def __call__(
        self, data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        student = [
            self.strategy.student(s, lp.detach().cpu().numpy())
            for s, lp in zip(self.scored, logprobs, strict=True)
        ]
        self.terms = loss_terms(self.strategy, self.scored, student)
        surrogate = torch.stack(
            [
                -(lp * torch.from_numpy(self.strategy.weights(s, terms)).to(lp)).sum()
                for s, lp, (terms, _) in zip(self.scored, logprobs, self.terms, strict=True)
            ]
        ).sum()
        value = sum(terms.loss for terms, _ in self.terms)
        return surrogate - surrogate.detach() + value, {}


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
    ) -> TrainedCheckpoint:
        """Train the adapter version `start` on one feedback batch, and on fresh answers to
        `replay`'s earlier lessons; return the new checkpoint."""
        if config.use_topk_divergence:
            return await self._distill(TopKGJS(config), samples, config, start, replay)
        return await self._distill(ScalarKL(config), samples, config, start, replay)

    async def _distill(
        self,
        strategy: Strategy[TeacherT],
        samples: Sequence[FeedbackSample],
        config: TrainingConfig,
        start: TrainFrom,
        replay: Sequence[Lesson],
    ) -> TrainedCheckpoint:
        timings: dict[str, float] = {}
        with timed(timings, "validate"):
            self._validate(samples)  # the batch, fresh answers included, is checked below
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
                fresh, replayed = await self._fresh_samples(
                    student, tokenizer, samples, replay, config, start
                )
        drawn: tuple[list[FeedbackSample], list[FeedbackSample]] = (
            [s for s in fresh if s is not None],
            [s for s in replayed if s is not None],
        )
        batch = [*samples, *drawn[0], *drawn[1]]
        if config.self_example:
            with timed(timings, "self_example"):
                batch = await self._self_examples(teacher, tokenizer, batch, config)
        with timed(timings, "validate"):
            # The user's own answers must fit (they were checked at admission); an answer the
            # engine added (fresh, replayed) that does not is dropped instead of failing them.
            own = len(samples)
            prepared = await self.check(batch[:own], config)
            extras = await asyncio.to_thread(
                lambda: [self._prepare_extra(tokenizer, s, config) for s in batch[own:]]
            )
            fresh_kept = [p for p in extras[: len(drawn[0])] if p is not None]
            replayed_kept = [p for p in extras[len(drawn[0]) :] if p is not None]
            # asked for, less kept: not sampled (no room, only a stop token) or not preparable
            dropped = len(fresh) + len(replayed) - len(fresh_kept) - len(replayed_kept)
            prepared += fresh_kept
            replay_at = len(prepared)  # the replayed lessons' texts are not reported
            prepared += replayed_kept
        with timed(timings, "demonstrations"):
            prepared += await self._demonstrations(teacher, prepared, config)
        with timed(timings, "teacher_scoring"):
            scored = await self._score(strategy, teacher, base, prepared, config)
        with timed(timings, "load_adapter"):
            trainer = await self.service.create_training_client_from_state_with_optimizer(
                start.state_path
            )
        saved: list[str] = []
        data = [strategy.targets(s) for s in scored]  # the student's log-probs each step needs
        try:
            steps = []
            for step in range(config.steps_per_batch):
                with timed(timings, "train"):
                    steps.append(await self._step(strategy, trainer, scored, data, config, step))
            with timed(timings, "final_scoring"):
                final = await self._score_student(strategy, trainer, scored, data)
                after = loss_terms(strategy, scored, final)
            with timed(timings, "save"):
                name = f"v{start.version + 1}-{int(time.time())}"
                state = await trainer.save_state(name)
                saved.append(state.path)
                sampler = await trainer.save_weights_for_sampler(name)
                saved.append(sampler.path)
        except BaseException:
            await delete_checkpoints(self.service, saved)  # no half-made checkpoint remains
            raise
        return TrainedCheckpoint(
            lora_id=samples[0].lora_id,
            trained_from=start.version,
            state_path=state.path,
            sampler_path=sampler.path,
            divergence_mode=strategy.mode,
            metrics={
                **self._request_metrics(scored, steps, after, config),
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
        self._validate(samples)
        # Teacher prompts are tokenised off the event loop: a long conversation takes a while.
        return await asyncio.to_thread(
            lambda: [self._prepare(tokenizer, s, config) for s in samples]
        )

    # -- phases -----------------------------------------------------------------------------
    def _validate(self, samples: Sequence[FeedbackSample]) -> str:
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
            if len(sample.prompt_tokens) + len(sample.response_tokens) >= self.max_context:
                raise ContextTooLong(
                    f"{where}: prompt + response exceed the model's context of "
                    f"{self.max_context} tokens"
                )
        return lora_id

    def _prepare(
        self, tokenizer: PreTrainedTokenizerBase, sample: FeedbackSample, config: TrainingConfig
    ) -> Prepared:
        try:
            teacher_prompt = _teacher_prompt(tokenizer, sample, config)
        except (ValueError, KeyError) as error:
            raise InvalidFeedback(f"cannot build the teacher prompt: {error}") from error
        total = len(teacher_prompt) + len(sample.response_tokens)
        if total >= self.max_context:  # scoring needs room for one sampled token
            raise ContextTooLong(
                f"the teacher prompt (conversation + hindsight feedback) plus the response is "
                f"{total} tokens, over the model's context of {self.max_context}; shorten the "
                "conversation or the feedback (the response is never truncated)"
            )
        return Prepared(
            sample=sample,
            teacher_prompt=teacher_prompt,
            behavior=np.asarray(sample.behavior_logprobs, dtype=np.float64),
        )

    def _prepare_extra(
        self, tokenizer: PreTrainedTokenizerBase, sample: FeedbackSample, config: TrainingConfig
    ) -> Prepared | None:
        """`_prepare` for an answer the engine added: None if it cannot be trained on (its
        teacher prompt does not fit, say), so that it is left out, not the user's batch."""
        try:
            self._validate([sample])
            return self._prepare(tokenizer, sample, config)
        except (InvalidFeedback, ContextTooLong):
            return None

    async def _fresh_samples(
        self,
        student: SamplingClient,
        tokenizer: PreTrainedTokenizerBase,
        samples: Sequence[FeedbackSample],
        replay: Sequence[Lesson],
        config: TrainingConfig,
        start: TrainFrom,
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
            lambda: [self._teacher_length(tokenizer, lesson, config) for lesson in lessons]
        )
        calls: list[Awaitable[types.SampleResponse | None]] = []
        for index, (lesson, teacher_length) in enumerate(
            zip(lessons, teacher_prompts, strict=True)
        ):
            # Room for the answer after the longer prompt: the teacher scores it after its own.
            room = self.max_context - max(len(lesson.prompt_tokens), teacher_length) - 1
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

    def _teacher_length(
        self, tokenizer: PreTrainedTokenizerBase, lesson: Lesson, config: TrainingConfig
    ) -> int:
        """How long the lesson's teacher prompt is (the context when it cannot be built, so
        that the lesson gets no room and is dropped)."""
        try:
            return len(_teacher_prompt(tokenizer, lesson, config))
        except (ValueError, KeyError):
            return self.max_context

    async def _self_examples(
        self,
        teacher: SamplingClient,
        tokenizer: PreTrainedTokenizerBase,
        batch: Sequence[FeedbackSample],
        config: TrainingConfig,
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
            prompt = await asyncio.to_thread(_teacher_prompt, tokenizer, sample, config)
            room = self.max_context - len(prompt) - 1
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
            fits = self._teacher_length(tokenizer, shown, config) + len(sample.response_tokens)
            return shown if fits < self.max_context else sample  # never at the batch's cost

        return await asyncio.to_thread(lambda: [with_example(s) for s in batch])

    async def _demonstrations(
        self, teacher: SamplingClient, prepared: list[Prepared], config: TrainingConfig
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
            room = self.max_context - max(len(p.teacher_prompt), len(p.prompt)) - 1
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

    async def _score(
        self,
        strategy: Strategy[TeacherT],
        teacher: SamplingClient,
        base: SamplingClient,
        prepared: list[Prepared],
        config: TrainingConfig,
    ) -> list[Scored[TeacherT]]:
        """The teacher's view of every sample, and (for k3) the base model's of each rollout."""

        async def base_sampled(p: Prepared) -> datums.F64 | None:
            # k3 estimates KL(student ‖ base) on student samples only: not on demonstrations.
            if config.kl_reg_weight == 0 or p.demonstration:
                return None
            values = await base.compute_logprobs(
                types.ModelInput.from_ints(p.prompt + p.response),
                prompt_logprobs_last_n=len(p.response),
            )
            return datums.response_logprobs(values, len(p.prompt), len(p.response))

        views, bases = await asyncio.gather(
            asyncio.gather(*(strategy.score_teacher(teacher, p) for p in prepared)),
            asyncio.gather(*(base_sampled(p) for p in prepared)),
        )
        return [
            Scored(prepared=p, teacher=view, base_sampled=base_view)
            for p, view, base_view in zip(prepared, views, bases, strict=True)
        ]

    async def _score_student(
        self,
        strategy: Strategy[TeacherT],
        trainer: TrainingClient,
        scored: list[Scored[TeacherT]],
        data: list[types.Datum],
    ) -> list[datums.StudentScores]:
        """The current student's exact log-probs at every sample's targets: one forward."""
        out = await trainer.forward(data, "cross_entropy")
        return [
            strategy.student(s, output["logprobs"].to_numpy())
            for s, output in zip(scored, out.loss_fn_outputs, strict=True)
        ]

    async def _step(
        self,
        strategy: Strategy[TeacherT],
        trainer: TrainingClient,
        scored: list[Scored[TeacherT]],
        data: list[types.Datum],
        config: TrainingConfig,
        step: int,
    ) -> StepMetrics:
        clock = time.perf_counter()
        loss = SDPOLoss(strategy, scored)
        adam = types.AdamParams(
            learning_rate=self.learning_rate_for(config), grad_clip_norm=config.max_grad_norm
        )
        forward_backward = trainer.forward_backward_custom(data, loss)  # pipelined
        optim_step = trainer.optim_step(adam)
        await forward_backward
        optim = await optim_step
        if loss.terms is None:
            raise RuntimeError("forward_backward_custom returned without calling the SDPO loss")
        terms = loss.terms
        metrics = optim.metrics or {}
        summary = rollout_statistics([s.prepared for s in scored], [t for t, _ in terms])
        return StepMetrics(
            step=step + 1,
            loss=summary["loss"],
            divergence_mean=summary["divergence_mean"],
            mean_is_ratio=summary["mean_is_ratio"],
            clip_fraction=summary["clip_fraction"],
            kl_reg_mean=summary["kl_reg_mean"],
            grad_norm=metrics.get("grad_norm"),
            seconds=time.perf_counter() - clock,
            **sample_statistics(terms, config.kl_coef),
        )

    def _request_metrics(
        self,
        scored: list[Scored[TeacherT]],
        steps: list[StepMetrics],
        after: list[tuple[datums.LossTerms, float | None]],
        config: TrainingConfig,
    ) -> dict[str, float | int | str]:
        prepared = [s.prepared for s in scored]
        final = rollout_statistics(prepared, [t for t, _ in after])
        first = steps[0]
        metrics: dict[str, float | int | str] = {
            "divergence_mode": config.divergence_mode,
            "loss": first.loss,
            "loss_after": final["loss"],
            "divergence_mean": first.divergence_mean,
            "divergence_mean_after": final["divergence_mean"],
            "mean_is_ratio": float(np.mean([s.mean_is_ratio for s in steps])),
            "clip_fraction": float(np.mean([s.clip_fraction for s in steps])),
            "tokens": sum(len(p.response) for p in prepared if not p.demonstration),
            "samples": sum(1 for p in prepared if not p.demonstration),
            "demonstrations": sum(1 for p in prepared if p.demonstration),
            "steps_per_batch_applied": len(steps),
            "learning_rate": self.learning_rate_for(config),
        }
        if config.use_topk_divergence:
            metrics["gjs_mean"] = first.divergence_mean
            metrics["gjs_mean_after"] = final["divergence_mean"]
        if "demonstration_kl" in final:
            metrics["demonstration_kl_after"] = final["demonstration_kl"]
        norms = [s.grad_norm for s in steps if s.grad_norm is not None]
        if norms:
            metrics["grad_norm"] = float(np.mean(norms))
        for key in ("adv_mean", "adv_abs_mean", "adv_gain"):
            values = [getattr(s, key) for s in steps if getattr(s, key) is not None]
            if values:
                metrics[key] = float(np.mean(values))
        return metrics


def _teacher_prompt(
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


async def _nothing() -> None:
    """An answer not asked for, in a list of sampling calls."""


def _lesson_key(lesson: Lesson) -> str:
    return lesson_key(lesson.prompt_format, lesson.messages, lesson.feedback)


__all__ = [
    "FeedbackSample",
    "SDPOEngine",
    "StepMetrics",
    "TrainFrom",
    "TrainedCheckpoint",
    "TrainingConfig",
    "timed",
]
