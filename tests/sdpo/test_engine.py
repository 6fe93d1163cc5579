"""The SDPO engine on the local service: exact gradients, the learning signal, failure hygiene.

The loss in `test_topk_gradient_is_exact` is written here independently, in torch, from the
conventions in `claas.sdpo.divergence`: token mean of r_t·GJS_t + kl_reg_weight·k3_t per
sample, mean over samples; on the teacher's demonstrations, GJS at alpha 0 (forward KL) with
r_t = 1 and no k3. It is checked at both steps of a two-step request, on a tiny model sharp
enough that GJS, not k3, makes most of the gradient: the reference student carries the weights
the engine had at each step, the teacher stays the version trained from.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker
import torch
from peft import PeftModel
from pydantic import ValidationError
from tinker import types

from claas.adapters import Adapters, AdapterSpec
from claas.errors import Conflict, ContextTooLong, InvalidFeedback
from claas.feedback import train_and_register
from claas.models import LoadedModel, tiny_llama
from claas.sdpo import datums, divergence
from claas.sdpo.config import Lesson, TrainedCheckpoint, TrainFrom
from claas.sdpo.engine import FeedbackSample, SDPOEngine, TrainingConfig, default_learning_rate
from claas.sdpo.prompts import (
    EXAMPLE_INTRO,
    EXAMPLE_OUTRO,
    chat_prompt_tokens,
    rollout_teacher_prompt_tokens,
    teacher_prompt_tokens,
)
from claas.services.local import LocalServiceClient, LocalTrainingClient
from claas.store import Store

LORA = "alice/assistant"
FEEDBACK = "Way too long. Answer in one short sentence."


class Harness:
    """A local service, a store and an engine in a temp dir."""

    def __init__(self, loaded: LoadedModel, root: Path) -> None:
        self.root = root
        self.service = LocalServiceClient(loaded, root / "checkpoints")
        self.store = Store(root / "claas.db")
        self.adapters = Adapters(self.service, self.store, loaded.name)
        self.engine = SDPOEngine(self.service, loaded.name, loaded.max_context)
        self.version = 0  # the version the last `distill` registered
        self.tokenizer = loaded.tokenizer

    def run(self, coroutine: Any) -> Any:
        return asyncio.run(coroutine)

    def distill(self, samples: list[FeedbackSample], config: TrainingConfig) -> TrainedCheckpoint:
        """Train and register, as the feedback queue does."""
        version, trained = self.run(train_and_register(self.engine, self.store, samples, config))
        self.version = version.version
        return trained

    def rollout(
        self, question: str, max_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> tuple[list[dict[str, Any]], list[int], types.SampledSequence]:
        """Sample an answer from the adapter's current version, as the API would."""
        messages = [{"role": "user", "content": question}]
        prompt = chat_prompt_tokens(self.tokenizer, messages)
        version = self.store.latest_version(LORA)
        assert version is not None
        sampler = self.service.create_sampling_client(model_path=version.sampler_path).result()
        params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        sequence = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()
        return messages, prompt, sequence.sequences[0]

    def sample_for(
        self, question: str, max_tokens: int = 12, temperature: float = 1.0, seed: int = 0
    ) -> FeedbackSample:
        messages, prompt, sequence = self.rollout(question, max_tokens, temperature, seed)
        return FeedbackSample(
            lora_id=LORA,
            messages=messages,
            prompt_tokens=prompt,
            response_tokens=sequence.tokens,
            behavior_logprobs=list(sequence.logprobs or []),
            feedback=FEEDBACK,
        )

    def checkpoint_files(self) -> set[Path]:
        return {p for p in (self.root / "checkpoints").rglob("*") if p.is_file()}

    def close(self) -> None:
        self.service.close()
        self.store.close()


SHARP: dict[str, Any] = {"initializer_range": 0.3}
"""LlamaConfig overrides for a tiny model with peaked logits. The default one's are nearly
uniform, so its GJS gradient is lost next to k3's; a much sharper one is chaotic: the feedback
prompt moves the teacher's top-K to ids where the student has no mass, and GJS saturates."""


def started(loaded: LoadedModel, root: Path) -> Harness:
    h = Harness(loaded, root)
    h.run(h.adapters.init(LORA, AdapterSpec(rank=4, seed=0)))
    return h


@pytest.fixture
def harness(model_cache: Path, tmp_path: Path) -> Iterator[Harness]:
    h = started(tiny_llama(model_cache, seed=0), tmp_path)
    yield h
    h.close()


@pytest.fixture
def sharp_harness(model_cache: Path, tmp_path: Path) -> Iterator[Harness]:
    h = started(tiny_llama(model_cache, seed=0, **SHARP), tmp_path)
    yield h
    h.close()


class GradientSpy:
    """A spy (not a fake) on the local training client: it records the accumulated LoRA
    gradients just before each `optim_step`, and counts steps. Everything runs for real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        real_step = LocalTrainingClient.optim_step
        spy = self

        def optim_step(client: LocalTrainingClient, *args: Any, **kwargs: Any) -> Any:
            def record() -> None:
                params = client.lora_parameters()
                spy.grads.append(
                    {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
                )
                spy.weights.append({n: p.detach().clone() for n, p in params.items()})

            client.host.submit(record)  # runs on the worker, after forward_backward
            return real_step(client, *args, **kwargs)

        monkeypatch.setattr(LocalTrainingClient, "optim_step", optim_step)


def perturb_latest(h: Harness, seed: int = 3, scale: float = 0.2) -> None:
    """Replace the latest version by one with non-zero B, so every LoRA weight gets gradient."""
    version = h.store.latest_version(LORA)
    assert version is not None
    trainer = h.service.create_training_client_from_state_with_optimizer(
        version.state_path
    ).result()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainer.lora_parameters().values():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    state = trainer.save_state("perturbed").result().path
    sampler = trainer.save_weights_for_sampler("perturbed").result().path
    h.store.add_version(LORA, state, sampler, None, {})


# ---------------------------------------------------------------------------------------------
# The independent reference loss (torch, float32 model, float64 divergence)
# ---------------------------------------------------------------------------------------------


def reference_gjs(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """GJS over K+1 buckets from (T, K) log-probs, written here in torch (not with `divergence`)."""

    def buckets(logprobs: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logprobs, dim=-1, keepdim=True).clamp(max=-1e-7)
        tail = torch.log1p(-torch.exp(lse))
        return torch.cat([logprobs, tail], dim=-1).exp()

    p, q = buckets(s), buckets(t)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.log() - b.log())).sum(-1)

    if alpha == 0.0:
        return kl(q, p)
    if alpha == 1.0:
        return kl(p, q)
    m = alpha * q + (1 - alpha) * p
    return alpha * kl(q, m) + (1 - alpha) * kl(p, m)


def reference_teacher_prompt(
    tokenizer: Any, sample: FeedbackSample, config: TrainingConfig
) -> list[int]:
    return teacher_prompt_tokens(
        tokenizer, sample.messages, sample.feedback, config.feedback_repetitions, config.hindsight
    )


def reference_demonstrations(
    teacher: Any, samples: list[FeedbackSample], tokenizer: Any, config: TrainingConfig
) -> list[FeedbackSample]:
    """The teacher's greedy answers (HF `generate`) to the first prompts, no longer than the
    longest rollout. Their behaviour log-probs are unused: a demonstration has weight 1."""
    longest = max(len(s.response_tokens) for s in samples)
    demonstrations = []
    for sample in samples[: config.teacher_demonstrations]:
        teacher_prompt = reference_teacher_prompt(tokenizer, sample, config)
        with torch.no_grad():
            out = teacher.generate(
                torch.tensor([teacher_prompt]),
                max_new_tokens=longest,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        answer = out[0, len(teacher_prompt) :].tolist()
        demonstrations.append(
            sample.model_copy(
                update={"response_tokens": answer, "behavior_logprobs": [0.0] * len(answer)}
            )
        )
    return demonstrations


@dataclass
class Reference:
    """Independent models: plain PEFT on the version's checkpoint (the student, and the teacher
    when it is the adapter: the version trained FROM, which does not move), an untouched base."""

    student: Any
    teacher: Any
    base: Any
    params: dict[str, torch.nn.Parameter]

    @classmethod
    def of(cls, harness: Harness, model_cache: Path, state_path: str, teacher: str) -> Reference:
        def fresh() -> Any:
            return tiny_llama(model_cache, seed=0, **SHARP).model

        base = fresh()
        state_dir = harness.service.checkpoint_dir(state_path)
        student = PeftModel.from_pretrained(fresh(), state_dir)
        scorer = PeftModel.from_pretrained(fresh(), state_dir) if teacher == "adapter" else base
        params = {
            n.replace(".default.", "."): p for n, p in student.named_parameters() if "lora" in n
        }
        return cls(student, scorer, base, params)

    def gradient(
        self, weights: dict[str, torch.Tensor], loss: Any
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The gradient and value of `loss()` with the student's LoRA weights set to `weights`."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name])
                param.requires_grad_(True)
                param.grad = None
        value = loss()
        value.backward()
        return {n: p.grad for n, p in self.params.items() if p.grad is not None}, float(value)


def reference_loss(
    ref: Reference,
    samples: list[FeedbackSample],
    tokenizer: Any,
    config: TrainingConfig,
    rollouts: int | None = None,
) -> torch.Tensor:
    """Samples past the first `rollouts` are the teacher's demonstrations."""
    rollouts = len(samples) if rollouts is None else rollouts
    per_sample = []
    for index, sample in enumerate(samples):
        prompt, response = sample.prompt_tokens, sample.response_tokens
        teacher_prompt = reference_teacher_prompt(tokenizer, sample, config)
        n_q, n_p, n_t = len(teacher_prompt), len(prompt), len(response)
        with torch.no_grad():
            teacher_input = torch.tensor([teacher_prompt + response])
            teacher_logits = ref.teacher(input_ids=teacher_input).logits[0]
            teacher_all = torch.log_softmax(teacher_logits.double(), -1)[n_q - 1 : n_q - 1 + n_t]
            base_logits = ref.base(input_ids=torch.tensor([prompt + response])).logits[0]
            base_all = torch.log_softmax(base_logits.double(), -1)[n_p - 1 : n_p - 1 + n_t]
        teacher_top, teacher_ids = teacher_all.topk(config.teacher_top_k, dim=-1)
        logits = ref.student(input_ids=torch.tensor([prompt + response])).logits[0]
        student_all = torch.log_softmax(logits.float(), -1)[n_p - 1 : n_p - 1 + n_t].double()
        s_support = student_all.gather(-1, teacher_ids)
        y = torch.tensor(response)[:, None]
        s_y = student_all.gather(-1, y)[:, 0]
        b_y = base_all.gather(-1, y)[:, 0]
        if index < rollouts:
            behavior = torch.tensor(sample.behavior_logprobs, dtype=torch.float64)
            ratio = torch.exp((s_y.detach() - behavior).clamp(-20, 20)).clamp(max=config.is_clip)
            gjs_t = reference_gjs(s_support, teacher_top, config.alpha)
        else:  # a teacher demonstration: forward KL(teacher ‖ student), weight 1
            ratio = torch.ones_like(s_y)
            gjs_t = reference_gjs(s_support, teacher_top, 0.0)
        k3_t = torch.exp(b_y - s_y) - 1 - (b_y - s_y)  # KL(student ‖ base) on its own samples
        if index >= rollouts:
            k3_t = torch.zeros_like(k3_t)
        per_sample.append((ratio * gjs_t + config.kl_reg_weight * k3_t).mean())
    return torch.stack(per_sample).mean()


def max_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max |got − want| / max |want|, the worst over the LoRA tensors."""
    assert set(got) == set(want)
    return max(float((got[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-30)) for n in want)


GRADIENT_RTOL = 2e-4
"""The largest `max_relative_error` of the engine's gradient. The honest test measures under 1e-5
(float32 forward passes); 1 % more weight at the teacher's ids gives 1e-2, and 1 % more k3 (a
small part of the gradient here) 5e-4 to 8e-3 at one of the two steps."""


def gradient_samples(harness: Harness, clipped: bool) -> list[FeedbackSample]:
    """Two rollouts whose importance ratios differ from 1 (with `clipped`, one is clipped), so
    the ratios matter in the gradient."""
    samples = [
        harness.sample_for("Tell me about the sea.", seed=1),
        harness.sample_for("Name a colour.", max_tokens=7, seed=2),
    ]
    shifted = [*samples[0].behavior_logprobs]
    shifted[0] -= 0.4
    if clipped:
        shifted[1] -= 3.0  # exp(3) ≈ 20 > is_clip = 5, so this ratio is clipped
    samples[0] = samples[0].model_copy(update={"behavior_logprobs": shifted})
    return samples


def run_custom_losses_in_two_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosted Tinker's way with a custom loss, in place of the local one pass: a stand-in for
    the hosted service (which cannot run here), built from the SDK's own code. A forward scores
    the targets, the SDK's `_compute_custom_loss` differentiates the loss into weights on the
    client, and a `cross_entropy` forward_backward applies them. (The SDK methods are private:
    tinker is pinned in pyproject.toml.)"""
    sdk = tinker.TrainingClient

    def two_passes(client: LocalTrainingClient, data: Any, loss_fn: Any, **_: Any) -> Any:
        scoring = sdk._get_custom_loss_forward_data(None, data, "cross_entropy")  # type: ignore[arg-type]
        forward = client.forward(scoring, "cross_entropy").result()
        linear = sdk._compute_custom_loss(data, loss_fn, forward)
        return client.forward_backward(linear.data, "cross_entropy")

    monkeypatch.setattr(LocalTrainingClient, "forward_backward_custom", two_passes)


@pytest.mark.parametrize(
    ("alpha", "teacher", "demonstrations", "hindsight", "passes"),
    [
        (0.5, "adapter", 1, "instruction", 1),
        (0.0, "adapter", 2, "instruction", 1),
        (1.0, "base", 0, "context", 1),
        (0.5, "adapter", 1, "instruction", 2),  # as on hosted Tinker
    ],
)
def test_topk_gradient_is_exact(
    sharp_harness: Harness,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    alpha: float,
    teacher: Any,
    demonstrations: int,
    hindsight: Any,
    passes: int,
) -> None:
    """Two steps, each gradient against autograd of the reference loss. The sharp model makes
    GJS most of the gradient (k3 stays, at a small weight); step 2 sees a moved student, while
    the teacher and its demonstrations stay those of the version trained from. With 2 passes
    the SDPO loss runs as the SDK runs it against hosted Tinker."""
    harness = sharp_harness
    if passes == 2:
        run_custom_losses_in_two_passes(monkeypatch)
    perturb_latest(harness, scale=5e-4)  # a student near the base, so k3 is a small part
    version = harness.store.latest_version(LORA)
    assert version is not None
    samples = gradient_samples(harness, clipped=True)
    config = TrainingConfig(
        steps_per_batch=2,
        teacher_top_k=6,
        alpha=alpha,
        kl_reg_weight=0.05,
        learning_rate=1e-4,
        teacher=teacher,
        teacher_demonstrations=demonstrations,
        hindsight=hindsight,
    )
    spy = GradientSpy(monkeypatch)
    result = harness.distill(samples, config)
    assert result.metrics["clip_fraction"] > 0
    assert result.metrics["demonstrations"] == demonstrations
    assert len(spy.grads) == len(spy.weights) == 2

    ref = Reference.of(harness, model_cache, version.state_path, teacher)
    batch = samples + reference_demonstrations(ref.teacher, samples, harness.tokenizer, config)
    assert len(result.teacher_texts) == len(batch)
    for text, sample in zip(result.teacher_texts, batch, strict=True):
        assert text.endswith(harness.tokenizer.decode(sample.response_tokens))
    assert max_relative_error(spy.weights[0], ref.params) == 0  # step 1 trains the checkpoint
    assert max_relative_error(spy.weights[1], spy.weights[0]) > 1e-2  # step 2 sees a moved one

    def loss() -> torch.Tensor:
        return reference_loss(ref, batch, harness.tokenizer, config, 2)

    for step, (got, weights) in enumerate(zip(spy.grads, spy.weights, strict=True)):
        want, value = ref.gradient(weights, loss)
        error = max_relative_error(got, want)
        assert error < GRADIENT_RTOL, f"step {step + 1}: gradient off by {error:.3g}"
        assert result.steps[step].loss == pytest.approx(value, rel=1e-4)


def reference_scalar_loss(
    ref: Reference,
    samples: list[FeedbackSample],
    tokenizer: Any,
    config: TrainingConfig,
) -> torch.Tensor:
    """Scalar mode's surrogate, written here in torch: per sample the token mean of
    −r_t·A_t·s_t + λ·k3_t, with A_t = kl_coef·gain·(T_t − s_t), gain = clamp(0.03 / mean|Δ|,
    1, 4), and r_t, A_t constants; then the mean over samples."""
    per_sample = []
    for sample in samples:
        prompt, response = sample.prompt_tokens, sample.response_tokens
        teacher_prompt = reference_teacher_prompt(tokenizer, sample, config)
        n_q, n_p, n_t = len(teacher_prompt), len(prompt), len(response)
        y = torch.tensor(response)[:, None]
        with torch.no_grad():
            logits = ref.teacher(input_ids=torch.tensor([teacher_prompt + response])).logits[0]
            t_y = torch.log_softmax(logits.double(), -1)[n_q - 1 : n_q - 1 + n_t].gather(-1, y)
            logits = ref.base(input_ids=torch.tensor([prompt + response])).logits[0]
            b_y = torch.log_softmax(logits.double(), -1)[n_p - 1 : n_p - 1 + n_t].gather(-1, y)
        logits = ref.student(input_ids=torch.tensor([prompt + response])).logits[0]
        s_y = torch.log_softmax(logits.float(), -1)[n_p - 1 : n_p - 1 + n_t].double()
        s_y = s_y.gather(-1, y)[:, 0]
        t_y, b_y = t_y[:, 0], b_y[:, 0]
        delta = t_y - s_y.detach()
        gain = (0.03 / delta.abs().mean()).clamp(1.0, 4.0)
        advantage = config.kl_coef * gain * delta
        behavior = torch.tensor(sample.behavior_logprobs, dtype=torch.float64)
        ratio = torch.exp((s_y.detach() - behavior).clamp(-20, 20)).clamp(max=config.is_clip)
        k3_t = torch.exp(b_y - s_y) - 1 - (b_y - s_y)
        per_sample.append((-ratio * advantage * s_y + config.kl_reg_weight * k3_t).mean())
    return torch.stack(per_sample).mean()


def test_scalar_gradient_is_exact(
    sharp_harness: Harness, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scalar mode's advantages, applied as `cross_entropy` weights, against autograd of its
    surrogate written in torch, at two steps."""
    harness = sharp_harness
    perturb_latest(harness, scale=5e-4)
    version = harness.store.latest_version(LORA)
    assert version is not None
    samples = gradient_samples(harness, clipped=False)
    config = TrainingConfig(
        use_topk_divergence=False,
        steps_per_batch=2,
        kl_reg_weight=0.05,
        kl_coef=0.7,
        learning_rate=1e-3,
        teacher="adapter",
        teacher_demonstrations=0,
    )
    spy = GradientSpy(monkeypatch)
    harness.distill(samples, config)
    assert len(spy.grads) == 2

    ref = Reference.of(harness, model_cache, version.state_path, "adapter")
    assert max_relative_error(spy.weights[1], spy.weights[0]) > 1e-3  # step 2 sees a moved one

    def loss() -> torch.Tensor:
        return reference_scalar_loss(ref, samples, harness.tokenizer, config)

    for step, (got, weights) in enumerate(zip(spy.grads, spy.weights, strict=True)):
        error = max_relative_error(got, ref.gradient(weights, loss)[0])
        assert error < GRADIENT_RTOL, f"step {step + 1}: gradient off by {error:.3g}"


def test_first_step_is_topk_and_moves_gjs(harness: Harness) -> None:
    perturb_latest(harness)
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    # The base teacher: far from the perturbed version, so one step visibly closes the gap.
    config = TrainingConfig(steps_per_batch=1, learning_rate=1e-2, teacher="base")
    result = harness.distill(samples, config)
    assert result.divergence_mode == "topk_gjs"
    assert result.metrics["divergence_mode"] == "topk_gjs"
    assert result.metrics["steps_per_batch_applied"] == 1
    assert result.metrics["gjs_mean_after"] < result.metrics["gjs_mean"]
    assert result.steps[0].mean_is_ratio == pytest.approx(1.0, abs=1e-3)  # on-policy step 1
    assert harness.version == 3 and result.trained_from == 2
    assert harness.store.latest_version(LORA).version == 3  # type: ignore[union-attr]
    assert "(Instruction for your answer: " + FEEDBACK + ")" in result.teacher_texts[0]
    assert set(result.timings) >= {"teacher_scoring", "train", "final_scoring", "save"}


def test_demonstrations_are_weighted_one_at_every_step(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollout keeps its behaviour log-probs across steps (its ratio drifts); a teacher
    demonstration is compared with the current student (ratio 1) and trained at alpha 0."""
    calls: list[tuple[np.ndarray, np.ndarray, float]] = []
    real = datums.topk_loss_terms

    def spy(student: Any, teacher: Any, behavior: Any, *args: Any) -> Any:
        calls.append((np.asarray(student.sampled), np.asarray(behavior), args[1]))
        return real(student, teacher, behavior, *args)

    monkeypatch.setattr(datums, "topk_loss_terms", spy)
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    config = TrainingConfig(steps_per_batch=3, learning_rate=5e-3, teacher_demonstrations=1)
    result = harness.distill(samples, config)
    assert result.metrics["samples"] == 1 and result.metrics["demonstrations"] == 1
    rollout_calls, demo_calls = calls[0::2], calls[1::2]
    assert len(demo_calls) == 4  # 3 steps and the final scoring
    for sampled, behavior, alpha in demo_calls:
        np.testing.assert_array_equal(behavior, sampled)
        assert alpha == 0.0
    assert all(alpha == config.alpha for _, _, alpha in rollout_calls)
    first, last = rollout_calls[0], rollout_calls[-1]
    np.testing.assert_array_equal(first[1], last[1])  # the rollout's behaviour, unchanged
    assert not np.allclose(last[0], last[1])  # while the student moved


def test_multi_step_keeps_the_rollout_behavior(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    spy = GradientSpy(monkeypatch)
    config = TrainingConfig(steps_per_batch=4, learning_rate=5e-3)
    result = harness.distill(samples, config)
    assert len(spy.grads) == 4 and len(result.steps) == 4
    assert result.metrics["steps_per_batch_applied"] == 4
    ratios = [s.mean_is_ratio for s in result.steps]
    assert ratios[0] == pytest.approx(1.0, abs=1e-3)
    # Later steps compare the moved student with the *rollout's* log-probs, so r drifts from 1.
    assert abs(ratios[-1] - 1.0) > 1e-3
    moved = [
        any(not torch.equal(a[n], b[n]) for n in a)
        for a, b in zip(spy.weights, spy.weights[1:], strict=False)
    ]
    assert all(moved)  # every step changed the weights


def test_student_scores_take_back_a_trainers_rounding() -> None:
    """A trainer's rounded normaliser shifts a whole row: a top-K mass over 1 (which the
    divergence refuses) is shifted back; a row within 1 is untouched; an overshoot beyond
    rounding is an error."""
    teacher = np.log(np.array([[0.7, 0.2]]))
    exact = np.log(np.array([[0.8, 0.2 - 1e-9, 1e-9]]))  # top-2, then y_t outside them
    prompt = [1, 2, 3]
    rows = np.vstack([np.zeros((2, 3)), exact])  # two prompt rows, then the response row
    untouched = datums.student_scores(rows, len(prompt), k=2)
    assert untouched.at_teacher_ids is not None
    np.testing.assert_array_equal(untouched.at_teacher_ids, exact[:, :2])
    np.testing.assert_array_equal(untouched.sampled, exact[:, 2])
    with pytest.raises(ValueError, match="top-K mass"):
        divergence.gjs(exact[:, :2] + 3e-6, teacher, 0.5)  # what the shift avoids
    for shift in (3e-6, 5e-5):
        student = datums.student_scores(rows + shift, len(prompt), k=2)
        assert student.at_teacher_ids is not None
        assert np.logaddexp.reduce(student.at_teacher_ids, axis=1).max() <= 1e-12
        np.testing.assert_allclose(student.at_teacher_ids, exact[:, :2], rtol=0, atol=1e-8)
        np.testing.assert_allclose(student.sampled, exact[:, 2], rtol=0, atol=1e-8)
        divergence.gjs(student.at_teacher_ids, teacher, 0.5)  # accepted
    with pytest.raises(ValueError, match="full-vocabulary"):
        datums.student_scores(rows + 1e-3, len(prompt), k=2)
    sampled = datums.student_scores(np.array([0.0, 0.0, 2e-6, -0.5]), len(prompt), k=None)
    np.testing.assert_array_equal(sampled.sampled, [0.0, -0.5])
    assert sampled.at_teacher_ids is None


def test_scalar_mode_trains_with_importance_sampling_advantages(harness: Harness) -> None:
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    config = TrainingConfig(use_topk_divergence=False, steps_per_batch=2, learning_rate=1e-2)
    result = harness.distill(samples, config)
    assert result.divergence_mode == "scalar_kl"
    assert result.metrics["divergence_mode"] == "scalar_kl"
    assert "gjs_mean" not in result.metrics
    assert 1.0 <= float(result.metrics["adv_gain"]) <= 4.0
    assert result.steps[0].adv_abs_mean is not None and result.steps[0].adv_abs_mean > 0


def test_failure_mid_request_leaves_no_trace(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    before_version = harness.store.latest_version(LORA)
    before_files = harness.checkpoint_files()

    def broken_save(*args: Any, **kwargs: Any) -> Any:  # injected failure after save_state
        raise OSError("disk full (injected)")

    monkeypatch.setattr(LocalTrainingClient, "save_weights_for_sampler", broken_save)
    with pytest.raises(OSError, match="injected"):
        harness.distill(samples, TrainingConfig(steps_per_batch=1))
    assert harness.store.latest_version(LORA) == before_version
    assert [v.version for v in harness.store.list_versions(LORA)] == [1]
    harness.service.host.submit(lambda: None).result()  # let queued cleanup finish
    assert harness.checkpoint_files() == before_files
    staging = [p for p in (harness.root / "checkpoints").rglob(".*")]
    assert staging == []


def test_validation_errors(harness: Harness) -> None:
    good = harness.sample_for("Tell me about the sea.", seed=1)
    config = TrainingConfig(steps_per_batch=1)

    def distill(samples: list[FeedbackSample]) -> Any:
        return harness.distill(samples, config)

    with pytest.raises(InvalidFeedback, match="one request trains one adapter"):
        distill([good, good.model_copy(update={"lora_id": "bob/other"})])
    with pytest.raises(InvalidFeedback, match="must align"):
        distill([good.model_copy(update={"behavior_logprobs": good.behavior_logprobs[:-1]})])
    with pytest.raises(InvalidFeedback, match="response is empty"):
        distill([good.model_copy(update={"response_tokens": [], "behavior_logprobs": []})])
    with pytest.raises(InvalidFeedback, match="finite"):
        distill([good.model_copy(update={"behavior_logprobs": [float("nan")] * 12})])
    long_turns = [{"role": "user", "content": "word " * 2500}, *good.messages]
    with pytest.raises(ContextTooLong, match="never truncated"):
        distill([good.model_copy(update={"messages": long_turns})])
    with pytest.raises(InvalidFeedback, match="no user turn"):
        distill([good.model_copy(update={"messages": [{"role": "system", "content": "x"}]})])
    with pytest.raises(ValidationError, match="feedback is empty"):
        FeedbackSample.model_validate({**good.model_dump(), "feedback": " "})
    for field, value in [("alpha", 1.5), ("teacher_top_k", 0), ("steps_per_batch", 65)]:
        with pytest.raises(ValidationError, match=field):
            TrainingConfig.model_validate({field: value})
    with pytest.raises(ValidationError, match="extra"):
        TrainingConfig.model_validate({"beta": 0.5})
    with pytest.raises(ValidationError, match="need the top-K divergence"):
        TrainingConfig(teacher_demonstrations=1, use_topk_divergence=False)
    with pytest.raises(ValidationError, match="teacher"):
        TrainingConfig.model_validate({"teacher": "gpt-4"})
    assert [v.version for v in harness.store.list_versions(LORA)] == [1]


# ---------------------------------------------------------------------------------------------
# The real model: the learning signal
# ---------------------------------------------------------------------------------------------


def end_of_turn_logprob(h: Harness, sample: FeedbackSample, model_path: str | None) -> float:
    """The student's mean log-prob of <|im_end|> over the response positions."""
    sampler = h.service.create_sampling_client(
        model_path=model_path, base_model=None if model_path else h.service.base_model
    ).result()
    eot = h.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = sample.prompt_tokens + sample.response_tokens
    ids = np.full((len(tokens) - 1, 1), -1, dtype=np.int64)
    ids[len(sample.prompt_tokens) - 1 :] = eot
    out = sampler.sample(
        types.ModelInput.from_ints(tokens),
        1,
        types.SamplingParams(max_tokens=1),
        target_prompt_logprobs=types.TensorData.from_numpy(ids),
    ).result()
    values = out.target_prompt_logprobs.to_numpy()[len(sample.prompt_tokens) - 1 :, 0]
    return float(values.mean())


@pytest.mark.real_model
@pytest.mark.parametrize("topk", [True, False], ids=["topk_gjs", "scalar_kl"])
def test_real_model_learns_from_feedback(smol: LoadedModel, tmp_path: Path, topk: bool) -> None:
    own = LoadedModel(smol.name, copy.deepcopy(smol.model), smol.tokenizer, smol.device)
    h = Harness(own, tmp_path)
    try:
        h.run(h.adapters.init(LORA, AdapterSpec(seed=0)))
        sample = h.sample_for("Explain how a rainbow forms.", max_tokens=64, temperature=0.0)
        before = h.store.latest_version(LORA)
        assert before is not None
        eot_before = end_of_turn_logprob(h, sample, before.sampler_path)
        config = TrainingConfig(use_topk_divergence=topk)  # the defaults
        result = h.distill([sample], config)
        after = h.store.latest_version(LORA)
        assert after is not None and after.version == h.version == 2
        eot_after = end_of_turn_logprob(h, sample, after.sampler_path)
        assert eot_after > eot_before, (eot_before, eot_after)
        if topk:
            assert result.metrics["gjs_mean_after"] < result.metrics["gjs_mean"]
    finally:
        h.close()


def test_rollback_during_training_discards_the_result(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    perturb_latest(harness)  # versions 1, 2
    samples = [harness.sample_for("Tell me about the sea.", seed=1)]
    before_files = harness.checkpoint_files()
    real_save = LocalTrainingClient.save_state

    def save_then_rollback(client: LocalTrainingClient, *args: Any, **kwargs: Any) -> Any:
        harness.store.rollback(LORA, 1)  # the user rolls back while the step is saving
        return real_save(client, *args, **kwargs)

    monkeypatch.setattr(LocalTrainingClient, "save_state", save_then_rollback)
    with pytest.raises(Conflict, match="changed while this request trained"):
        harness.distill(samples, TrainingConfig(steps_per_batch=1))
    assert harness.store.get_adapter(LORA).current_version == 1  # the rollback stands
    assert [v.version for v in harness.store.list_versions(LORA)] == [1, 2]
    harness.service.host.submit(lambda: None).result()
    assert harness.checkpoint_files() == before_files


def test_text_prompt_rollouts_get_a_raw_teacher_prompt(harness: Harness) -> None:
    prompt_text = "The capital of France is"
    prompt = [int(t) for t in harness.tokenizer.encode(prompt_text)]
    version = harness.store.latest_version(LORA)
    assert version is not None
    sampler = harness.service.create_sampling_client(model_path=version.sampler_path).result()
    out = sampler.sample(
        types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=6, seed=0)
    ).result()
    sample = FeedbackSample(
        lora_id=LORA,
        messages=[{"role": "user", "content": prompt_text}],
        prompt_tokens=prompt,
        response_tokens=out.sequences[0].tokens,
        behavior_logprobs=list(out.sequences[0].logprobs or []),
        feedback="Answer with one word.",
        prompt_format="text",
    )
    result = harness.distill([sample], TrainingConfig(steps_per_batch=1))
    teacher_text = result.teacher_texts[0]
    assert teacher_text.startswith(prompt_text + "\n\n(Instruction for your answer: Answer with")
    assert "<|im_start|>" not in teacher_text


def test_an_example_goes_into_the_teachers_prompt_only(harness: Harness) -> None:
    """`example` is shown to the teacher after the feedback, in both hindsight styles; the
    student's prompt and the response it trains on are its own."""
    example = "I'm Kuro, your assistant."
    sample = harness.sample_for("Who are you?", max_tokens=6).model_copy(
        update={"feedback": "Your name is Kuro.", "example": example}
    )
    for style in ("instruction", "context"):
        config = TrainingConfig(steps_per_batch=1, hindsight=style)
        teacher = harness.distill([sample], config).teacher_texts[0]
        feedback_at, example_at = teacher.index("Your name is Kuro."), teacher.index(example)
        assert feedback_at < teacher.index(EXAMPLE_INTRO) < example_at
        assert teacher.index(EXAMPLE_OUTRO) > example_at
        assert teacher.endswith(harness.tokenizer.decode(sample.response_tokens))
        plain = sample.model_copy(update={"example": None})
        assert EXAMPLE_INTRO not in harness.distill([plain], config).teacher_texts[0]
    with pytest.raises(ValidationError, match="example is empty"):
        FeedbackSample.model_validate({**sample.model_dump(), "example": " \n "})


def test_the_default_learning_rate_follows_the_hidden_size() -> None:
    """Calibrated at SmolLM2-135M (H=576, 1e-4), falling with size as Tinker's LoRA rule does."""
    assert default_learning_rate(576, "llama") == pytest.approx(1e-4, rel=0.02)
    sizes = (576, 960, 2048, 3072, 4096, 8192)
    rates = [default_learning_rate(size, "llama") for size in sizes]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)
    assert default_learning_rate(4096, "llama") == pytest.approx(2.17e-5, rel=0.02)
    assert default_learning_rate(64, "llama") == default_learning_rate(576, "llama")
    assert default_learning_rate(None) == default_learning_rate(4096, "llama")
    # Qwen's exponent is flatter: a larger rate than a Llama of the same width
    assert default_learning_rate(4096, "qwen3") == pytest.approx(3.59e-5, rel=0.02)


def test_fresh_answers_fill_the_batch_from_the_version_trained_seeded(harness: Harness) -> None:
    """samples_per_request: the version trained from answers the batch's prompts again (at the
    config's temperature, seeded by version and place), each trained with the same feedback; a
    replayed lesson gets its own answer, with its own feedback in its teacher prompt, and its
    text is not reported with the batch's (it belongs to the memory); a lesson whose teacher
    prompt cannot fit is left out, not the user's batch."""
    sample = harness.sample_for("Tell me about the sea.", max_tokens=8, seed=1)

    def lesson(content: str) -> Lesson:
        messages = [{"role": "user", "content": content}]
        return Lesson(
            lora_id=LORA,
            messages=messages,
            prompt_tokens=chat_prompt_tokens(harness.tokenizer, messages),
            feedback="Your name is Kuro.",
        )

    words = harness.engine.max_context
    while len((too_long := lesson("sea " * words)).prompt_tokens) > harness.engine.max_context - 4:
        words -= len(too_long.prompt_tokens) - (harness.engine.max_context - 4)
    # the student's prompt fits (4 tokens to spare), its teacher's (with the feedback) does not
    config = TrainingConfig(steps_per_batch=1, samples_per_request=3, sample_temperature=1.0)
    current = harness.store.latest_version(LORA)
    assert current is not None
    start = TrainFrom(
        version=current.version, state_path=current.state_path, sampler_path=current.sampler_path
    )
    replay = [lesson("Who are you?"), too_long]
    first = harness.run(harness.engine.distill([sample], config, start, replay))
    again = harness.run(harness.engine.distill([sample], config, start, replay))
    assert first.teacher_texts == again.teacher_texts  # seeded: the same answers
    metrics = first.metrics
    assert (metrics["rollouts"], metrics["fresh_samples"], metrics["replayed"]) == (1, 2, 1)
    assert metrics["samples"] == 4 and metrics["extra_dropped"] == 1
    texts = first.teacher_texts
    assert len(texts) == 3 and all("Tell me about the sea." in t and FEEDBACK in t for t in texts)
    assert len(set(texts)) == 3  # three different answers to the one prompt
    (replayed,) = first.replayed_texts
    assert "Who are you?" in replayed and "Your name is Kuro." in replayed
    assert FEEDBACK not in replayed  # the lesson keeps its own feedback
    cooler = TrainingConfig(steps_per_batch=1, samples_per_request=3, sample_temperature=0.0)
    greedy = harness.run(harness.engine.distill([sample], cooler, start)).teacher_texts
    assert greedy[1] == greedy[2] != texts[1]  # the temperature reaches the sampler
    alone = harness.distill([sample], TrainingConfig(steps_per_batch=1))
    assert "sampling" not in alone.timings and alone.metrics["fresh_samples"] == 0


def test_a_self_example_is_the_teachers_greedy_answer_under_the_feedback(harness: Harness) -> None:
    """The teacher answers greedily under the feedback, and that answer is shown to it as the
    example; a blank answer (the tiny model's newlines) is no example."""
    sample = harness.sample_for("Who are you?", max_tokens=6)
    config = TrainingConfig(steps_per_batch=1, self_example=True)
    blank = harness.distill([sample], config)  # the unperturbed tiny model says "\n" * 6
    assert EXAMPLE_INTRO not in blank.teacher_texts[0] and "self_example" in blank.timings
    perturb_latest(harness, scale=0.5)
    trained = harness.distill([sample], config)
    teacher = trained.teacher_texts[0]
    assert teacher.index(FEEDBACK) < teacher.index(EXAMPLE_INTRO) < teacher.index(EXAMPLE_OUTRO)
    shown = teacher[
        teacher.index(EXAMPLE_INTRO) + len(EXAMPLE_INTRO) : teacher.index(EXAMPLE_OUTRO)
    ]
    prompt = rollout_teacher_prompt_tokens(harness.tokenizer, sample.messages, "chat", FEEDBACK)
    version = harness.store.get_version(LORA, harness.version - 1)  # the version trained from
    sampler = harness.service.create_sampling_client(model_path=version.sampler_path).result()
    params = types.SamplingParams(max_tokens=len(sample.response_tokens), temperature=0.0)
    greedy = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    assert (
        shown.strip() == harness.tokenizer.decode(greedy.tokens, skip_special_tokens=True).strip()
    )
    given = sample.model_copy(update={"example": "I'm Kuro."})
    kept = harness.distill([given], config).teacher_texts[0]
    assert "I'm Kuro." in kept  # the user's example wins
