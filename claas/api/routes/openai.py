"""OpenAI-compatible serving: /v1/models, /v1/chat/completions, /v1/completions, and /v1/score.

Each answer is stored as a rollout under its completion id, which feedback then names. With
`stream: true` the answer is sent as server-sent events, token by token, ending with [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from tinker import types

from claas.api.auth import Principal
from claas.api.deps import Caller, RuntimeDep, TokenizingDep
from claas.api.errors import domain_error_body, error_body, error_responses
from claas.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    ScoreRequest,
    ScoreResponse,
    TextChoice,
    TextCompletion,
    TokenLogprob,
    Usage,
)
from claas.chat import Completion, ModelTarget, new_completion_id
from claas.errors import ClaasError, InvalidRequest
from claas.ids import validate_lora_id
from claas.runtime import Runtime

router = APIRouter(prefix="/v1")

_SERVING_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; with stream=true, server-sent events.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 401, 403, 404, 409, 413, 422),
}


@router.get("/models", responses=error_responses(401))
async def models(runtime: RuntimeDep, caller: Caller) -> ModelList:
    names = [runtime.base_model] + [
        a.lora_id for a in runtime.store.list_adapters(f"{caller.owner}/" if caller.owner else "")
    ]
    return ModelList(data=[ModelCard(id=n) for n in names])


@router.post("/chat/completions", response_model=ChatCompletion, responses=_SERVING_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, runtime: RuntimeDep, tokenizing: TokenizingDep, caller: Caller
) -> ChatCompletion | StreamingResponse:
    if len(body.messages) > runtime.settings.max_messages:
        raise InvalidRequest(
            f"{len(body.messages)} messages is over the cap of "
            f"{runtime.settings.max_messages}; send fewer turns"
        )
    target = _target(runtime, caller, body.model)
    messages = [m.as_template_message() for m in body.messages]
    prompt = await tokenizing.chat(messages)
    params = _sampling_params(runtime, body, len(prompt))
    if body.stream:
        return _stream(runtime, target, prompt, messages, params, body, "chat.completion.chunk")
    completion = await runtime.chat.complete(target, prompt, messages, params, body.n)
    return ChatCompletion(
        id=completion.id,
        created=completion.created,
        model=completion.model,
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                finish_reason=c.finish_reason,
                logprobs=_logprobs_view(runtime, c.tokens, c.logprobs) if body.logprobs else None,
            )
            for c in completion.choices
        ],
        usage=_usage(completion),
    )


@router.post("/completions", response_model=TextCompletion, responses=_SERVING_RESPONSES)
async def completions(
    body: CompletionRequest, runtime: RuntimeDep, tokenizing: TokenizingDep, caller: Caller
) -> TextCompletion | StreamingResponse:
    target = _target(runtime, caller, body.model)
    prompt = await tokenizing.text(body.prompt)
    messages = [{"role": "user", "content": body.prompt}]
    params = _sampling_params(runtime, body, len(prompt))
    if body.stream:
        return _stream(runtime, target, prompt, messages, params, body, "text_completion")
    completion = await runtime.chat.complete(
        target, prompt, messages, params, body.n, prompt_text=body.prompt, prompt_format="text"
    )
    return TextCompletion(
        id=completion.id,
        created=completion.created,
        model=completion.model,
        choices=[
            TextChoice(index=c.index, text=c.text, finish_reason=c.finish_reason)
            for c in completion.choices
        ],
        usage=_usage(completion),
    )


@router.post("/score", responses=error_responses(400, 401, 403, 404, 409, 413, 422))
async def score(
    body: ScoreRequest, runtime: RuntimeDep, tokenizing: TokenizingDep, caller: Caller
) -> ScoreResponse:
    target = _target(runtime, caller, body.model)
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
    )


def _sampling_params(
    runtime: Runtime, body: SamplingFields, prompt_len: int
) -> types.SamplingParams:
    settings = runtime.settings
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > settings.max_tokens_cap:
        raise InvalidRequest(
            f"max_tokens {asked} is over this server's cap of {settings.max_tokens_cap}; ask "
            "for fewer (CLAAS_MAX_TOKENS_CAP)"
        )
    if body.n > settings.max_samples:
        raise InvalidRequest(f"n={body.n} is over this server's cap of {settings.max_samples}")
    room = runtime.max_context - prompt_len
    max_tokens = asked if asked is not None else max(1, min(settings.max_tokens_cap, room))
    return types.SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop,
    )


def _target(runtime: Runtime, caller: Principal, model: str) -> ModelTarget:
    """Resolve `model` for this caller: another owner's name is refused before any lookup, and
    the names listed in a 404 are only the caller's own."""
    lora_id = model.partition("@")[0]
    with contextlib.suppress(InvalidRequest):  # not owner/name: resolve() explains
        caller.check(validate_lora_id(lora_id))
    return runtime.chat.resolve(model, owner=caller.owner)


def _usage(completion: Completion) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


def _logprobs_view(runtime: Runtime, tokens: list[int], logprobs: list[float]) -> ChoiceLogprobs:
    pieces = runtime.tokenizer.convert_ids_to_tokens(tokens)
    return ChoiceLogprobs(
        content=[
            TokenLogprob(token=piece, logprob=lp, bytes=None, top_logprobs=[])
            for piece, lp in zip(pieces, logprobs, strict=True)
        ]
    )


def _stream(
    runtime: Runtime,
    target: ModelTarget,
    prompt: list[int],
    messages: list[dict[str, Any]],
    params: types.SamplingParams,
    body: SamplingFields,
    kind: str,
) -> StreamingResponse:
    """Server-sent events, token by token, ending with [DONE]."""
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    chunk_id = new_completion_id()
    created = int(time.time())

    def chunk(index: int, text: str | None, finish: str | None) -> str:
        if kind == "text_completion":
            choice: dict[str, Any] = {"index": index, "text": text or "", "finish_reason": finish}
        else:
            delta = {"role": "assistant", "content": text} if text is not None else {}
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        payload = {
            "id": chunk_id,
            "object": kind,
            "created": created,
            "model": target.name,
            "choices": [choice],
        }
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        task = asyncio.create_task(
            runtime.chat.complete(
                target,
                prompt,
                messages,
                params,
                body.n,
                on_text=lambda index, delta: queue.put_nowait((index, delta)),
                prompt_text=messages[-1]["content"] if kind == "text_completion" else None,
                completion_id=chunk_id,
                prompt_format="text" if kind == "text_completion" else "chat",
            )
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                yield chunk(item[0], item[1], None)
            completion = task.result()
            for choice in completion.choices:
                yield chunk(choice.index, None, choice.finish_reason)
            usage = {
                "id": chunk_id,
                "object": kind,
                "created": created,
                "model": target.name,
                "choices": [],
                "usage": _usage(completion).model_dump(),
            }
            yield f"data: {json.dumps(usage)}\n\n"
        except ClaasError as error:
            yield f"data: {json.dumps(domain_error_body(error))}\n\n"
        except Exception as error:
            failed = error_body(500, f"internal error ({type(error).__name__})", "Internal")
            yield f"data: {json.dumps(failed)}\n\n"
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
