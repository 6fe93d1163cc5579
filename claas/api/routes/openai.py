"""OpenAI-compatible serving: /v1/models, /v1/chat/completions, /v1/completions, and /v1/score.

Each answer is stored as a rollout under its completion id, which feedback then names. With
`stream: true` the answer is sent as server-sent events, token by token, ending with [DONE].

OpenAI's behaviour, field by field: what the sampler can do is done exactly (penalties,
`logit_bias`, `top_logprobs`, stop strings left out of the text, usage chunks only with
`stream_options.include_usage`); what it cannot is refused with a 400 naming the field
(`SamplingFields.refuse_unsupported`), never accepted and ignored. Log-probs are the model's own
(temperature 1, before penalties and bias): the numbers training computes. Streamed log-probs
arrive whole, on each choice's last chunk. The log-probs and the stream are built by
`claas.api.serving`; the routes here check a request and start its completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from tinker import types

from claas.api import serving
from claas.api.auth import Principal
from claas.api.deps import Caller, RuntimeDep, TokenizingDep
from claas.api.errors import error_responses
from claas.api.openai_requests import (
    COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    ScoreRequest,
)
from claas.api.openai_responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ModelCard,
    ModelList,
    ScoreResponse,
    TextChoice,
    TextCompletion,
)
from claas.chat import ModelTarget, new_completion_id
from claas.errors import AdapterNotFound, ClaasError, InvalidRequest
from claas.ids import validate_lora_id
from claas.runtime import Runtime

router = APIRouter(prefix="/v1")
_SERVING_RESPONSES: dict[int | str, dict[str, Any]] = {
    # the text/event-stream events are documented by claas.api.openapi
    200: {"description": "The completion; with stream=true, server-sent events."},
    **error_responses(400, 401, 403, 404, 409, 413, 422, 429, 503),
}


_STARTED = int(time.time())  # the base model's `created`: when this server started


@router.get("/models", responses=error_responses(401))
def models(runtime: RuntimeDep, caller: Caller) -> ModelList:
    prefix = f"{caller.owner}/" if caller.owner else ""
    return ModelList(
        data=[_base_card(runtime)]
        + [_adapter_card(a.lora_id, a.created_at) for a in runtime.store.list_adapters(prefix)]
    )


@router.get("/models/{model_id:path}", responses=error_responses(401, 403, 404, 422))
async def model(model_id: str, runtime: RuntimeDep, caller: Caller) -> ModelCard:
    """One model this key may chat with: the base model, or one of the owner's adapters."""
    if model_id == runtime.base_model:
        return _base_card(runtime)
    target = await _target(runtime, caller, model_id)
    if target.lora_id is None or "@" in model_id:
        raise AdapterNotFound(f"model {model_id!r} does not exist; GET /v1/models lists them")
    adapter = await asyncio.to_thread(runtime.store.get_adapter, target.lora_id)
    return _adapter_card(adapter.lora_id, adapter.created_at)


def _base_card(runtime: Runtime) -> ModelCard:
    return ModelCard(id=runtime.base_model, created=_STARTED, owned_by="claas")


def _adapter_card(lora_id: str, created_at: float) -> ModelCard:
    return ModelCard(id=lora_id, created=int(created_at), owned_by=lora_id.partition("/")[0])


@router.post("/chat/completions", response_model=ChatCompletion, responses=_SERVING_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    runtime: RuntimeDep,
    tokenizing: TokenizingDep,
    caller: Caller,
) -> ChatCompletion | StreamingResponse:
    if len(body.messages) > runtime.settings.max_messages:
        raise InvalidRequest(
            f"{len(body.messages)} messages is over the cap of "
            f"{runtime.settings.max_messages}; send fewer turns",
            param="messages",
        )
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    target = await _target(runtime, caller, body.model)
    messages = [m.as_template_message() for m in body.messages]
    prompt = await tokenizing.chat(messages)
    params = _sampling_params(runtime, body, len(prompt))
    top_k = (body.top_logprobs or 0) if body.logprobs else 0
    slot = runtime.chat.generations.take(_generation_owner(target, caller))
    if body.stream:
        asked = serving.StreamedAnswer(
            "chat.completion.chunk", target, prompt, messages, params, body, body.logprobs, top_k
        )
        return serving.stream(runtime, asked, slot)
    with slot:
        completion = await serving.unless_client_leaves(
            request,
            runtime.chat.complete(target, prompt, messages, params, body.n, top_logprobs=top_k),
        )
    return ChatCompletion(
        id=completion.id,
        created=completion.created,
        model=completion.model,
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                finish_reason=c.finish_reason,
                logprobs=serving.chat_logprobs(runtime.tokenizer, c) if body.logprobs else None,
            )
            for c in completion.choices
        ],
        usage=serving.usage(completion),
    )


@router.post("/completions", response_model=TextCompletion, responses=_SERVING_RESPONSES)
async def completions(
    body: CompletionRequest,
    request: Request,
    runtime: RuntimeDep,
    tokenizing: TokenizingDep,
    caller: Caller,
) -> TextCompletion | StreamingResponse:
    target = await _target(runtime, caller, body.model)
    prompt = await tokenizing.text(body.prompt)
    messages = [{"role": "user", "content": body.prompt}]
    params = _sampling_params(runtime, body, len(prompt), default=COMPLETION_MAX_TOKENS)
    wants_logprobs = body.logprobs is not None
    top_k = body.logprobs or 0
    slot = runtime.chat.generations.take(_generation_owner(target, caller))
    if body.stream:
        asked = serving.StreamedAnswer(
            "text_completion", target, prompt, messages, params, body, wants_logprobs, top_k
        )
        return serving.stream(runtime, asked, slot)
    with slot:
        completion = await serving.unless_client_leaves(
            request,
            runtime.chat.complete(
                target,
                prompt,
                messages,
                params,
                body.n,
                prompt_text=body.prompt,
                completion_id=new_completion_id("cmpl"),
                prompt_format="text",
                top_logprobs=top_k,
            ),
        )
    return TextCompletion(
        id=completion.id,
        created=completion.created,
        model=completion.model,
        choices=[
            TextChoice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                logprobs=serving.text_logprobs(runtime.tokenizer, c) if wants_logprobs else None,
            )
            for c in completion.choices
        ],
        usage=serving.usage(completion),
    )


@router.post("/score", responses=error_responses(400, 401, 403, 404, 409, 413, 422))
async def score(
    body: ScoreRequest, runtime: RuntimeDep, tokenizing: TokenizingDep, caller: Caller
) -> ScoreResponse:
    target = await _target(runtime, caller, body.model)
    messages = [m.as_template_message() for m in body.messages]
    prompt = await tokenizing.chat(messages)
    tokens = await tokenizing.text(body.completion)
    logprobs = await runtime.chat.score(target, prompt, tokens)
    return ScoreResponse(
        model=target.name,
        tokens=runtime.tokenizer.convert_ids_to_tokens(tokens),
        token_ids=tokens,
        logprobs=logprobs,
        total_logprob=float(sum(logprobs)),
        logprob_sum=float(sum(logprobs)),
        prompt_tokens=len(prompt),
        completion_tokens=len(tokens),
    )


def _sampling_params(
    runtime: Runtime, body: SamplingFields, prompt_len: int, default: int | None = None
) -> types.SamplingParams:
    """`default`: max_tokens when the request sets none (None: the room left in the context,
    at most the cap)."""
    body.refuse_unsupported()
    settings = runtime.settings
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > settings.max_tokens_cap:
        raise InvalidRequest(
            f"max_tokens {asked} is over this server's cap of {settings.max_tokens_cap}; ask "
            "for fewer (CLAAS_MAX_TOKENS_CAP)",
            param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
        )
    if body.n > settings.max_samples:
        raise InvalidRequest(
            f"n={body.n} is over this server's cap of {settings.max_samples}", param="n"
        )
    room = runtime.max_context - prompt_len
    if asked is None and default is not None:
        asked = min(default, settings.max_tokens_cap)
    max_tokens = asked if asked is not None else max(1, min(settings.max_tokens_cap, room))
    runtime.chat.check_fits(prompt_len, max_tokens)
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k or -1,
        "seed": body.seed,
        "stop": body.stop,
    }
    return runtime.chat.sampling_params(
        fields,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
    )


async def _target(runtime: Runtime, caller: Principal, model: str) -> ModelTarget:
    """Resolve `model` for this caller: another owner's name is refused before any lookup, and
    the names listed in a 404 are only the caller's own."""
    lora_id = model.partition("@")[0]
    with contextlib.suppress(InvalidRequest):  # not owner/name: resolve() explains
        caller.check(validate_lora_id(lora_id))
    try:
        return await asyncio.to_thread(runtime.chat.resolve, model, owner=caller.owner)
    except ClaasError as error:
        error.param = error.param or "model"
        raise


def _generation_owner(target: ModelTarget, caller: Principal) -> str:
    """Whose limit a generation counts against: the adapter's owner (as for feedback), or on
    the base model the caller's ("" for every caller without a key of an owner)."""
    if target.lora_id is not None:
        return target.lora_id.partition("/")[0]
    return caller.owner or ""
