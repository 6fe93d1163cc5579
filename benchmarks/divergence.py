"""How fast is claas.sdpo.divergence on one realistic batch (T = 4096 positions, K = 100)?

Prints ratios, not seconds, so the figures mean the same on any machine:
- the speed-up of ``gjs`` over a plain Python loop (math module) over positions and buckets;
- the cost of ``gjs`` + ``gjs_grad``, and of ``gjs_and_grad``, in units of one ``np.exp`` pass
  over a (T, K) float64 array.

Run: ``.venv/bin/python benchmarks/divergence.py``
"""

import math
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from claas.sdpo.divergence import TAIL_LSE_CAP, gjs, gjs_and_grad, gjs_grad

F64 = NDArray[np.float64]

POSITIONS = 4096
TOP_K = 100
VOCAB = 2000
ALPHA = 0.5
LOOP_ROWS = 256  # the Python loop runs on this many rows and is scaled to POSITIONS
REPEATS = 7

SPEEDUP_TARGET = 20.0
EXP_PASS_TARGET = 12.0


def log_softmax(logits: F64) -> F64:
    shifted = logits - logits.max(axis=1, keepdims=True)
    normalised: F64 = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return normalised


def realistic_inputs(seed: int = 0) -> tuple[F64, F64]:
    """Student and teacher log-probs at the teacher's top-K ids, from nearby random logits."""
    rng = np.random.default_rng(seed)
    teacher_logits = rng.normal(scale=3.0, size=(POSITIONS, VOCAB))
    student_logits = teacher_logits + rng.normal(scale=1.0, size=(POSITIONS, VOCAB))
    teacher_full, student_full = log_softmax(teacher_logits), log_softmax(student_logits)
    top_k = np.argpartition(-teacher_full, TOP_K, axis=1)[:, :TOP_K]
    return (
        np.take_along_axis(student_full, top_k, axis=1),
        np.take_along_axis(teacher_full, top_k, axis=1),
    )


def python_loop_gjs(student: F64, teacher: F64, alpha: float) -> list[float]:
    """The straightforward baseline: one position and one bucket at a time."""

    def buckets(row: list[float]) -> list[float]:
        lse = min(math.log(sum(math.exp(v) for v in row)), TAIL_LSE_CAP)
        return [*row, math.log1p(-math.exp(lse))]

    values = []
    for student_row, teacher_row in zip(student.tolist(), teacher.tolist(), strict=True):
        total = 0.0
        for log_p, log_q in zip(buckets(student_row), buckets(teacher_row), strict=True):
            p, q = math.exp(log_p), math.exp(log_q)
            log_m = math.log(alpha * q + (1 - alpha) * p)
            total += alpha * q * (log_q - log_m) + (1 - alpha) * p * (log_p - log_m)
        values.append(total)
    return values


def best_time(call: Callable[[], object], repeats: int = REPEATS) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    student, teacher = realistic_inputs()
    subset_student, subset_teacher = student[:LOOP_ROWS], teacher[:LOOP_ROWS]
    np.testing.assert_allclose(
        gjs(subset_student, subset_teacher, ALPHA),
        python_loop_gjs(subset_student, subset_teacher, ALPHA),
        rtol=1e-9,
        atol=1e-12,
    )

    exp_pass = best_time(lambda: np.exp(student))
    loop = best_time(lambda: python_loop_gjs(subset_student, subset_teacher, ALPHA), repeats=3)
    loop *= POSITIONS / LOOP_ROWS
    value_only = best_time(lambda: gjs(student, teacher, ALPHA))
    separate = best_time(lambda: (gjs(student, teacher, ALPHA), gjs_grad(student, teacher, ALPHA)))
    fused = best_time(lambda: gjs_and_grad(student, teacher, ALPHA))

    rows = [
        ("gjs speed-up over Python loop", loop / value_only, f">= {SPEEDUP_TARGET:g}x", True),
        ("gjs + gjs_grad, in np.exp passes", separate / exp_pass, f"<= {EXP_PASS_TARGET:g}", False),
        ("gjs_and_grad, in np.exp passes", fused / exp_pass, f"<= {EXP_PASS_TARGET:g}", False),
        ("gjs alone, in np.exp passes", value_only / exp_pass, "-", None),
    ]
    print(f"T={POSITIONS} K={TOP_K} vocab={VOCAB} alpha={ALPHA}; best of {REPEATS}")
    print(
        f"Python loop timed on {LOOP_ROWS} of {POSITIONS} rows and scaled by"
        f" {POSITIONS // LOOP_ROWS}; one np.exp pass = {exp_pass * 1e3:.2f} ms"
    )
    print(f"{'measure':<36}{'ratio':>9}  {'target':<9}result")
    for name, ratio, target, higher_is_better in rows:
        if higher_is_better is None:
            verdict = ""
        elif higher_is_better:
            verdict = "PASS" if ratio >= SPEEDUP_TARGET else "MISS"
        else:
            verdict = "PASS" if ratio <= EXP_PASS_TARGET else "MISS"
        print(f"{name:<36}{ratio:>9.1f}  {target:<9}{verdict}")


if __name__ == "__main__":
    main()
