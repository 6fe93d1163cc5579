"""OpenAI-compatible serving: /v1/models, /v1/chat/completions, /v1/completions, and /v1/score.

Each answer is stored as a rollout under its completion id, which feedback then names. With
`stream: true` the answer is sent as server-sent events, token by token, ending with [DONE].

OpenAI's behaviour, field by field: what the sampler can do is done exactly (penalties,
`logit_bias`, `top_logprobs`, stop strings left out of the text, usage chunks only with
`stream_options.include_usage`); what it cannot is refused with a 400 naming the field
(`SamplingFields.refuse_unsupported`), never accepted and ignored. Log-probs are the model's own
(temperature 1, before penalties and bias): the numbers training computes. Streamed log-probs
arrive whole, on each choice's last chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from tinker import types
from transformers import PreTrainedTokenizerBase

from claas.api.auth import Principal
from claas.api.deps import Caller, RuntimeDep, TokenizingDep
from claas.api.errors import domain_error_body, error_body, error_responses
from claas.api.schemas import (
    COMPLETION_MAX_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    ScoreRequest,
    ScoreResponse,
    TextChoice,
    TextChunkChoice,
    TextCompletion,
    TextCompletionChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from claas.api.tokens import TokenText
from claas.chat import Choice, Completion, GenerationSlot, ModelTarget, new_completion_id
from claas.errors import AdapterNotFound, ClaasError, InvalidRequest
from claas.ids import validate_lora_id
from claas.runtime import Runtime

router = APIRouter(prefix="/v1")
_T = TypeVar("_T")


class ClientGone(ClaasError):
    """The client disconnected before its answer was ready (logged as nginx's 499)."""

    status_code = 499


log = logging.getLogger("claas.http")

_SERVING_RESPONSES: dict[int | str, dict[str, Any]] = {
    # the text/event-stream events are documented by claas.api.openapi
    200: {"description": "The completion; with stream=true, server-sent events."},
    **error_responses(400, 401, 403, 404, 409, 413, 422, 429),
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
        asked = _Streamed(
            "chat.completion.chunk", target, prompt, messages, params, body, body.logprobs, top_k
        )
        return _stream(runtime, asked, slot)
    with slot:
        completion = await _unless_client_leaves(
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
                logprobs=_chat_logprobs(runtime.tokenizer, c) if body.logprobs else None,
            )
            for c in completion.choices
        ],
        usage=_usage(completion),
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
        asked = _Streamed(
            "text_completion", target, prompt, messages, params, body, wants_logprobs, top_k
        )
        return _stream(runtime, asked, slot)
    with slot:
        completion = await _unless_client_leaves(
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
                logprobs=_text_logprobs(runtime.tokenizer, c) if wants_logprobs else None,
            )
            for c in completion.choices
        ],
        usage=_usage(completion),
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


async def _unless_client_leaves(request: Request, work: Awaitable[_T]) -> _T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled (a chat's
    rows leave the decoder at their next token) and ClientGone is raised. Nobody is left to
    answer, and the batch is not slowed by an answer nobody reads."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (task, gone):
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting
    if task.cancelled():
        raise ClientGone("the client disconnected before the answer was ready; nothing was kept")
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body was read already: what comes next is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(completion: Completion) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


@functools.cache
def _token_text(tokenizer: PreTrainedTokenizerBase) -> TokenText:
    return TokenText(tokenizer)


def _answer_tokens(
    tokenizer: PreTrainedTokenizerBase, choice: Choice
) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(token, log-prob, top alternatives) of the tokens that make up the answer's text: the
    tokens after it (a stop string's, a closing end-of-turn) are left out, as from the text.
    When the text is not a prefix of the tokens (a hidden `<think>` block), all are kept."""
    tops = choice.top_logprobs or [[] for _ in choice.tokens]
    rows = list(zip(choice.tokens, choice.logprobs, tops, strict=True))
    show = _token_text(tokenizer).show
    joined = b"".join(bytes(show(token)[1]) for token, _, _ in rows)
    text = choice.text.encode()
    if not joined.startswith(text):
        special = set(tokenizer.all_special_ids)
        while rows and choice.finish_reason == "stop" and rows[-1][0] in special:
            rows.pop()
        return rows
    kept, length = [], 0
    for row in rows:
        if length >= len(text):
            break
        kept.append(row)
        length += len(show(row[0])[1])
    return kept


def _chat_logprobs(tokenizer: PreTrainedTokenizerBase, choice: Choice) -> ChoiceLogprobs:
    show = _token_text(tokenizer).show
    content = []
    for token, logprob, top in _answer_tokens(tokenizer, choice):
        text, raw = show(token)
        alternatives = [TopLogprob(token=show(t)[0], logprob=lp, bytes=show(t)[1]) for t, lp in top]
        content.append(
            TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=alternatives)
        )
    return ChoiceLogprobs(content=content)


def _text_logprobs(tokenizer: PreTrainedTokenizerBase, choice: Choice) -> CompletionLogprobs:
    show = _token_text(tokenizer).show
    rows = _answer_tokens(tokenizer, choice)
    texts = [show(token)[0] for token, _, _ in rows]
    offsets, raw = [], b""
    for token, _, _ in rows:  # character offsets, from the bytes before each token
        offsets.append(len(raw.decode("utf-8", errors="ignore")))
        raw += bytes(show(token)[1])
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[logprob for _, logprob, _ in rows],
        top_logprobs=[{show(t)[0]: lp for t, lp in top} for _, _, top in rows],
        text_offset=offsets,
    )


class _Streamed:
    """What one streamed request asked for."""

    def __init__(
        self,
        kind: Literal["chat.completion.chunk", "text_completion"],
        target: ModelTarget,
        prompt: list[int],
        messages: list[dict[str, Any]],
        params: types.SamplingParams,
        body: SamplingFields,
        logprobs: bool,
        top_logprobs: int,
    ) -> None:
        self.kind = kind
        self.target = target
        self.prompt = prompt
        self.messages = messages
        self.params = params
        self.n = body.n
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion.chunk"


def _stream(runtime: Runtime, request: _Streamed, slot: GenerationSlot) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: per choice a first chunk with the role (chat),
    text deltas, a last chunk with `finish_reason` (and the log-probs, if asked); then a usage
    chunk only with `stream_options.include_usage`; then [DONE]. `slot` is released when the
    stream ends, however it ends."""
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    chunk_id = new_completion_id("chatcmpl" if request.chat else "cmpl")
    created = int(time.time())

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def chunk(choices: list[Any], usage: Usage | None = None) -> str:
        fields: dict[str, Any] = {
            "id": chunk_id,
            "object": request.kind,
            "created": created,
            "model": request.target.name,
            "choices": choices,
        }
        if request.include_usage:  # null on every chunk but the counts' own
            fields["usage"] = usage
        model = ChatCompletionChunk if request.chat else TextCompletionChunk
        return event(model.model_validate(fields).model_dump(exclude_unset=True))

    def choice(
        index: int,
        text: str | None,
        finish: types.StopReason | None = None,
        logprobs: ChoiceLogprobs | CompletionLogprobs | None = None,
        first: bool = False,
    ) -> ChatChunkChoice | TextChunkChoice:
        if request.chat:
            delta = ChatDelta(role="assistant", content="") if first else ChatDelta()
            if text is not None:
                delta.content = text
            return ChatChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish
            )
        return TextChunkChoice(
            index=index, text=text or "", logprobs=logprobs, finish_reason=finish
        )

    def logprobs_of(done: Choice) -> ChoiceLogprobs | CompletionLogprobs | None:
        if not request.logprobs:
            return None
        if request.chat:
            return _chat_logprobs(runtime.tokenizer, done)
        return _text_logprobs(runtime.tokenizer, done)

    async def events() -> AsyncIterator[str]:
        task = asyncio.create_task(
            runtime.chat.complete(
                request.target,
                request.prompt,
                request.messages,
                request.params,
                request.n,
                on_text=lambda index, delta: queue.put_nowait((index, delta)),
                prompt_text=None if request.chat else request.messages[-1]["content"],
                completion_id=chunk_id,
                prompt_format="chat" if request.chat else "text",
                top_logprobs=request.top_logprobs,
            )
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            if request.chat:
                for index in range(request.n):
                    yield chunk([choice(index, None, first=True)])
            while (item := await queue.get()) is not None:
                if item[1]:
                    yield chunk([choice(item[0], item[1])])
            completion = task.result()
            for done in completion.choices:
                yield chunk([choice(done.index, None, done.finish_reason, logprobs_of(done))])
            if request.include_usage:
                yield chunk([], _usage(completion))
        except ClaasError as error:
            yield event(domain_error_body(error))
        except Exception as error:
            # The 200 and its headers are sent: log it here, the error handler never sees it.
            log.exception("a streamed answer failed", extra={"completion_id": chunk_id})
            yield event(
                error_body(500, f"internal error ({type(error).__name__})", "InternalError")
            )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            slot.release()
        yield "data: [DONE]\n\n"

    # The background task frees the slot too, should the stream never start (release is once).
    return StreamingResponse(
        events(), media_type="text/event-stream", background=BackgroundTask(slot.release)
    )
