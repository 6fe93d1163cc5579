"""`ChatService`: sample an answer from an adapter's current version and record its rollout.

The first half of the data flow (docs/architecture.md). A chat request names a model: an adapter
`owner/name` (its current version), `owner/name@N` (a pinned version) or the base model. The
answer is sampled through the training service's sampling client, so the served weights are
exactly the ones the engine trains. Before the answer is returned, its rollout (messages, prompt
and response token ids from the sampler, the sampler's log-probs, adapter version, sampling
params) is stored, so feedback can later name it by completion id.

    chat = ChatService(service, store, base_model, tokenizer, max_context, rollout_ttl)
    completion = await chat.complete(chat.resolve("alice/assistant"), messages, params)
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tinker import types
from transformers import PreTrainedTokenizerBase

from claas.chat.slots import GenerationSlots
from claas.chat.stream import StreamDecoder, cut_at_stop, stop_strings, visible_text
from claas.errors import (
    AdapterNotFound,
    Conflict,
    ContextTooLong,
    InvalidRequest,
    UnsupportedParameter,
    VersionNotFound,
)
from claas.ids import text_hash, validate_lora_id
from claas.records import Rollout
from claas.sdpo.prompts import Message, chat_prompt_tokens, message_text
from claas.services.protocol import (
    ChatSamplingParams,
    SamplingClient,
    SamplingService,
    StopGeneration,
    capabilities_of,
    streaming,
)
from claas.store import Store


@dataclass(frozen=True)
class ModelTarget:
    """What a request's `model` resolves to: the base, or one adapter version."""

    name: str
    lora_id: str | None = None
    version: int | None = None
    sampler_path: str | None = None


@dataclass(frozen=True)
class Choice:
    index: int
    rollout_id: str
    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: types.StopReason
    # With `top_logprobs`: per token, the k likeliest (token id, log-prob) under the model.
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class Completion:
    id: str
    created: int
    model: str
    prompt_tokens: int
    choices: list[Choice]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


TextCallback = Callable[[int, str], None]


class ChatService:
    def __init__(
        self,
        service: SamplingService,
        store: Store,
        base_model: str,
        tokenizer: PreTrainedTokenizerBase,
        max_context: int,
        rollout_ttl_seconds: float,
        max_cached_samplers: int = 64,
        max_generations_per_owner: int | None = None,
    ) -> None:
        self.service = service
        self.store = store
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.rollout_ttl_seconds = rollout_ttl_seconds
        self._samplers: OrderedDict[str, SamplingClient] = OrderedDict()
        self._max_cached = max_cached_samplers
        self.generations = GenerationSlots(max_generations_per_owner)

    # -- which weights --------------------------------------------------------------------------
    def model_names(self, owner: str | None = None) -> list[str]:
        """The base and the adapters visible to `owner` (all of them for None)."""
        prefix = f"{owner}/" if owner is not None else ""
        return [self.base_model, *(a.lora_id for a in self.store.list_adapters(prefix))]

    def resolve(self, model: str, owner: str | None = None) -> ModelTarget:
        """The weights `model` names. With `owner`, other owners' adapters do not exist."""
        if model == self.base_model:
            return ModelTarget(name=model)
        lora_id, at, pinned = model.partition("@")
        try:
            lora_id = validate_lora_id(lora_id)
            if owner is not None and not lora_id.startswith(f"{owner}/"):
                raise AdapterNotFound(lora_id)
            adapter = self.store.get_adapter(lora_id)
        except (InvalidRequest, AdapterNotFound):
            alias = None if at else self._claas_alias(lora_id, owner)
            if alias is not None:
                return self.resolve(alias, owner)
            names = self.model_names(owner)
            shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
            raise AdapterNotFound(
                f"model {model!r} does not exist; valid names: {shown} (create an adapter "
                "with POST /v1/adapters, or pin a version as owner/name@N)"
            ) from None
        if at:  # `owner/name@` with nothing after the @ is a typo, not "the current version"
            if not (pinned.isascii() and pinned.isdigit() and len(pinned) <= 9):
                raise InvalidRequest(f"version in {model!r} must be a number, e.g. {lora_id}@2")
            version = self.store.get_version(lora_id, int(pinned))
        else:
            current = self.store.latest_version(adapter.lora_id)
            if current is None:
                raise VersionNotFound(f"adapter {lora_id} has no version yet; re-create it")
            version = current
        return ModelTarget(model, lora_id, version.version, version.sampler_path)

    def _claas_alias(self, model: str, owner: str | None) -> str | None:
        """The adapter a CLaaS client means: CLaaS chats under `owner/name-latest`, or under
        the flat name it gives vLLM (`eval-concise`, `openclaw-assistant-latest`)."""
        wanted = model.removesuffix("-latest")
        matches = [
            adapter.lora_id
            for adapter in self.store.list_adapters(f"{owner}/" if owner is not None else "")
            if wanted in (adapter.lora_id, re.sub(r"[^a-zA-Z0-9._-]+", "-", adapter.lora_id))
        ]
        if len(matches) > 1:  # flat names of two owners can coincide (a-b/c, a/b-c)
            raise Conflict(f"model {model!r} could be {matches}; name one as owner/name")
        return matches[0] if matches else None

    async def sampler(self, target: ModelTarget) -> SamplingClient:
        key = target.sampler_path or f"base:{self.base_model}"
        if key in self._samplers:
            self._samplers.move_to_end(key)
            return self._samplers[key]
        if target.sampler_path is None:
            client = await self.service.create_sampling_client(base_model=self.base_model)
        else:
            client = await self.service.create_sampling_client(model_path=target.sampler_path)
        self._samplers[key] = client
        while len(self._samplers) > self._max_cached:
            self._samplers.popitem(last=False)
        return client

    # -- answering ------------------------------------------------------------------------------
    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a prompt and answer that together exceed the model's context (before a
        stream's first byte, so the refusal is a 4xx)."""
        if prompt_tokens + max_tokens > self.max_context:
            raise ContextTooLong(
                f"the prompt is {prompt_tokens} tokens and max_tokens {max_tokens}; together "
                f"they exceed the model's context of {self.max_context}. Shorten the "
                "conversation or lower max_tokens",
                param="max_tokens",
            )

    def sampling_params(
        self,
        fields: dict[str, Any],
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
    ) -> types.SamplingParams:
        """Tinker's sampling params from `fields`, as `ChatSamplingParams` when OpenAI's logit
        rules are set; refused (naming the field) where the service cannot apply them."""
        rules = {
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "logit_bias": logit_bias or {},
        }
        asked = [name for name, value in rules.items() if value]
        if not asked:
            return types.SamplingParams(**fields)
        vocab = len(self.tokenizer)
        unknown = sorted(i for i in logit_bias or {} if not 0 <= i < vocab)
        if unknown:
            raise InvalidRequest(
                f"logit_bias names token ids {unknown[:5]} outside the vocabulary (0..{vocab - 1})",
                param="logit_bias",
            )
        if not capabilities_of(self.service).logit_rules:
            raise UnsupportedParameter(
                f"{asked[0]} is not supported by this server's sampling service (hosted "
                "Tinker); leave it out",
                param=asked[0],
            )
        return ChatSamplingParams(**fields, **rules)

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        try:
            return chat_prompt_tokens(self.tokenizer, messages)
        except ValueError as error:
            raise InvalidRequest(str(error)) from error

    async def complete(
        self,
        target: ModelTarget,
        prompt_tokens: list[int],
        messages: Sequence[Message],
        params: types.SamplingParams,
        n: int = 1,
        on_text: TextCallback | None = None,
        prompt_text: str | None = None,
        completion_id: str | None = None,
        prompt_format: Literal["chat", "text"] = "chat",
        top_logprobs: int = 0,
    ) -> Completion:
        """Sample `n` answers, store their rollouts, return them.

        `on_text(choice, delta)` streams visible text as tokens arrive (where the service can).
        `prompt_text` is what feedback by text must match: the last user message by default.
        An answer's text ends before its first stop string, as OpenAI's does; its tokens (the
        rollout) are the ones sampled, up to the token that completed the stop string.
        `top_logprobs` > 0 also returns the k likeliest tokens at each step.
        """
        self.check_fits(len(prompt_tokens), params.max_tokens or 0)
        sampler = await self.sampler(target)
        abandoned = threading.Event()
        prompt = types.ModelInput.from_ints(prompt_tokens)
        stops = stop_strings(params)
        decoders = [StreamDecoder(self.tokenizer, stops) for _ in range(n)]
        try:
            if capabilities_of(self.service).token_streaming:
                # Streamed or not, a token callback ends the generation once nobody waits.
                on_token = self._token_bridge(on_text, decoders, abandoned)
                response = await streaming(sampler).sample(
                    prompt, n, params, topk_sample_logprobs=top_logprobs, on_token=on_token
                )
            else:
                response = await sampler.sample(
                    prompt, n, params, topk_sample_logprobs=top_logprobs
                )
        except asyncio.CancelledError:
            abandoned.set()  # the client left: stop generating at the next token
            raise
        completion_id = completion_id or new_completion_id()
        created = int(time.time())
        choices = []
        for index, sequence in enumerate(response.sequences):
            raw = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
            choices.append(
                Choice(
                    index=index,
                    rollout_id=completion_id if index == 0 else f"{completion_id}.{index}",
                    text=cut_at_stop(visible_text(raw), stops),
                    tokens=list(sequence.tokens),
                    logprobs=[float(x) for x in sequence.logprobs or []],
                    finish_reason=sequence.stop_reason,
                    top_logprobs=[row or [] for row in sequence.topk_logprobs or []]
                    if top_logprobs
                    else None,
                )
            )
        if on_text is not None:
            # What streaming held back (a possible stop string or tag that never came, an
            # unfinished character), or the whole answer where the service does not stream.
            for choice, decoder in zip(choices, decoders, strict=False):
                if choice.text.startswith(decoder.sent) and len(choice.text) > len(decoder.sent):
                    on_text(choice.index, choice.text[len(decoder.sent) :])
        user_text = prompt_text if prompt_text is not None else _last_user_text(messages)
        expires = created + self.rollout_ttl_seconds
        stored = [
            Rollout(
                id=choice.rollout_id,
                lora_id=target.lora_id,
                adapter_version=target.version,
                model=target.name,
                messages=[dict(m) for m in messages],
                prompt_tokens=prompt_tokens,
                response_tokens=choice.tokens,
                behavior_logprobs=choice.logprobs,
                sampling_params=params.model_dump(),
                response_text=choice.text,
                prompt_hash=text_hash(user_text),
                response_hash=text_hash(choice.text),
                created_at=time.time(),
                expires_at=expires,
                prompt_format=prompt_format,
            )
            for choice in choices
        ]
        # Off the event loop, as all database I/O in async code: a write waits for its commit.
        await asyncio.to_thread(self._record_rollouts, stored)
        return Completion(completion_id, created, target.name, len(prompt_tokens), choices)

    def _record_rollouts(self, stored: list[Rollout]) -> None:
        for rollout in stored:
            self.store.add_rollout(rollout)

    def _token_bridge(
        self,
        on_text: TextCallback | None,
        decoders: list[StreamDecoder],
        abandoned: threading.Event,
    ) -> Callable[[int, int, float], None]:
        """Called on the model thread per token: ends the generation once `abandoned` is set,
        and hands visible deltas to the event loop (with `on_text`)."""
        loop = asyncio.get_running_loop()

        def on_token(index: int, token: int, logprob: float) -> None:
            if abandoned.is_set():
                raise StopGeneration
            if on_text is None:
                return
            delta = decoders[index].push(token)
            if delta:
                loop.call_soon_threadsafe(on_text, index, delta)

        return on_token

    async def score(
        self, target: ModelTarget, prompt_tokens: list[int], completion_tokens: list[int]
    ) -> list[float]:
        """Per-token log-probs of `completion_tokens` after the prompt."""
        if not completion_tokens:
            raise InvalidRequest("the completion to score is empty")
        total = len(prompt_tokens) + len(completion_tokens)
        if total > self.max_context:
            raise ContextTooLong(f"{total} tokens exceed the context of {self.max_context}")
        sampler = await self.sampler(target)
        values = await sampler.compute_logprobs(
            types.ModelInput.from_ints(prompt_tokens + completion_tokens)
        )
        return [float(v) for v in values[len(prompt_tokens) :] if v is not None]


def new_completion_id(prefix: Literal["chatcmpl", "cmpl"] = "chatcmpl") -> str:
    """OpenAI's id shapes: `chatcmpl-…` for chat, `cmpl-…` for plain completions."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _last_user_text(messages: Sequence[Message]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content", ""))
    return ""
