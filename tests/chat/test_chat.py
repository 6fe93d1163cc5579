"""Serving details: thinking blocks, streaming deltas, rollouts keep the raw tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np
from tinker import types
from transformers import PreTrainedTokenizerBase

from claas.chat import ChatService, ModelTarget, StreamDecoder, visible_text
from claas.models import LoadedModel
from claas.services.protocol import ServiceCapabilities, TokenCallback
from claas.store import Store

RAW = "<think>The user wants a greeting.</think>\n\nHello world!"


def test_visible_text_hides_thinking() -> None:
    assert visible_text(RAW) == "Hello world!"
    assert visible_text("Hi <think>unfinished") == "Hi "
    assert visible_text("plain") == "plain"


def test_stream_decoder_never_leaks_a_think_block(tiny: LoadedModel) -> None:
    tokens = tiny.tokenizer.encode(RAW, add_special_tokens=False)
    decoder = StreamDecoder(tiny.tokenizer)
    deltas = [decoder.push(t) for t in tokens]
    assert "".join(deltas) == "Hello world!"
    assert not any("<" in d or "think" in d for d in deltas)


class FakeThinkingSampler:
    """A fake streaming sampling client standing in for a thinking model (none is installed
    here): it returns fixed tokens that open with a <think> block, and streams them via
    on_token."""

    def __init__(self, tokens: list[int], tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokens = tokens
        self.tokenizer = tokenizer

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
    ) -> Awaitable[types.SampleResponse]:
        self.streamed = on_token is not None
        for token in self.tokens:
            if on_token is not None:
                on_token(0, token, -0.5)

        async def result() -> types.SampleResponse:
            return types.SampleResponse(
                sequences=[
                    types.SampledSequence(
                        stop_reason="stop",
                        sequence_id="seq-1",
                        tokens_np=np.asarray(self.tokens, dtype=np.int32),
                        logprobs_np=np.full(len(self.tokens), -0.5, dtype=np.float32),
                    )
                ]
            )

        return result()

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> Awaitable[list[float | None]]:
        raise NotImplementedError("a chat does not score prompts")

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizer


class StreamingService:
    """A fake service that only declares token streaming; its sampler is set directly."""

    capabilities = ServiceCapabilities(token_streaming=True)


def test_rollout_keeps_raw_tokens_and_answer_hides_thinking(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    tokens = tiny.tokenizer.encode(RAW, add_special_tokens=False)
    store = Store(tmp_path / "claas.db")
    chat = ChatService(StreamingService(), store, "tiny", tiny.tokenizer, 2048, 3600.0)  # type: ignore[arg-type]
    target = ModelTarget(name="tiny")
    sampler = FakeThinkingSampler(tokens, tiny.tokenizer)
    chat._samplers[f"base:{chat.base_model}"] = sampler
    streamed: list[str] = []

    async def run() -> Any:
        return await chat.complete(
            target,
            [1, 2, 3],
            [{"role": "user", "content": "hi"}],
            types.SamplingParams(max_tokens=64),
            on_text=lambda index, delta: streamed.append(delta),
        )

    completion = asyncio.run(run())
    assert completion.choices[0].text == "Hello world!"
    assert sampler.streamed and "".join(streamed) == "Hello world!"
    rollout = store.get_rollout(completion.id)
    assert rollout.response_tokens == tokens  # the raw tokens, thinking included
    assert rollout.response_text == "Hello world!"
    store.close()
