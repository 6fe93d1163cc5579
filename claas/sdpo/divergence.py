"""The SDPO divergence and loss conventions: the one place where they are defined.

SDPO (Hübotter et al. 2026, "Reinforcement Learning via Self-Distillation") moves the student (the
adapter) toward a teacher (the adapter's version before the request, or the frozen base model,
prompted with the user's feedback) by a generalised Jensen-Shannon divergence, the GJS of
Agarwal et al. ("On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", GKD), evaluated at every completion position t.

**Support and tail.** At position t the support is the teacher's top-K token ids. Each distribution
lives on K+1 buckets: those K ids, plus a tail bucket holding 1 − Σ top-K mass. Log-probs are
normalised over the full vocabulary and never renormalised over the K ids. The tail log-mass is
``log1p(−exp(lse))`` with ``lse`` = logsumexp of the K log-probs clamped to ≤ ``TAIL_LSE_CAP``
(−1e−7), so the tail never reaches log(0). Where the clamp is active the tail is a constant: it has
no gradient, and the K+1 buckets may sum to slightly more than 1, so GJS may then dip below 0 by
about 1e−7.

**GJS_α(S‖T), where α weights the teacher.** α = 0 is KL(T‖S) (forward KL), α = 1 is KL(S‖T)
(reverse KL), and for 0 < α < 1 it is α·KL(T‖M) + (1−α)·KL(S‖M) with M = α·T + (1−α)·S. The
endpoints are exact special cases, not limits: the mixture formula tends to 0 at both ends. All
math is float64. With p the student's bucket probs, q the teacher's and m = αq + (1−α)p, ∂D/∂p_i
is (1−α)·log(p_i/m_i) for 0 < α < 1, log(p_i/q_i) + 1 for α = 1 and −q_i/p_i for α = 0. With
respect to a support log-prob s_j it is p_j·(∂D/∂p_j − ∂D/∂p_tail), the tail term dropped where the
clamp is active, so ``gjs_grad`` is exactly the autograd gradient of ``gjs``.

**Alignment.** A Datum's model_input is tokens[:-1] and target position i predicts tokens[i+1];
completion position t of a prompt of length P is datum position P−1+t; prompt positions carry
weight 0.

**Per-sample loss.** With y_t the sampled token, s_t = log S_t(y_t) under the current student, b_t
the base model's and behavior_t the rollout's log-prob of y_t:
``importance_ratio`` r_t = min(exp(clamp(s_t − behavior_t, ±20)), is_clip), treated as a constant
(detached); ``k3`` (Schulman's estimator, ≥ 0) k3_t = exp(b_t − s_t) − 1 − (b_t − s_t) with
∂k3/∂s_t = 1 − exp(b_t − s_t). Per-sample loss = mean over completion positions of
r_t·D_t + kl_reg_weight·k3_t; batch loss = mean over samples. The scalar fallback
(``scalar_kl_advantages``) is the α = 1 sampled-token estimator: advantages kl_coef·gain·Δ_t with
Δ_t = log T_t(y_t) − s_t and adaptive gain clamp(0.03 / mean|Δ|, 1, 4).

Inputs may be float32 (values in (0, 1e−6] are float32 rounding and are clipped to 0); anything
else that is not a valid log-prob raises ``ValueError`` naming the argument.

Example, one position with K = 2 (tails 0.1 and 0.3):

>>> import numpy as np
>>> teacher = np.log([[0.6, 0.3]])
>>> student = np.log([[0.5, 0.2]])
>>> gjs(student, teacher, alpha=0.5).round(6)
array([0.033472])
>>> gjs_grad(student, teacher, alpha=0.5).round(6)
array([[-0.125194, -0.062861]])
"""

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

F64 = NDArray[np.float64]

TAIL_LSE_CAP = -1e-7
"""The top-K logsumexp is clamped to at most this, so the tail log-mass stays finite."""
LOGPROB_ROUNDING_TOL = 1e-6
"""Log-probs in (0, this] are float32 rounding and are clipped to 0; larger ones are errors."""
MASS_TOL = 1e-6
"""A top-K mass above 1 + this is an error."""
LOG_RATIO_CLAMP = 20.0
"""The log importance ratio is clamped to ±this before exponentiation."""
GAIN_TARGET = 0.03
GAIN_MIN = 1.0
GAIN_MAX = 4.0

_NOT_LOGPROBS_HINT = "pass full-vocabulary log-probs (log_softmax of the logits)"


# ---------------------------------------------------------------- validation


def _as_logprobs(values: npt.ArrayLike, name: str, ndim: int) -> F64:
    """`values` as float64 `ndim`-D finite log-probs, float32 rounding above 0 clipped to 0."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        shape = "(T, K)" if ndim == 2 else "(T,)"
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf; {_NOT_LOGPROBS_HINT}")
    largest = float(array.max(initial=-np.inf))
    if largest > LOGPROB_ROUNDING_TOL:
        raise ValueError(f"{name} has a log-prob above 0 (max {largest:.3g}); {_NOT_LOGPROBS_HINT}")
    # The array may be the caller's own (it is never written to): clip into a copy, only if needed.
    return np.minimum(array, 0.0) if largest > 0.0 else array


def _same_shape(first: F64, first_name: str, second: F64, second_name: str) -> None:
    if first.shape != second.shape:
        raise ValueError(
            f"shape mismatch: {first_name} has shape {first.shape} but {second_name} has shape"
            f" {second.shape}; both must hold log-probs of the same tokens"
        )


def _logprob_pair(
    first: npt.ArrayLike, first_name: str, second: npt.ArrayLike, second_name: str, ndim: int
) -> tuple[F64, F64]:
    first_array = _as_logprobs(first, first_name, ndim)
    second_array = _as_logprobs(second, second_name, ndim)
    _same_shape(first_array, first_name, second_array, second_name)
    return first_array, second_array


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1] (0: forward KL, 1: reverse KL), got {alpha}")
    return float(alpha)


def _check_finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


# ---------------------------------------------------------------- buckets
#
# Each side is kept as its support (T, K) and its tail (T, 1) rather than one (T, K+1) array: the
# same elementwise formulas serve both, and no (T, K) array is copied. Positions are processed in
# blocks of about BLOCK_LOGPROBS values, so that the temporaries stay in cache and in memory that
# is already mapped: on whole (T, K) arrays, fresh temporaries cost as much as the math itself
# (see benchmarks/divergence.py).

BLOCK_LOGPROBS = 1 << 16


def _row_blocks(positions: int, k: int) -> Iterator[slice]:
    rows = max(1, BLOCK_LOGPROBS // k)
    for start in range(0, positions, rows):
        yield slice(start, start + rows)


class _Buckets:
    """One side's K+1 buckets as log-probs and probs: support (T, K), tail (T, 1)."""

    logp: F64
    p: F64
    tail_logp: F64
    tail_p: F64
    tail_clamped: NDArray[np.bool_]

    def __init__(self, support_logprobs: F64, name: str, first_position: int) -> None:
        self.logp = support_logprobs
        self.p = np.exp(support_logprobs)
        mass = self.p.sum(axis=1, keepdims=True)
        if np.any(mass > 1.0 + MASS_TOL):
            worst = int(np.argmax(mass))
            position = first_position + worst
            raise ValueError(
                f"{name} has top-K mass {mass[worst, 0]:.9g} > 1 at position {position};"
                f" {_NOT_LOGPROBS_HINT}, not renormalised ones"
            )
        # Log-probs are ≤ 0, so log(Σ exp) cannot overflow; it underflows to -inf only when the
        # mass is below ~1e-308, where the tail is 1.0 in float64 either way.
        with np.errstate(divide="ignore"):
            lse = np.log(mass)
        self.tail_clamped = lse > TAIL_LSE_CAP
        self.tail_logp = np.log1p(-np.exp(np.minimum(lse, TAIL_LSE_CAP)))
        self.tail_p = np.exp(self.tail_logp)


# ---------------------------------------------------------------- GJS value and gradient


def _kl_terms(probs: F64, logprobs: F64, reference_logprobs: F64) -> F64:
    """p_i·(log p_i − log r_i) per bucket. Every log here is finite, so p_i = 0 gives an exact 0."""
    terms = logprobs - reference_logprobs
    terms *= probs
    return terms


def _log_mixture(
    student_p: F64, student_logp: F64, teacher_p: F64, teacher_logp: F64, alpha: float
) -> F64:
    """log m = log(α·q + (1−α)·p), taken in log-space where the linear sum underflows."""
    log_m = alpha * teacher_p
    log_m += (1.0 - alpha) * student_p
    underflow = log_m < np.finfo(np.float64).tiny
    with np.errstate(divide="ignore"):
        np.log(log_m, out=log_m)
    if underflow.any():
        log_m[underflow] = np.logaddexp(
            math.log(alpha) + teacher_logp[underflow],
            math.log1p(-alpha) + student_logp[underflow],
        )
    return log_m


def _divergence_terms(
    student_p: F64, student_logp: F64, teacher_p: F64, teacher_logp: F64, alpha: float
) -> tuple[F64, F64]:
    """On a group of buckets (T, n): GJS summed over the group (T,) and p_i·∂D/∂p_i (T, n).

    p_i·∂D/∂p_i is formed directly, never as p_i times ∂D/∂p_i, so that p_i → 0 cannot give inf·0
    (at α = 0 it is −q_i rather than p_i·(−q_i/p_i)).
    """
    if alpha == 0.0:
        return _kl_terms(teacher_p, teacher_logp, student_logp).sum(axis=1), -teacher_p
    if alpha == 1.0:
        p_dd_dp = _kl_terms(student_p, student_logp, teacher_logp)
        value = p_dd_dp.sum(axis=1)
        p_dd_dp += student_p  # ∂D/∂p_i = log(p_i/q_i) + 1
        return value, p_dd_dp
    log_m = _log_mixture(student_p, student_logp, teacher_p, teacher_logp, alpha)
    to_teacher = _kl_terms(teacher_p, teacher_logp, log_m).sum(axis=1)
    p_dd_dp = _kl_terms(student_p, student_logp, log_m)
    value = alpha * to_teacher + (1.0 - alpha) * p_dd_dp.sum(axis=1)
    p_dd_dp *= 1.0 - alpha  # ∂D/∂p_i = (1−α)·log(p_i/m_i)
    return value, p_dd_dp


def _gjs_parts(student: _Buckets, teacher: _Buckets, alpha: float) -> tuple[F64, F64, F64]:
    """GJS (T,), p·∂D/∂p on the support (T, K) and on the tail (T, 1)."""
    support_value, support_p_dd_dp = _divergence_terms(
        student.p, student.logp, teacher.p, teacher.logp, alpha
    )
    tail_value, tail_p_dd_dp = _divergence_terms(
        student.tail_p, student.tail_logp, teacher.tail_p, teacher.tail_logp, alpha
    )
    return support_value + tail_value, support_p_dd_dp, tail_p_dd_dp


def _fold_tail(student: _Buckets, support_p_dd_dp: F64, tail_p_dd_dp: F64) -> F64:
    """∂D/∂s_j = p_j·(∂D/∂p_j − ∂D/∂p_tail), in place in `support_p_dd_dp`.

    The tail mass is ≥ ~1e-7, so dividing by it is safe. A clamped tail is a constant of the
    forward computation and contributes nothing.
    """
    dd_dtail = np.where(student.tail_clamped, 0.0, tail_p_dd_dp / student.tail_p)
    support_p_dd_dp -= student.p * dd_dtail
    return support_p_dd_dp


def _topk_pair(student_logprobs: npt.ArrayLike, teacher_logprobs: npt.ArrayLike) -> tuple[F64, F64]:
    student, teacher = _logprob_pair(
        student_logprobs, "student_logprobs", teacher_logprobs, "teacher_logprobs", ndim=2
    )
    if student.shape[1] == 0:
        raise ValueError("student_logprobs and teacher_logprobs need K >= 1 top-K ids, got K = 0")
    return student, teacher


def _block_buckets(student: F64, teacher: F64, rows: slice) -> tuple[_Buckets, _Buckets]:
    return (
        _Buckets(student[rows], "student_logprobs", rows.start),
        _Buckets(teacher[rows], "teacher_logprobs", rows.start),
    )


def gjs(student_logprobs: npt.ArrayLike, teacher_logprobs: npt.ArrayLike, alpha: float) -> F64:
    """GJS_α(S‖T) per position (T,), float64.

    Both inputs are (T, K): full-vocabulary log-probs of the teacher's top-K ids at each position,
    under the student and under the teacher. α weights the teacher (0: KL(T‖S), 1: KL(S‖T)).
    """
    alpha = _check_alpha(alpha)
    student, teacher = _topk_pair(student_logprobs, teacher_logprobs)
    value = np.empty(student.shape[0])
    for rows in _row_blocks(*student.shape):
        value[rows], _, _ = _gjs_parts(*_block_buckets(student, teacher, rows), alpha)
    return value


def gjs_grad(student_logprobs: npt.ArrayLike, teacher_logprobs: npt.ArrayLike, alpha: float) -> F64:
    """∂gjs_t / ∂student_logprobs[t, k] (T, K), with the tail bucket folded into the K ids."""
    return gjs_and_grad(student_logprobs, teacher_logprobs, alpha)[1]


def gjs_and_grad(
    student_logprobs: npt.ArrayLike, teacher_logprobs: npt.ArrayLike, alpha: float
) -> tuple[F64, F64]:
    """``(gjs(...), gjs_grad(...))`` from one pass; the engine uses this one."""
    alpha = _check_alpha(alpha)
    student, teacher = _topk_pair(student_logprobs, teacher_logprobs)
    value, grad = np.empty(student.shape[0]), np.empty(student.shape)
    for rows in _row_blocks(*student.shape):
        student_block, teacher_block = _block_buckets(student, teacher, rows)
        value[rows], support_p_dd_dp, tail_p_dd_dp = _gjs_parts(student_block, teacher_block, alpha)
        grad[rows] = _fold_tail(student_block, support_p_dd_dp, tail_p_dd_dp)
    return value, grad


# ---------------------------------------------------------------- sampled-token terms


def importance_ratio(
    student_logprobs: npt.ArrayLike, behavior_logprobs: npt.ArrayLike, is_clip: float
) -> F64:
    """r_t = min(exp(clamp(s_t − behavior_t, ±20)), is_clip) (T,); a constant in the gradient.

    Inputs are (T,) log-probs of the sampled tokens under the current student and under the
    rollout's (behavior) weights.
    """
    is_clip = _check_finite(is_clip, "is_clip")
    if is_clip <= 0.0:
        raise ValueError(f"is_clip must be > 0, got {is_clip}")
    student, behavior = _logprob_pair(
        student_logprobs, "student_logprobs", behavior_logprobs, "behavior_logprobs", ndim=1
    )
    log_ratio = np.clip(student - behavior, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return np.minimum(np.exp(log_ratio), is_clip)


def k3(base_logprobs: npt.ArrayLike, student_logprobs: npt.ArrayLike) -> F64:
    """Schulman's k3 estimate of KL(S‖base) per sampled token (T,): exp(b − s) − 1 − (b − s) ≥ 0."""
    base, student = _logprob_pair(
        base_logprobs, "base_logprobs", student_logprobs, "student_logprobs", ndim=1
    )
    # s is the log-prob of a token the student sampled, so b − s stays far from exp's overflow.
    log_ratio = base - student
    return np.expm1(log_ratio) - log_ratio


def k3_grad(base_logprobs: npt.ArrayLike, student_logprobs: npt.ArrayLike) -> F64:
    """∂k3_t / ∂student_logprobs[t] (T,): 1 − exp(b − s)."""
    base, student = _logprob_pair(
        base_logprobs, "base_logprobs", student_logprobs, "student_logprobs", ndim=1
    )
    return -np.expm1(base - student)


def scalar_kl_advantages(
    student_logprobs: npt.ArrayLike, teacher_logprobs: npt.ArrayLike, kl_coef: float
) -> tuple[F64, float]:
    """Advantages kl_coef·gain·Δ (T,) and the gain, Δ = teacher − student at the sampled tokens.

    gain = clamp(0.03 / mean|Δ|, 1, 4); mean|Δ| = 0 (including T = 0) gives gain 4.
    """
    kl_coef = _check_finite(kl_coef, "kl_coef")
    student, teacher = _logprob_pair(
        student_logprobs, "student_logprobs", teacher_logprobs, "teacher_logprobs", ndim=1
    )
    delta = teacher - student
    mean_abs = float(np.abs(delta).mean()) if delta.size else 0.0
    # Bounding the denominator first keeps 0.03 / mean|Δ| finite for mean|Δ| = 0.
    gain = GAIN_TARGET / max(mean_abs, GAIN_TARGET / GAIN_MAX)
    gain = min(GAIN_MAX, max(GAIN_MIN, gain))
    return kl_coef * gain * delta, gain
