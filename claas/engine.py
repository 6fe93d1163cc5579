"""The SDPO engine: one feedback batch in, one better adapter version out.

SDPO (self-distillation policy optimisation; Hübotter et al. 2026, "Reinforcement Learning via
Self-Distillation", arXiv:2601.20802; Kleine Buening et al. 2026, "Aligning Language Models from
User Interactions") needs no labels and no reward model. The **teacher** is the adapter's
version being trained from (or, with `teacher="base"`, the frozen base model) shown the
student's conversation with the user's feedback appended to the last user turn
(`claas.prompts.teacher_prompt_tokens`); it scores the *same* response tokens the student
produced. Because the teacher is the adapter itself, it already carries the earlier feedback, and
a new preference is taught on top of the old ones instead of pulling the adapter back to the
base. The **student** is the user's LoRA adapter, and it moves its token distribution toward
the teacher's by minimising, per response position, a generalised Jensen-Shannon divergence over
the teacher's top-K tokens plus a tail bucket (`claas.divergence`).

The engine is written once against the Tinker client API and runs unchanged on the local service
(`claas.services.local`) and on hosted Tinker. One request:

1. validates the samples (one adapter, aligned lengths, a non-empty response, a teacher prompt
   that fits the context);
2. adds `teacher_demonstrations` greedy answers of the teacher to the batch, then scores
   teacher prompt + unchanged response on the teacher once: in top-K mode one
   `sample(max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=K)`, in scalar mode
   `compute_logprobs`; with `kl_reg_weight > 0` also the student prompt on the base;
3. runs `steps_per_batch` steps, each on the *current* student: exact log-probs at the teacher's
   ids (`target_prompt_logprobs`) and of each sampled token (`prompt_logprobs`), datums built by
   `claas.datums`, then `forward_backward` and `optim_step` pipelined;
4. saves state (with optimizer) and sampler weights, and only then registers the new version.

    engine = SDPOEngine(service, store, base_model="SmolLM2-135M-Instruct", max_context=8192)
    result = await engine.distill(samples, TrainingConfig(), feedback_id="fb-1")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tinker import types

from claas import datums
from claas.divergence import LOGPROB_ROUNDING_TOL
from claas.errors import ContextTooLong, InvalidFeedback
from claas.prompts import HindsightStyle, rollout_teacher_prompt_tokens
from claas.services import delete_checkpoints
from claas.store import Store, validate_lora_id

DivergenceMode = Literal["topk_gjs", "scalar_kl"]
MAX_FEEDBACK_CHARS = 8000

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

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_topk_divergence: bool = True
    teacher_top_k: int = Field(100, ge=1, le=1000)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="GJS weight of the teacher")
    learning_rate: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="None: scaled to the base model's hidden size (default_learning_rate)",
    )
    steps_per_batch: int = Field(4, ge=1, le=64)
    is_clip: float = Field(5.0, ge=1.0, le=1e4)
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6, description="0 disables clipping")
    kl_reg_weight: float = Field(0.0, ge=0.0, le=1e3)
    kl_coef: float = Field(1.0, gt=0.0, le=1e3, description="scalar_kl mode only")
    feedback_repetitions: int = Field(1, ge=1, le=8)
    hindsight: HindsightStyle = Field(
        "instruction", description="how the feedback is put to the teacher (claas.prompts)"
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


class FeedbackSample(BaseModel):
    """One rollout plus the user's feedback on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_id: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    prompt_tokens: list[int] = Field(min_length=1)
    response_tokens: list[int]
    behavior_logprobs: list[float]
    feedback: str
    prompt_format: Literal["chat", "text"] = Field(
        "chat", description="text: the prompt was raw text (messages[-1] holds it), not chat"
    )

    @field_validator("feedback")
    @classmethod
    def _feedback_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("feedback is empty; say what should change in the answer")
        if len(value) > MAX_FEEDBACK_CHARS:
            raise ValueError(f"feedback is longer than {MAX_FEEDBACK_CHARS} characters")
        return value


class StepMetrics(BaseModel):
    step: int
    loss: float
    divergence_mean: float
    mean_is_ratio: float
    clip_fraction: float
    kl_reg_mean: float
    grad_norm: float | None = None
    adv_mean: float | None = None
    adv_abs_mean: float | None = None
    adv_gain: float | None = None
    seconds: float


class DistillResult(BaseModel):
    lora_id: str
    version: int
    divergence_mode: DivergenceMode
    metrics: dict[str, float | int | str]
    steps: list[StepMetrics]
    teacher_texts: list[str]
    timings: dict[str, float]


@dataclass
class _Prepared:
    """A validated sample with its teacher prompt and, once scored, the teacher's view."""

    sample: FeedbackSample
    teacher_prompt: list[int]
    behavior: np.ndarray
    teacher_topk: datums.TeacherTopK | None = None
    teacher_sampled: np.ndarray | None = None
    base_sampled: np.ndarray | None = None
    demonstration: bool = False  # the teacher's own answer (`_demonstrations`), not a rollout

    @property
    def prompt(self) -> list[int]:
        return self.sample.prompt_tokens

    @property
    def response(self) -> list[int]:
        return self.sample.response_tokens


class SDPOEngine:
    """Turns feedback batches into adapter versions, on any Tinker-style service."""

    def __init__(
        self,
        service: Any,
        store: Store,
        base_model: str,
        max_context: int,
        hidden_size: int | None = None,
        model_type: str | None = None,
    ) -> None:
        self.service = service
        self.store = store
        self.base_model = base_model
        self.max_context = max_context
        self.learning_rate = default_learning_rate(hidden_size, model_type)
        self._base_sampler: Any = None
        self._tokenizer: Any = None

    def learning_rate_for(self, config: TrainingConfig) -> float:
        return config.learning_rate if config.learning_rate is not None else self.learning_rate

    async def base_sampler(self) -> Any:
        if self._base_sampler is None:
            self._base_sampler = await self.service.create_sampling_client(
                base_model=self.base_model
            )
            self._tokenizer = self._base_sampler.get_tokenizer()
        return self._base_sampler

    # -- the request ------------------------------------------------------------------------
    async def distill(
        self,
        samples: Sequence[FeedbackSample],
        config: TrainingConfig,
        feedback_id: str | None = None,
    ) -> DistillResult:
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        prepared = await self.check(samples, config)
        base = await self.base_sampler()
        lora_id = samples[0].lora_id
        adapter = self.store.get_adapter(lora_id)
        current = self.store.latest_version(lora_id)
        if current is None:
            raise InvalidFeedback(f"adapter {lora_id} has no version to train from; re-create it")
        timings["validate"] = time.perf_counter() - clock

        clock = time.perf_counter()
        teacher = base
        if config.teacher == "adapter":  # the version trained from, as a sampler
            teacher = await self.service.create_sampling_client(model_path=current.sampler_path)
        prepared += await self._demonstrations(teacher, prepared, config)
        timings["demonstrations"] = time.perf_counter() - clock

        clock = time.perf_counter()
        await self._score_teacher(teacher, base, prepared, config)
        timings["teacher_scoring"] = time.perf_counter() - clock

        clock = time.perf_counter()
        trainer = await self.service.create_training_client_from_state_with_optimizer(
            current.state_path
        )
        timings["load_adapter"] = time.perf_counter() - clock
        saved: list[str] = []
        try:
            steps, scoring_seconds, train_seconds = [], 0.0, 0.0
            for step in range(config.steps_per_batch):
                clock = time.perf_counter()
                student = await self._score_student(trainer, prepared, config)
                scoring_seconds += time.perf_counter() - clock
                clock = time.perf_counter()
                steps.append(await self._step(trainer, prepared, student, config, step))
                train_seconds += time.perf_counter() - clock
            timings["student_scoring"] = scoring_seconds
            timings["train"] = train_seconds

            clock = time.perf_counter()
            final = await self._score_student(trainer, prepared, config)
            after = self._terms(prepared, final, config)
            timings["final_scoring"] = time.perf_counter() - clock

            clock = time.perf_counter()
            name = f"v{current.version + 1}-{int(time.time())}"
            state = await trainer.save_state(name)
            saved.append(state.path)
            sampler = await trainer.save_weights_for_sampler(name)
            saved.append(sampler.path)
            timings["save"] = time.perf_counter() - clock
            metrics = self._request_metrics(prepared, steps, after, config)
            version = self.store.add_version(
                lora_id,
                state.path,
                sampler.path,
                feedback_id,
                {**metrics, "timings": timings},
                trained_from=adapter,
            )
        except BaseException:
            await delete_checkpoints(self.service, saved)  # no half-made version remains
            raise
        return DistillResult(
            lora_id=lora_id,
            version=version.version,
            divergence_mode=config.divergence_mode,
            metrics=metrics,
            steps=steps,
            teacher_texts=[self._tokenizer.decode(p.teacher_prompt + p.response) for p in prepared],
            timings=timings,
        )

    async def check(
        self, samples: Sequence[FeedbackSample], config: TrainingConfig
    ) -> list[_Prepared]:
        """Everything that can be refused before any model work: raises a domain error."""
        await self.base_sampler()  # the tokenizer
        self._validate(samples)
        # Teacher prompts are tokenised off the event loop: a long conversation takes a while.
        return await asyncio.to_thread(lambda: [self._prepare(s, config) for s in samples])

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

    def _prepare(self, sample: FeedbackSample, config: TrainingConfig) -> _Prepared:
        try:
            teacher_prompt = rollout_teacher_prompt_tokens(
                self._tokenizer,
                sample.messages,
                sample.prompt_format,
                sample.feedback,
                config.feedback_repetitions,
                config.hindsight,
            )
        except (ValueError, KeyError) as error:
            raise InvalidFeedback(f"cannot build the teacher prompt: {error}") from error
        total = len(teacher_prompt) + len(sample.response_tokens)
        if total >= self.max_context:  # scoring needs room for one sampled token
            raise ContextTooLong(
                f"the teacher prompt (conversation + hindsight feedback) plus the response is "
                f"{total} tokens, over the model's context of {self.max_context}; shorten the "
                "conversation or the feedback (the response is never truncated)"
            )
        return _Prepared(
            sample=sample,
            teacher_prompt=teacher_prompt,
            behavior=np.asarray(sample.behavior_logprobs, dtype=np.float64),
        )

    async def _demonstrations(
        self, teacher: Any, prepared: list[_Prepared], config: TrainingConfig
    ) -> list[_Prepared]:
        """The teacher's own greedy answers to the batch's first prompts, as extra samples.

        On-policy distillation corrects only the tokens the student samples. A string it never
        samples gets no signal: "Kuro" is `' K'` + `'uro'`, and a student that never says `' K'`
        never shows the teacher a position where `'uro'` is due. A teacher answer puts those
        tokens on the response positions (`_terms` trains them with forward KL at weight 1).
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
                _Prepared(
                    sample=sample,
                    teacher_prompt=p.teacher_prompt,
                    behavior=behavior,
                    demonstration=True,
                )
            )
        return demonstrations

    async def _score_teacher(
        self, teacher: Any, base: Any, prepared: list[_Prepared], config: TrainingConfig
    ) -> None:
        scoring = types.SamplingParams(max_tokens=1, temperature=0.0)
        calls = []
        for p in prepared:
            prompt = types.ModelInput.from_ints(p.teacher_prompt + p.response)
            last_n = len(p.response)  # only the response positions are needed
            if config.use_topk_divergence:
                calls.append(
                    teacher.sample(
                        prompt,
                        1,
                        scoring,
                        include_prompt_logprobs=True,
                        topk_prompt_logprobs=config.teacher_top_k,
                        prompt_logprobs_last_n=last_n,
                    )
                )
            else:
                calls.append(teacher.compute_logprobs(prompt, prompt_logprobs_last_n=last_n))
        base_calls = []
        rollouts = [i for i, p in enumerate(prepared) if not p.demonstration]
        if config.kl_reg_weight > 0:  # k3 estimates KL(student ‖ base) on student samples only
            base_calls = [
                base.compute_logprobs(
                    types.ModelInput.from_ints(prepared[i].prompt + prepared[i].response),
                    prompt_logprobs_last_n=len(prepared[i].response),
                )
                for i in rollouts
            ]
        results = await asyncio.gather(*calls)
        base_results = dict(zip(rollouts, await asyncio.gather(*base_calls), strict=False))
        for index, (p, result) in enumerate(zip(prepared, results, strict=True)):
            q, t = len(p.teacher_prompt), len(p.response)
            if config.use_topk_divergence:
                p.teacher_topk = datums.teacher_topk_from_prompt_scores(
                    result.topk_prompt_logprobs, q, t
                )
                p.teacher_sampled = datums.response_logprobs(result.prompt_logprobs, q, t)
            else:
                p.teacher_sampled = datums.response_logprobs(result, q, t)
            if index in base_results:
                p.base_sampled = datums.response_logprobs(base_results[index], len(p.prompt), t)

    async def _score_student(
        self, trainer: Any, prepared: list[_Prepared], config: TrainingConfig
    ) -> list[datums.StudentScores]:
        """The current student's exact log-probs: at the teacher's ids and of each y_t."""
        student = await trainer.save_weights_and_get_sampling_client(kind="inflight")
        scoring = types.SamplingParams(max_tokens=1, temperature=0.0)
        calls = []
        for p in prepared:
            prompt = types.ModelInput.from_ints(p.prompt + p.response)
            if config.use_topk_divergence:
                assert p.teacher_topk is not None
                calls.append(
                    student.sample(
                        prompt,
                        1,
                        scoring,
                        include_prompt_logprobs=True,
                        target_prompt_logprobs=datums.student_target_ids(
                            len(p.prompt), p.teacher_topk
                        ),
                        prompt_logprobs_last_n=len(p.response),
                    )
                )
            else:
                calls.append(
                    student.compute_logprobs(prompt, prompt_logprobs_last_n=len(p.response))
                )
        results = await asyncio.gather(*calls)
        scores = []
        for p, result in zip(prepared, results, strict=True):
            if config.use_topk_divergence:
                scores.append(
                    datums.StudentScores(
                        at_teacher_ids=datums.student_at_teacher_ids(
                            result.target_prompt_logprobs, len(p.prompt)
                        ),
                        sampled=datums.response_logprobs(
                            result.prompt_logprobs, len(p.prompt), len(p.response)
                        ),
                    )
                )
            else:
                sampled = datums.response_logprobs(result, len(p.prompt), len(p.response))
                scores.append(datums.StudentScores(at_teacher_ids=None, sampled=sampled))
        return scores

    def _terms(
        self,
        prepared: list[_Prepared],
        student: list[datums.StudentScores],
        config: TrainingConfig,
    ) -> list[tuple[datums.LossTerms, float | None]]:
        """Per sample: the loss terms at the current student (and the scalar-mode gain)."""
        batch = len(prepared)
        out: list[tuple[datums.LossTerms, float | None]] = []
        for p, s in zip(prepared, student, strict=True):
            scale = 1.0 / (batch * len(p.response))  # token mean, then mean over samples
            assert p.teacher_sampled is not None
            # A demonstration was sampled from the teacher, not the student: its estimator is
            # forward KL(teacher ‖ student) (alpha 0), whose gradient does not vanish where the
            # student gives the teacher's token almost no mass, at weight 1 (behaviour = the
            # current student, so no importance correction).
            demonstration = p.demonstration
            behavior = s.sampled if demonstration else p.behavior
            alpha = 0.0 if demonstration else config.alpha
            if config.use_topk_divergence:
                assert p.teacher_topk is not None
                terms = datums.topk_loss_terms(
                    s,
                    p.teacher_topk,
                    behavior,
                    p.base_sampled,
                    alpha,
                    config.is_clip,
                    config.kl_reg_weight,
                    scale,
                )
                out.append((terms, None))
            else:
                terms, gain = datums.scalar_loss_terms(
                    s.sampled,
                    p.teacher_sampled,
                    behavior,
                    p.base_sampled,
                    config.kl_coef,
                    config.is_clip,
                    config.kl_reg_weight,
                    scale,
                )
                out.append((terms, gain))
        return out

    async def _step(
        self,
        trainer: Any,
        prepared: list[_Prepared],
        student: list[datums.StudentScores],
        config: TrainingConfig,
        step: int,
    ) -> StepMetrics:
        clock = time.perf_counter()
        terms = self._terms(prepared, student, config)
        if config.use_topk_divergence:
            data = [
                datums.topk_datum(
                    p.prompt, p.response, p.teacher_topk.ids, t.weight_support, t.weight_sampled
                )
                for p, (t, _) in zip(prepared, terms, strict=True)
                if p.teacher_topk is not None and t.weight_support is not None
            ]
            loss_fn = "cross_entropy"
        else:
            data = [
                datums.scalar_datum(p.prompt, p.response, s.sampled, t.weight_sampled)
                for p, s, (t, _) in zip(prepared, student, terms, strict=True)
            ]
            loss_fn = "importance_sampling"
        adam = types.AdamParams(
            learning_rate=self.learning_rate_for(config), grad_clip_norm=config.max_grad_norm
        )
        forward_backward = trainer.forward_backward(data, loss_fn)  # pipelined with the step
        optim_step = trainer.optim_step(adam)
        await forward_backward
        optim = await optim_step
        metrics = optim.metrics or {}
        summary = _summarise(prepared, [t for t, _ in terms])
        gains = [g for _, g in terms if g is not None]
        advantages = np.concatenate([t.weight_sampled for t, _ in terms]) if gains else np.zeros(0)
        return StepMetrics(
            step=step + 1,
            loss=summary["loss"],
            divergence_mean=summary["divergence_mean"],
            mean_is_ratio=summary["mean_is_ratio"],
            clip_fraction=summary["clip_fraction"],
            kl_reg_mean=summary["kl_reg_mean"],
            grad_norm=metrics.get("grad_norm"),
            adv_mean=float(advantages.mean()) if gains else None,
            adv_abs_mean=float(np.abs(advantages).mean()) if gains else None,
            adv_gain=float(np.mean(gains)) if gains else None,
            seconds=time.perf_counter() - clock,
        )

    def _request_metrics(
        self,
        prepared: list[_Prepared],
        steps: list[StepMetrics],
        after: list[tuple[datums.LossTerms, float | None]],
        config: TrainingConfig,
    ) -> dict[str, float | int | str]:
        final = _summarise(prepared, [t for t, _ in after])
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


def _summarise(prepared: list[_Prepared], terms: list[datums.LossTerms]) -> dict[str, float]:
    """The loss over every sample; the divergence, ratio and k3 statistics over the rollouts
    (a demonstration's forward KL at weight 1 is another scale: `demonstration_kl`)."""
    rollouts = [t for p, t in zip(prepared, terms, strict=True) if not p.demonstration]
    demonstrations = [t for p, t in zip(prepared, terms, strict=True) if p.demonstration]
    summary = {
        "loss": float(sum(t.loss for t in terms)),
        "divergence_mean": float(np.concatenate([t.divergence for t in rollouts]).mean()),
        "mean_is_ratio": float(np.concatenate([t.ratio for t in rollouts]).mean()),
        "clip_fraction": float(np.concatenate([t.clipped for t in rollouts]).mean()),
        "kl_reg_mean": float(np.concatenate([t.k3 for t in rollouts]).mean()),
    }
    if demonstrations:
        kl = np.concatenate([t.divergence for t in demonstrations])
        summary["demonstration_kl"] = float(kl.mean())
    return summary


__all__ = [
    "DistillResult",
    "FeedbackSample",
    "SDPOEngine",
    "StepMetrics",
    "TrainingConfig",
]
