"""The two divergences SDPO trains with, as one small strategy object each.

A strategy knows, for its divergence, how to score the teacher and the student on a sample, the
per-token loss terms, the Tinker datum that carries their gradient, and the loss function that
datum is meant for. The engine is written once against `Strategy`; a third divergence is one
new class here.

- `TopKGJS`: the teacher's top-K prompt log-probs and its log-prob of y_t; the student's at
  the teacher's ids; a datum of (N, K+1) targets and weights for `cross_entropy`.
- `ScalarKL`: both models' log-prob of y_t only; a datum of advantages for
  `importance_sampling`.

The records are immutable: a `Prepared` sample (validated, with its teacher prompt) is scored
once into a `Scored` one (plus the teacher's view and, with k3, the base model's log-probs).

A step's statistics are `rollout_statistics` (token means over the batch) and
`sample_statistics` (per-sample token means, then the mean over samples: how CLaaS, the system
claas grew from, reports its distill loss and the scalar mode's advantages, under the same names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, NotRequired, Protocol, TypedDict, TypeVar

import numpy as np
from tinker import types

from claas.sdpo import datums
from claas.sdpo.config import DivergenceMode, FeedbackSample, TrainingConfig
from claas.services.protocol import SamplingClient

SCORING = types.SamplingParams(max_tokens=1, temperature=0.0)  # prompt scoring, one token


@dataclass(frozen=True)
class Prepared:
    """A validated sample with its teacher prompt (`demonstration`: the teacher's own answer)."""

    sample: FeedbackSample
    teacher_prompt: list[int]
    behavior: datums.F64
    demonstration: bool = False

    @property
    def prompt(self) -> list[int]:
        return self.sample.prompt_tokens

    @property
    def response(self) -> list[int]:
        return self.sample.response_tokens


@dataclass(frozen=True)
class TopKTeacher:
    topk: datums.TeacherTopK  # (T, K) ids and log-probs
    sampled: datums.F64  # (T,) log-prob of y_t


@dataclass(frozen=True)
class SampledTeacher:
    sampled: datums.F64  # (T,) log-prob of y_t


TeacherT = TypeVar("TeacherT", TopKTeacher, SampledTeacher)


@dataclass(frozen=True)
class Scored(Generic[TeacherT]):
    """A prepared sample with the teacher's view of it and, for k3, the base model's."""

    prepared: Prepared
    teacher: TeacherT
    base_sampled: datums.F64 | None  # (T,); None without kl_reg_weight, or for a demonstration


class Strategy(Protocol[TeacherT]):
    mode: DivergenceMode
    loss_fn: types.LossFnType

    async def score_teacher(self, teacher: SamplingClient, p: Prepared) -> TeacherT: ...

    async def score_student(
        self, student: SamplingClient, s: Scored[TeacherT]
    ) -> datums.StudentScores: ...

    def terms(
        self, s: Scored[TeacherT], student: datums.StudentScores, scale: float
    ) -> tuple[datums.LossTerms, float | None]: ...

    def datum(
        self, s: Scored[TeacherT], student: datums.StudentScores, terms: datums.LossTerms
    ) -> types.Datum: ...


def _scoring_input(prompt: list[int], response: list[int]) -> types.ModelInput:
    return types.ModelInput.from_ints(prompt + response)


class TopKGJS:
    """Top-K generalised Jensen-Shannon divergence, exact through `cross_entropy` weights."""

    mode: DivergenceMode = "topk_gjs"
    loss_fn: types.LossFnType = "cross_entropy"

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config

    async def score_teacher(self, teacher: SamplingClient, p: Prepared) -> TopKTeacher:
        result = await teacher.sample(
            _scoring_input(p.teacher_prompt, p.response),
            1,
            SCORING,
            include_prompt_logprobs=True,
            topk_prompt_logprobs=self.config.teacher_top_k,
            prompt_logprobs_last_n=len(p.response),  # only the response positions
        )
        q, t = len(p.teacher_prompt), len(p.response)
        return TopKTeacher(
            topk=datums.teacher_topk_from_prompt_scores(result.topk_prompt_logprobs or [], q, t),
            sampled=datums.response_logprobs(result.prompt_logprobs or [], q, t),
        )

    async def score_student(
        self, student: SamplingClient, s: Scored[TopKTeacher]
    ) -> datums.StudentScores:
        p = s.prepared
        result = await student.sample(
            _scoring_input(p.prompt, p.response),
            1,
            SCORING,
            include_prompt_logprobs=True,
            target_prompt_logprobs=datums.student_target_ids(len(p.prompt), s.teacher.topk),
            prompt_logprobs_last_n=len(p.response),
        )
        if result.target_prompt_logprobs is None:
            raise ValueError("the student returned no log-probs at the teacher's ids")
        return datums.StudentScores(
            at_teacher_ids=datums.student_at_teacher_ids(
                result.target_prompt_logprobs, len(p.prompt)
            ),
            sampled=datums.response_logprobs(
                result.prompt_logprobs or [], len(p.prompt), len(p.response)
            ),
        )

    def terms(
        self, s: Scored[TopKTeacher], student: datums.StudentScores, scale: float
    ) -> tuple[datums.LossTerms, float | None]:
        # A demonstration was sampled from the teacher, not the student: its estimator is
        # forward KL(teacher ‖ student) (alpha 0), whose gradient does not vanish where the
        # student gives the teacher's token almost no mass, at weight 1 (behaviour = the
        # current student, so no importance correction).
        p = s.prepared
        terms = datums.topk_loss_terms(
            student,
            s.teacher.topk,
            student.sampled if p.demonstration else p.behavior,
            s.base_sampled,
            0.0 if p.demonstration else self.config.alpha,
            self.config.is_clip,
            self.config.kl_reg_weight,
            scale,
        )
        return terms, None

    def datum(
        self, s: Scored[TopKTeacher], student: datums.StudentScores, terms: datums.LossTerms
    ) -> types.Datum:
        if terms.weight_support is None:
            raise ValueError("a top-K datum needs weights at the teacher's ids; none were made")
        p = s.prepared
        return datums.topk_datum(
            p.prompt, p.response, s.teacher.topk.ids, terms.weight_support, terms.weight_sampled
        )


class ScalarKL:
    """The ablation: the sampled-token KL estimate as importance-sampling advantages."""

    mode: DivergenceMode = "scalar_kl"
    loss_fn: types.LossFnType = "importance_sampling"

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config

    async def score_teacher(self, teacher: SamplingClient, p: Prepared) -> SampledTeacher:
        values = await teacher.compute_logprobs(
            _scoring_input(p.teacher_prompt, p.response), prompt_logprobs_last_n=len(p.response)
        )
        return SampledTeacher(
            sampled=datums.response_logprobs(values, len(p.teacher_prompt), len(p.response))
        )

    async def score_student(
        self, student: SamplingClient, s: Scored[SampledTeacher]
    ) -> datums.StudentScores:
        p = s.prepared
        values = await student.compute_logprobs(
            _scoring_input(p.prompt, p.response), prompt_logprobs_last_n=len(p.response)
        )
        sampled = datums.response_logprobs(values, len(p.prompt), len(p.response))
        return datums.StudentScores(at_teacher_ids=None, sampled=sampled)

    def terms(
        self, s: Scored[SampledTeacher], student: datums.StudentScores, scale: float
    ) -> tuple[datums.LossTerms, float | None]:
        return datums.scalar_loss_terms(
            student.sampled,
            s.teacher.sampled,
            s.prepared.behavior,
            s.base_sampled,
            self.config.kl_coef,
            self.config.is_clip,
            self.config.kl_reg_weight,
            scale,
        )

    def datum(
        self, s: Scored[SampledTeacher], student: datums.StudentScores, terms: datums.LossTerms
    ) -> types.Datum:
        p = s.prepared
        return datums.scalar_datum(p.prompt, p.response, student.sampled, terms.weight_sampled)


def rollout_statistics(prepared: list[Prepared], terms: list[datums.LossTerms]) -> dict[str, float]:
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


class SampleStatistics(TypedDict):
    """One step's per-sample token means, averaged over the batch's samples (CLaaS's names).

    `distill_loss` is the loss without its k3 term. The scalar mode adds, with
    Δ_t = teacher − student log-prob of the sampled token and A_t = kl_coef·gain·Δ_t the
    advantage per token (before the importance ratio, the k3 pull and the 1 / (B·T) scale that
    the datum carries): `adv_mean` and `adv_abs_mean` (A_t), `adv_abs_mean_raw` (|Δ_t|),
    `kl_mean` (Δ_t) and `adv_gain` (the gain; CLaaS's `kl_gain`).
    """

    distill_loss: float
    adv_mean: NotRequired[float]
    adv_abs_mean: NotRequired[float]
    adv_abs_mean_raw: NotRequired[float]
    kl_mean: NotRequired[float]
    adv_gain: NotRequired[float]


def sample_statistics(
    terms: Sequence[tuple[datums.LossTerms, float | None]], kl_coef: float
) -> SampleStatistics:
    """A step's `SampleStatistics` from its per-sample loss terms and scalar-mode gains."""
    stats = SampleStatistics(
        distill_loss=float(np.mean([np.mean(t.ratio * t.divergence) for t, _ in terms]))
    )
    scalar = [(t, gain) for t, gain in terms if gain is not None]
    if not scalar:
        return stats
    # In scalar mode a sample's divergence is the sampled-token estimate student − teacher.
    deltas = [-t.divergence for t, _ in scalar]
    advantages = [kl_coef * gain * delta for delta, (_, gain) in zip(deltas, scalar, strict=True)]
    stats["adv_mean"] = float(np.mean([a.mean() for a in advantages]))
    stats["adv_abs_mean"] = float(np.mean([np.abs(a).mean() for a in advantages]))
    stats["adv_abs_mean_raw"] = float(np.mean([np.abs(d).mean() for d in deltas]))
    stats["kl_mean"] = float(np.mean([d.mean() for d in deltas]))
    stats["adv_gain"] = float(np.mean([gain for _, gain in scalar]))
    return stats
