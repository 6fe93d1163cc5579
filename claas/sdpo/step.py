"""One SDPO training step, and the scores it needs: the teacher's view of every sample before
the steps, the student's at each step and after the last.

`SDPOLoss` is the step's loss as a Tinker custom loss: it turns the current student's log-probs
(from the step's own forward) into the loss terms of `claas.sdpo.datums` through the strategy
(`claas.sdpo.strategies`), and returns a tensor whose gradient with respect to the log-probs is
the strategy's `cross_entropy` weights. `train_step` runs it with an `optim_step`, pipelined;
`request_metrics` summarises the steps for the trained version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Generic

import numpy as np
import torch
from tinker import types

from claas.sdpo import datums
from claas.sdpo.config import StepMetrics, TrainingConfig
from claas.sdpo.strategies import (
    Prepared,
    Scored,
    Strategy,
    TeacherT,
    rollout_statistics,
    sample_statistics,
)
from claas.services.protocol import SamplingClient, TrainingClient


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


async def score(
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


async def score_student(
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


async def train_step(
    strategy: Strategy[TeacherT],
    trainer: TrainingClient,
    scored: list[Scored[TeacherT]],
    data: list[types.Datum],
    config: TrainingConfig,
    step: int,
    learning_rate: float,
) -> StepMetrics:
    """One step: `forward_backward_custom` with `SDPOLoss`, and an `optim_step`, pipelined."""
    clock = time.perf_counter()
    loss = SDPOLoss(strategy, scored)
    adam = types.AdamParams(learning_rate=learning_rate, grad_clip_norm=config.max_grad_norm)
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


def request_metrics(
    scored: list[Scored[TeacherT]],
    steps: list[StepMetrics],
    after: list[tuple[datums.LossTerms, float | None]],
    config: TrainingConfig,
    learning_rate: float,
) -> dict[str, float | int | str]:
    """The request's metrics: its first step's loss and divergence beside the final ones
    (`after`), and the means over its steps."""
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
        "learning_rate": learning_rate,
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
