"""The two divergences SDPO trains with, as one small strategy object each.

A strategy knows, for its divergence, how to score the teacher on a sample, which log-probs of
the student it needs (the `targets` of a datum: a forward scores them), the per-token loss terms
at the current student, and the `cross_entropy` weights −∂L/∂logprobs that carry their gradient.
The engine is written once against `Strategy`; a third divergence is one new class here.

- `TopKGJS`: the teacher's top-K prompt log-probs and its log-prob of y_t; the student's at the
  teacher's ids and at y_t, (N, K+1) targets.
- `ScalarKL`: both models' log-prob of y_t only, (N,) targets; its weights are the
  importance-sampling advantages, which at the current student have the same gradient.

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
import numpy.typing as npt
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

    async def score_teacher(self, teacher: SamplingClient, p: Prepared) -> TeacherT: ...

    def targets(self, s: Scored[TeacherT]) -> types.Datum: ...

    def student(self, s: Scored[TeacherT], logprobs: npt.ArrayLike) -> datums.StudentScores: ...

    def terms(
        self, s: Scored[TeacherT], student: datums.StudentScores, scale: float
    ) -> tuple[datums.LossTerms, float | None]: ...

    def weights(self, s: Scored[TeacherT], terms: datums.LossTerms) -> datums.F32: ...


def _scoring_input(prompt: list[int], response: list[int]) -> types.ModelInput:
    return types.ModelInput.from_ints(prompt + response)


class TopKGJS:
    """Top-K generalised Jensen-Shannon divergence, exact through `cross_entropy` weights."""

    mode: DivergenceMode = "topk_gjs"

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

    def targets(self, s: Scored[TopKTeacher]) -> types.Datum:
        p = s.prepared
        return datums.cross_entropy_datum(
            p.prompt + p.response, datums.topk_targets(p.prompt, p.response, s.teacher.topk.ids)
        )

    def student(self, s: Scored[TopKTeacher], logprobs: npt.ArrayLike) -> datums.StudentScores:
        return datums.student_scores(logprobs, len(s.prepared.prompt), s.teacher.topk.ids.shape[1])

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

    def weights(self, s: Scored[TopKTeacher], terms: datums.LossTerms) -> datums.F32:
        if terms.weight_support is None:
            raise ValueError("top-K weights need the terms at the teacher's ids; none were made")
        return datums.topk_weights(
            len(s.prepared.prompt), terms.weight_support, terms.weight_sampled
        )


class ScalarKL:
    """The ablation: the sampled-token KL estimate, with importance-sampling advantages."""

    mode: DivergenceMode = "scalar_kl"

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config

    async def score_teacher(self, teacher: SamplingClient, p: Prepared) -> SampledTeacher:
        values = await teacher.compute_logprobs(
            _scoring_input(p.teacher_prompt, p.response), prompt_logprobs_last_n=len(p.response)
        )
        return SampledTeacher(
            sampled=datums.response_logprobs(values, len(p.teacher_prompt), len(p.response))
        )

    def targets(self, s: Scored[SampledTeacher]) -> types.Datum:
        p = s.prepared
        return datums.cross_entropy_datum(
            p.prompt + p.response, datums.sampled_targets(p.prompt, p.response)
        )

    def student(self, s: Scored[SampledTeacher], logprobs: npt.ArrayLike) -> datums.StudentScores:
        return datums.student_scores(logprobs, len(s.prepared.prompt), None)

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

    def weights(self, s: Scored[SampledTeacher], terms: datums.LossTerms) -> datums.F32:
        return datums.sampled_weights(len(s.prepared.prompt), terms.weight_sampled)


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
