"""Streaming an answer's text as its tokens arrive: only what the final answer will show.

The final text of an answer is its decoded tokens without `<think>…</think>` reasoning
(`visible_text`), cut before the first of the request's stop strings (`cut_at_stop`), as
OpenAI's is. `StreamDecoder` sends deltas that add up to exactly that text: it never splits a
character, leaks the start of a `<think>` tag, or sends any part of a stop string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tinker import types
from transformers import PreTrainedTokenizerBase

THINK_BLOCK = re.compile(r"<think>.*?(</think>\s*|$)", re.DOTALL)
THINK_OPEN = "<think>"


def visible_text(raw: str) -> str:
    """The answer without `<think>…</think>` reasoning (an unclosed block hides the rest)."""
    return THINK_BLOCK.sub("", raw)


def stop_strings(params: types.SamplingParams) -> list[str]:
    """The request's stop strings (token-id stops are the sampler's business)."""
    stop = params.stop
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop or [] if isinstance(s, str)]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest stop string, which OpenAI leaves out of the answer."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might begin a stop string (or a `<think>` tag), and so
    must wait for the next token before they are streamed."""
    markers = [THINK_OPEN, *stops]
    for held in range(min(len(text), max(len(m) for m in markers)), 0, -1):
        tail = text[-held:]
        if any(m.startswith(tail) and m != tail for m in markers):
            return held
    return 0


class StreamDecoder:
    """Turns a growing token list into visible-text deltas: never splitting a character,
    leaking the start of a `<think>` tag, or sending any part of a stop string. What it sends
    adds up to the answer's final text (`visible_text`, then `cut_at_stop`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        visible = visible_text(text)
        shown = cut_at_stop(visible, self.stops)
        if len(shown) < len(visible):
            self.stopped = True  # a stop string: nothing after it is ever sent
        else:
            shown = shown[: len(shown) - _held_back(shown, self.stops)]
        if not shown.startswith(self.sent):
            return ""
        delta, self.sent = shown[len(self.sent) :], shown
        return delta
