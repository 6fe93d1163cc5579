"""The service seam: exactly what the engine, chat and adapters ask of a training service.

Two services implement it: the in-process `claas.services.local` and hosted Tinker
(`tinker.ServiceClient`). The Protocols name only the calls claas makes, with Tinker's own
parameter names, so mypy checks that one engine runs on both (`tests/test_layering.py` holds the
static check). Every call returns an awaitable, as Tinker's futures are.

What a service can do beyond Tinker's API is declared once, as `ServiceCapabilities`, instead of
being probed at each call site:

- `exact_lora_config` (adapters): `lora_alpha` and `target_modules` at create. Local: yes;
  Tinker: no, it trains with alpha 32 on whole module groups.
- `token_streaming` (chat): `sample(..., on_token=...)`. Local: yes; Tinker: the answer
  arrives whole.
- `local_checkpoints` (export): `checkpoint_dir(path)` gives a version's files. Local only.
- `closable` (runtime): the service holds a model and threads to release. Local only.
- `logit_rules` (chat): OpenAI's `presence_penalty`, `frequency_penalty` and `logit_bias`,
  sent as `ChatSamplingParams`. Local and vLLM: yes; Tinker: no, so chat refuses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field
from tinker import types
from transformers import PreTrainedTokenizerBase

# The LoRA module groups Tinker's `train_attn` / `train_mlp` / `train_unembed` flags switch, and
# the alpha Tinker trains with: the one definition, for adapters and the local service.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
TINKER_LORA_ALPHA = 32.0


class ChatSamplingParams(types.SamplingParams):
    """Tinker's sampling params plus OpenAI's logit rules (services with `logit_rules` only).

    The rules shape which token is *chosen*; the log-probs a sampler reports stay the model's
    own (temperature 1, before penalties and bias), the numbers training computes.
    """

    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)

    @property
    def has_logit_rules(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


class StopGeneration(Exception):
    """Raised by an `on_token` callback to end generation early (a client went away)."""


class SamplingClient(Protocol):
    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> Awaitable[types.SampleResponse]: ...

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> Awaitable[list[float | None]]: ...

    def get_tokenizer(self) -> PreTrainedTokenizerBase: ...


TokenCallback = Callable[[int, int, float], None]  # (choice, token id, log-prob)


class StreamingSamplingClient(SamplingClient, Protocol):
    """A sampler with `token_streaming`: `on_token` is called on each sampled token."""

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
        on_token: TokenCallback | None = None,
    ) -> Awaitable[types.SampleResponse]: ...


CustomLoss = Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, float]]]
"""Tinker's `CustomLossFnV1`: (datums, each datum's log-probs at its targets, as torch tensors)
-> (scalar loss tensor, metrics). `forward_backward_custom` backpropagates the loss."""


class TrainingClient(Protocol):
    def forward(
        self, data: list[types.Datum], loss_fn: types.LossFnType
    ) -> Awaitable[types.ForwardBackwardOutput]: ...

    def forward_backward(
        self, data: list[types.Datum], loss_fn: types.LossFnType
    ) -> Awaitable[types.ForwardBackwardOutput]: ...

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLoss
    ) -> Awaitable[types.ForwardBackwardOutput]: ...

    def optim_step(
        self, optim_params: types.OptimParams | None = None
    ) -> Awaitable[types.OptimStepResponse]: ...

    def save_state(self, name: str) -> Awaitable[types.SaveWeightsResponse]: ...

    def save_weights_for_sampler(
        self, name: str
    ) -> Awaitable[types.SaveWeightsForSamplerResponse]: ...


class RestClient(Protocol):
    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> Awaitable[None]: ...


class SamplingService(Protocol):
    """What chat needs: a sampling client for the base model or for one adapter version."""

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> Awaitable[SamplingClient]: ...


class ServiceClient(SamplingService, Protocol):
    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
    ) -> Awaitable[TrainingClient]: ...

    def create_training_client_from_state_with_optimizer(
        self, path: str
    ) -> Awaitable[TrainingClient]: ...

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> Awaitable[SamplingClient]: ...

    def create_rest_client(self) -> RestClient: ...


class ExactLoraServiceClient(ServiceClient, Protocol):
    """A service with `exact_lora_config`: any alpha, any set of target modules."""

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        target_modules: Sequence[str] | None = None,
        lora_alpha: float = TINKER_LORA_ALPHA,
    ) -> Awaitable[TrainingClient]: ...


class LocalCheckpoints(Protocol):
    """A service with `local_checkpoints`: a version's files are on this machine."""

    def checkpoint_dir(self, path: str) -> Path: ...


class Closable(Protocol):
    def close(self) -> None: ...


class ServiceCapabilities(BaseModel):
    """What a service can do beyond Tinker's client API (the table in the module docstring)."""

    model_config = ConfigDict(frozen=True)

    exact_lora_config: bool = False
    token_streaming: bool = False
    local_checkpoints: bool = False
    closable: bool = False
    logit_rules: bool = False


HOSTED_TINKER = ServiceCapabilities()  # Tinker's API and nothing more


def capabilities_of(service: SamplingService) -> ServiceCapabilities:
    """A service's declared capabilities (its `capabilities` attribute); Tinker declares none."""
    declared = getattr(service, "capabilities", HOSTED_TINKER)
    return declared if isinstance(declared, ServiceCapabilities) else HOSTED_TINKER


def streaming(sampler: SamplingClient) -> StreamingSamplingClient:
    """The sampler as a streaming one; only for services with `token_streaming`."""
    return cast(StreamingSamplingClient, sampler)


def exact_lora(service: ServiceClient) -> ExactLoraServiceClient:
    """The service as one that takes alpha and modules; only with `exact_lora_config`."""
    return cast(ExactLoraServiceClient, service)


def local_checkpoints(service: ServiceClient) -> LocalCheckpoints:
    """The service's checkpoint files; only with `local_checkpoints`."""
    return cast(LocalCheckpoints, service)


async def delete_checkpoints(service: ServiceClient, paths: Sequence[str]) -> None:
    """Best-effort removal of checkpoints through the service's `RestClient`.

    Used to clean up after a failed request: a missing file must not stop the rest, and the
    caller's original error matters more than a cleanup error.
    """
    if not paths:
        return
    rest = service.create_rest_client()
    for path in paths:
        with contextlib.suppress(Exception):
            await rest.delete_checkpoint_from_tinker_path(path)
