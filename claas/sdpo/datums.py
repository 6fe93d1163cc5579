"""From scored tokens to Tinker datums: the SDPO loss as `cross_entropy` weights.

Everything here is numpy and `tinker.types`; the conventions (α, the tail bucket, the alignment of
completion position t to datum position P − 1 + t, the importance ratio and k3) are those written
once in `claas.sdpo.divergence`.

The loss is exact through `cross_entropy`: Tinker's loss is −Σ logp(target)·weight, so with
weights = −∂L/∂logS at the targets, evaluated at the current student, its gradient is ∂L/∂θ.
Top-K GJS mode has targets (N, K+1) = [teacher top-K ids, y_t]; scalar mode (N,) = y_t.

    targets = topk_targets(prompt_tokens, response_tokens, teacher.ids)  # forward scores these
    student = student_scores(forward_logprobs, len(prompt_tokens), k=K)
    terms = topk_loss_terms(student, teacher, behavior, None, alpha, is_clip, 0.0, 1 / (B * T))
    weights = topk_weights(len(prompt_tokens), terms.weight_support, terms.weight_sampled)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from tinker import types

from claas.sdpo import divergence

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

TRAINER_ROUNDING_TOL = 1e-4
"""How far a trainer's log-probs may overshoot 1 (as a log) from rounding; see `student_scores`."""


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-K at each completion position: ids (T, K) and log-probs (T, K)."""

    ids: I64
    logprobs: F64


@dataclass(frozen=True)
class StudentScores:
    """The current student at each completion position t."""

    at_teacher_ids: F64 | None  # (T, K) log-probs of the teacher's ids; None in scalar mode
    sampled: F64  # (T,) log-prob of the response token y_t


@dataclass(frozen=True)
class LossTerms:
    """One sample's loss terms and −∂L/∂logS, already scaled by 1 / (B·T)."""

    loss: float  # Σ_t scale·(r_t·D_t + λ·k3_t)
    divergence: F64  # (T,) D_t (GJS, or the sampled-token KL estimate in scalar mode)
    ratio: F64  # (T,) clipped importance ratio r_t
    clipped: F64  # (T,) 1.0 where the raw ratio hit is_clip
    k3: F64  # (T,)
    weight_support: F64 | None  # (T, K) weights at the teacher's ids (top-K mode)
    weight_sampled: F64  # (T,) weights (or advantages) at y_t


def teacher_topk_from_prompt_scores(
    topk_rows: list[list[tuple[int, float]] | None], teacher_prompt_len: int, response_len: int
) -> TeacherTopK:
    """Slice Tinker's `topk_prompt_logprobs` of (teacher prompt + response) to the response.

    Row i of `topk_prompt_logprobs` is the distribution of token i given tokens[:i], so response
    token t (at index teacher_prompt_len + t) is described by row teacher_prompt_len + t.
    """
    rows = topk_rows[teacher_prompt_len : teacher_prompt_len + response_len]
    if len(rows) != response_len or any(row is None for row in rows):
        raise ValueError("the teacher returned no top-K log-probs for some response positions")
    k = min(len(row) for row in rows if row is not None)
    ids = np.array([[tid for tid, _ in row[:k]] for row in rows if row is not None], dtype=np.int64)
    logprobs = np.array(
        [[lp for _, lp in row[:k]] for row in rows if row is not None], dtype=np.float64
    )
    return TeacherTopK(ids=ids, logprobs=logprobs)


def response_logprobs(
    prompt_logprobs: list[float | None], prompt_len: int, response_len: int
) -> F64:
    """The log-probs of the response tokens from `prompt_logprobs` of (prompt + response)."""
    values = prompt_logprobs[prompt_len : prompt_len + response_len]
    if len(values) != response_len or any(v is None for v in values):
        raise ValueError("missing prompt log-probs for some response positions")
    return np.asarray(values, dtype=np.float64)


def topk_loss_terms(
    student: StudentScores,
    teacher: TeacherTopK,
    behavior_logprobs: F64,
    base_sampled: F64 | None,
    alpha: float,
    is_clip: float,
    kl_reg_weight: float,
    scale: float,
) -> LossTerms:
    """Top-K GJS loss of one sample and its weights −∂L/∂logS (conventions: `divergence`)."""
    if student.at_teacher_ids is None:
        raise ValueError("top-K mode needs the student's log-probs at the teacher's ids")
    value, grad = divergence.gjs_and_grad(student.at_teacher_ids, teacher.logprobs, alpha)
    ratio, clipped = _ratio(student.sampled, behavior_logprobs, is_clip)
    k3, k3_grad = _k3_terms(base_sampled, student.sampled, kl_reg_weight)
    return LossTerms(
        loss=float(scale * np.sum(ratio * value + kl_reg_weight * k3)),
        divergence=value,
        ratio=ratio,
        clipped=clipped,
        k3=k3,
        weight_support=-scale * ratio[:, None] * grad,
        weight_sampled=-scale * kl_reg_weight * k3_grad,
    )


def scalar_loss_terms(
    student_sampled: F64,
    teacher_sampled: F64,
    behavior_logprobs: F64,
    base_sampled: F64 | None,
    kl_coef: float,
    is_clip: float,
    kl_reg_weight: float,
    scale: float,
) -> tuple[LossTerms, float]:
    """Scalar-KL mode: importance-sampling advantages r_t·A_t (α = 1, sampled token only).

    As `cross_entropy` weights at y_t (or as `importance_sampling` advantages with the current
    student's log-probs in the datum, where the ratio is 1), A'_t = scale·(r_t·A_t − λ·∂k3/∂s)
    gives the gradient −Σ A'_t·∇logS_t, which descends the same loss.
    Returns the terms and the adaptive gain.
    """
    advantages, gain = divergence.scalar_kl_advantages(student_sampled, teacher_sampled, kl_coef)
    ratio, clipped = _ratio(student_sampled, behavior_logprobs, is_clip)
    k3, k3_grad = _k3_terms(base_sampled, student_sampled, kl_reg_weight)
    estimate = student_sampled - teacher_sampled  # the sampled-token estimate of KL(S‖T)
    terms = LossTerms(
        loss=float(scale * np.sum(ratio * estimate + kl_reg_weight * k3)),
        divergence=estimate,
        ratio=ratio,
        clipped=clipped,
        k3=k3,
        weight_support=None,
        weight_sampled=scale * (ratio * advantages - kl_reg_weight * k3_grad),
    )
    return terms, gain


def _ratio(student: F64, behavior: F64, is_clip: float) -> tuple[F64, F64]:
    ratio = divergence.importance_ratio(student, behavior, is_clip)
    return ratio, (ratio >= is_clip).astype(np.float64)


def _k3_terms(base: F64 | None, student: F64, kl_reg_weight: float) -> tuple[F64, F64]:
    if base is None or kl_reg_weight == 0:
        zeros = np.zeros_like(student)
        return zeros, zeros
    return divergence.k3(base, student), divergence.k3_grad(base, student)


def topk_targets(prompt_tokens: list[int], response_tokens: list[int], teacher_ids: I64) -> I64:
    """(N, K+1) targets for prompt + response: the teacher's K ids, then y_t.

    Completion position t is row P − 1 + t; a prompt row repeats the next prompt token (a valid
    id, at weight 0).
    """
    tokens = prompt_tokens + response_tokens
    p, k = len(prompt_tokens), teacher_ids.shape[1]
    targets = np.repeat(np.asarray(tokens[1:], dtype=np.int64)[:, None], k + 1, axis=1)
    targets[p - 1 :, :k] = teacher_ids
    return targets


def topk_weights(prompt_len: int, weight_support: F64, weight_sampled: F64) -> F32:
    """(N, K+1) `cross_entropy` weights for `topk_targets`: 0 on the prompt rows."""
    response_len, k = weight_support.shape
    weights = np.zeros((prompt_len - 1 + response_len, k + 1), dtype=np.float32)
    weights[prompt_len - 1 :, :k] = weight_support
    weights[prompt_len - 1 :, k] = weight_sampled
    return weights


def sampled_targets(prompt_tokens: list[int], response_tokens: list[int]) -> I64:
    """(N,) targets for prompt + response: each next token (scalar mode scores y_t only)."""
    return np.asarray((prompt_tokens + response_tokens)[1:], dtype=np.int64)


def sampled_weights(prompt_len: int, weight_sampled: F64) -> F32:
    """(N,) `cross_entropy` weights for `sampled_targets`: 0 on the prompt rows."""
    weights = np.zeros(prompt_len - 1 + len(weight_sampled), dtype=np.float32)
    weights[prompt_len - 1 :] = weight_sampled
    return weights


def cross_entropy_datum(
    tokens: list[int], targets: I64, weights: npt.NDArray[np.floating] | None = None
) -> types.Datum:
    """A `cross_entropy` datum: model_input = tokens[:-1], row i predicts targets[i].

    Without weights (all 0) it is a datum to score: `forward` returns the log-probs at the
    targets, and `forward_backward_custom` hands them to a loss function.
    """
    if weights is None:
        weights = np.zeros(targets.shape, dtype=np.float32)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(targets),
            "weights": types.TensorData.from_numpy(np.asarray(weights, dtype=np.float32)),
        },
    )


def topk_datum(
    prompt_tokens: list[int],
    response_tokens: list[int],
    teacher_ids: I64,
    weight_support: F64,
    weight_sampled: F64,
) -> types.Datum:
    """The `cross_entropy` datum whose gradient is a top-K sample's loss gradient."""
    return cross_entropy_datum(
        prompt_tokens + response_tokens,
        topk_targets(prompt_tokens, response_tokens, teacher_ids),
        topk_weights(len(prompt_tokens), weight_support, weight_sampled),
    )


def student_scores(logprobs: npt.ArrayLike, prompt_len: int, k: int | None) -> StudentScores:
    """The student's scores from log-probs at `topk_targets` (k = K) or `sampled_targets`
    (k = None), as a forward returns them: the response rows, P − 1 onwards.

    A trainer's forward rounds its normaliser (float32 or bf16 on a remote trainer), which
    shifts a whole row: its top-K mass can exceed 1, or a log-prob 0, by a little. Such a row
    is shifted back by its overshoot; one that overshoots by more than `TRAINER_ROUNDING_TOL` is
    not made of full-vocabulary log-probs, and raises `ValueError`.
    """
    rows = np.asarray(logprobs, dtype=np.float64)[prompt_len - 1 :]
    if k is None:
        overshoot = np.maximum(rows, 0.0)
    else:  # y_t may lie outside the top-K
        overshoot = np.maximum(np.maximum(np.logaddexp.reduce(rows[:, :k], axis=1), rows[:, k]), 0)
    if overshoot.size and overshoot.max() > TRAINER_ROUNDING_TOL:
        worst = int(np.argmax(overshoot))
        raise ValueError(
            f"the student's log-probs at response position {worst} overshoot a probability of 1 "
            f"by a factor of exp({overshoot[worst]:.3g}); a forward must return full-vocabulary "
            "log-probs (log_softmax of the logits)"
        )
    if k is None:
        return StudentScores(at_teacher_ids=None, sampled=rows - overshoot)
    rows = rows - overshoot[:, None]
    return StudentScores(at_teacher_ids=rows[:, :k], sampled=rows[:, k])
