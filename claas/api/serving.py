"""How a completion is sent: OpenAI's log-probs, token counts, and the server-sent event stream.

The routes in `routes/openai.py` validate a request and start a completion; this module turns
what `claas.chat` returns into OpenAI's shapes (`openai_responses`):

- log-probs: the tokens that make up the answer's text, each with its text and UTF-8 bytes as
  OpenAI shows them (`claas.api.tokens`), in the chat shape (`ChoiceLogprobs`) or the legacy
  completions one (`CompletionLogprobs`);
- a stream (`stream`): per choice a first chunk with the role (chat only), its text deltas, and
  a last chunk with `finish_reason` (and the whole answer's log-probs, if asked); then a usage
  chunk only with `stream_options.include_usage`; then `[DONE]`. A failure after the 200 was
  sent is an error event in the API's error body, before `[DONE]`.

A chunk is a typed model (`ChatCompletionChunk`, `TextCompletionChunk`), sent as JSON with only
the fields it was built with: a delta without a role or text omits them, as OpenAI's do, and
`usage` is present (null until the counts' own chunk) only with `include_usage`.
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

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from tinker import types
from transformers import PreTrainedTokenizerBase

from claas.api.errors import domain_error_body, internal_error_body
from claas.api.openai_requests import SamplingFields
from claas.api.openai_responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    CompletionLogprobs,
    TextChunkChoice,
    TextCompletionChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from claas.api.tokens import TokenText
from claas.chat import Choice, Completion, GenerationSlot, ModelTarget, new_completion_id
from claas.errors import ClaasError
from claas.runtime import Runtime

log = logging.getLogger("claas.http")
_T = TypeVar("_T")

Chunk = ChatCompletionChunk | TextCompletionChunk


class ClientGone(ClaasError):
    """The client disconnected before its answer was ready (logged as nginx's 499)."""

    status_code = 499


def usage(completion: Completion) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------


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


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, choice: Choice) -> ChoiceLogprobs:
    show = _token_text(tokenizer).show
    content = []
    for token, logprob, top in _answer_tokens(tokenizer, choice):
        text, raw = show(token)
        alternatives = [TopLogprob(token=show(t)[0], logprob=lp, bytes=show(t)[1]) for t, lp in top]
        content.append(
            TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=alternatives)
        )
    return ChoiceLogprobs(content=content)


def text_logprobs(tokenizer: PreTrainedTokenizerBase, choice: Choice) -> CompletionLogprobs:
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


# ---------------------------------------------------------------------------------------------
# Waiting for an answer
# ---------------------------------------------------------------------------------------------


async def unless_client_leaves(request: Request, work: Awaitable[_T]) -> _T:
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


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


class StreamedAnswer:
    """What one streamed request asked for, and the chunks of its answer."""

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
        self.id = new_completion_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion.chunk"

    def opening(self, index: int) -> Chunk:
        """A chat choice's first chunk: the role, and empty text."""
        delta = ChatDelta(role="assistant", content="")
        return self._chunk(
            [ChatChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=None)]
        )

    def piece(self, index: int, text: str) -> Chunk:
        """The next piece of a choice's text."""
        if self.chat:
            delta = ChatDelta(content=text)
            return self._chunk(
                [ChatChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=None)]
            )
        return self._chunk(
            [TextChunkChoice(index=index, text=text, logprobs=None, finish_reason=None)]
        )

    def closing(self, tokenizer: PreTrainedTokenizerBase, done: Choice) -> Chunk:
        """A choice's last chunk: why it ended, and its log-probs if they were asked for."""
        if self.chat:
            logprobs = chat_logprobs(tokenizer, done) if self.logprobs else None
            return self._chunk(
                [
                    ChatChunkChoice(
                        index=done.index,
                        delta=ChatDelta(),
                        logprobs=logprobs,
                        finish_reason=done.finish_reason,
                    )
                ]
            )
        text_logs = text_logprobs(tokenizer, done) if self.logprobs else None
        return self._chunk(
            [
                TextChunkChoice(
                    index=done.index, text="", logprobs=text_logs, finish_reason=done.finish_reason
                )
            ]
        )

    def counts(self, completion: Completion) -> Chunk:
        """The usage chunk (`include_usage`): the token counts, and no choices."""
        return self._chunk([], usage(completion))

    def _chunk(
        self, choices: list[ChatChunkChoice] | list[TextChunkChoice], counts: Usage | None = None
    ) -> Chunk:
        fields: dict[str, Any] = {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.target.name,
            "choices": choices,
        }
        if self.include_usage:  # null on every chunk but the counts' own
            fields["usage"] = counts
        model = ChatCompletionChunk if self.chat else TextCompletionChunk
        return model.model_validate(fields)


def _event(payload: Chunk | dict[str, Any]) -> str:
    """One server-sent event. A chunk carries only the fields it was built with."""
    if not isinstance(payload, dict):
        payload = payload.model_dump(exclude_unset=True)
    return f"data: {json.dumps(payload)}\n\n"


def stream(runtime: Runtime, answer: StreamedAnswer, slot: GenerationSlot) -> StreamingResponse:
    """The answer as server-sent events, as OpenAI sends them. `slot` is released when the
    stream ends, however it ends."""
    # The background task frees the slot too, should the stream never start (release is once).
    return StreamingResponse(
        _events(runtime, answer, slot),
        media_type="text/event-stream",
        background=BackgroundTask(slot.release),
    )


async def _events(
    runtime: Runtime, answer: StreamedAnswer, slot: GenerationSlot
) -> AsyncIterator[str]:
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    task = asyncio.create_task(
        runtime.chat.complete(
            answer.target,
            answer.prompt,
            answer.messages,
            answer.params,
            answer.n,
            on_text=lambda index, delta: queue.put_nowait((index, delta)),
            prompt_text=None if answer.chat else answer.messages[-1]["content"],
            completion_id=answer.id,
            prompt_format="chat" if answer.chat else "text",
            top_logprobs=answer.top_logprobs,
        )
    )
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        if answer.chat:
            for index in range(answer.n):
                yield _event(answer.opening(index))
        while (item := await queue.get()) is not None:
            if item[1]:
                yield _event(answer.piece(*item))
        completion = task.result()
        for done in completion.choices:
            yield _event(answer.closing(runtime.tokenizer, done))
        if answer.include_usage:
            yield _event(answer.counts(completion))
    except ClaasError as error:
        yield _event(domain_error_body(error))
    except Exception as error:
        # The 200 and its headers are sent: log it here, the error handler never sees it.
        log.exception("a streamed answer failed", extra={"completion_id": answer.id})
        yield _event(internal_error_body(error))
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        slot.release()
    yield "data: [DONE]\n\n"
