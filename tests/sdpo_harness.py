"""The SDPO engine's test harness (tests/sdpo/): a local service, a store and an engine in a temp
dir, on a private copy of a model, and a spy on the LoRA gradients."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from model_copies import private_copy
from tinker import types

from claas.adapters import Adapters, AdapterSpec
from claas.feedback import train_and_register
from claas.models import LoadedModel
from claas.sdpo.config import TrainedCheckpoint
from claas.sdpo.engine import FeedbackSample, SDPOEngine, TrainingConfig
from claas.sdpo.prompts import chat_prompt_tokens
from claas.services.local import LocalServiceClient, LocalTrainingClient
from claas.store import Store

T = TypeVar("T")

LORA = "alice/assistant"
FEEDBACK = "Way too long. Answer in one short sentence."

SHARP: dict[str, Any] = {"initializer_range": 0.3}
"""LlamaConfig overrides for a tiny model with peaked logits. The default one's are nearly
uniform, so its GJS gradient is lost next to k3's; a much sharper one is chaotic: the feedback
prompt moves the teacher's top-K to ids where the student has no mass, and GJS saturates."""


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

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(coroutine)

    def distill(self, samples: list[FeedbackSample], config: TrainingConfig) -> TrainedCheckpoint:
        """Train and register, as the feedback queue does."""
        version, trained = self.run(train_and_register(self.engine, self.store, samples, config))
        self.version = version.version
        return trained

    def rollout(
        self,
        question: str,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        lora_id: str = LORA,
    ) -> tuple[list[dict[str, Any]], list[int], types.SampledSequence]:
        """Sample an answer from the adapter's current version, as the API would."""
        messages = [{"role": "user", "content": question}]
        prompt = chat_prompt_tokens(self.tokenizer, messages)
        version = self.store.latest_version(lora_id)
        assert version is not None
        sampler = self.service.create_sampling_client(model_path=version.sampler_path).result()
        params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        sequence = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()
        return messages, prompt, sequence.sequences[0]

    def sample_for(
        self,
        question: str,
        max_tokens: int = 12,
        temperature: float = 1.0,
        seed: int = 0,
        lora_id: str = LORA,
    ) -> FeedbackSample:
        messages, prompt, sequence = self.rollout(question, max_tokens, temperature, seed, lora_id)
        return FeedbackSample(
            lora_id=lora_id,
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


def started(loaded: LoadedModel, root: Path) -> Harness:
    """A harness on a private copy of `loaded`, with the adapter made (version 1)."""
    h = Harness(private_copy(loaded), root)
    h.run(h.adapters.init(LORA, AdapterSpec(rank=4, seed=0)))
    return h


def metric(result: TrainedCheckpoint, name: str) -> float:
    """One of a request's numeric metrics (the metrics also hold strings, such as the mode)."""
    value = result.metrics[name]
    assert isinstance(value, int | float), f"{name} is {value!r}, not a number"
    return value


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
