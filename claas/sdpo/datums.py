"""From scored tokens to Tinker datums: the SDPO loss as `cross_entropy` or `importance_sampling`.

Everything here is numpy and `tinker.types`; the conventions (α, the tail bucket, the alignment of
completion position t to datum position P − 1 + t, the importance ratio and k3) are those written
once in `claas.sdpo.divergence`.

Top-K GJS mode is exact with one `forward_backward(..., "cross_entropy")`: Tinker's loss is
−Σ logp(target)·weight, so with targets (N, K+1) = [teacher top-K ids, y_t] and
weights = −∂L/∂logS at those ids, evaluated at the current student, its gradient is ∂L/∂θ.

    weights = topk_loss_weights(student, teacher, scale=1 / (B * T))
    datum = topk_datum(prompt_tokens, response_tokens, teacher.ids, weights)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from tinker import types

from claas.sdpo import divergence

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


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


def student_target_ids(prompt_len: int, teacher: TeacherTopK) -> types.TensorData:
    """`target_prompt_logprobs` asking for the teacher's ids at every response position.

    Row i scores position i + 1, so response token t (position prompt_len + t) is row
    prompt_len + t − 1. Rows over the prompt are −1 (skip); sent as sparse CSR.
    """
    response_len, k = teacher.ids.shape
    ids = np.full((prompt_len + response_len - 1, k), -1, dtype=np.int64)
    ids[prompt_len - 1 :] = teacher.ids
    import torch  # tinker's sparse encoder takes a torch tensor

    return types.TensorData.from_torch_sparse(torch.from_numpy(ids), pad_value=-1)


def student_at_teacher_ids(target_logprobs: types.TensorData, prompt_len: int) -> F64:
    """The rows of `target_prompt_logprobs` that describe the response, as (T, K)."""
    values = target_logprobs.to_numpy()
    return np.asarray(values[prompt_len - 1 :], dtype=np.float64)


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

    With `logprobs` = the current student's in the datum, Tinker's importance-sampling loss has
    gradient −Σ A'_t·∇logS_t, so A'_t = scale·(r_t·A_t − λ·∂k3/∂s) descends the same loss.
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


def topk_datum(
    prompt_tokens: list[int],
    response_tokens: list[int],
    teacher_ids: I64,
    weight_support: F64,
    weight_sampled: F64,
) -> types.Datum:
    """`cross_entropy` datum with (N, K+1) targets: the teacher's K ids, then y_t.

    model_input = tokens[:-1]; completion position t is datum row P − 1 + t; prompt rows carry
    weight 0 (their targets repeat the next prompt token, which is a valid id).
    """
    tokens = prompt_tokens + response_tokens
    p, (_t, k) = len(prompt_tokens), teacher_ids.shape
    targets = np.repeat(np.asarray(tokens[1:], dtype=np.int64)[:, None], k + 1, axis=1)
    weights = np.zeros((len(tokens) - 1, k + 1), dtype=np.float32)
    targets[p - 1 :, :k] = teacher_ids
    weights[p - 1 :, :k] = weight_support
    weights[p - 1 :, k] = weight_sampled
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(targets),
            "weights": types.TensorData.from_numpy(weights),
        },
    )


def scalar_datum(
    prompt_tokens: list[int],
    response_tokens: list[int],
    student_sampled: F64,
    advantages: F64,
) -> types.Datum:
    """`importance_sampling` datum: (N,) targets, sampling log-probs and advantages."""
    tokens = prompt_tokens + response_tokens
    p = len(prompt_tokens)
    logprobs = np.zeros(len(tokens) - 1, dtype=np.float32)
    advantage = np.zeros(len(tokens) - 1, dtype=np.float32)
    logprobs[p - 1 :] = student_sampled
    advantage[p - 1 :] = advantages
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
            "logprobs": types.TensorData.from_numpy(logprobs),
            "advantages": types.TensorData.from_numpy(advantage),
        },
    )
