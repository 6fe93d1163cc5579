"""Verifiers: does one answer follow one preference? Each returns a score in [0, 1].

A verifier is named in a preference's YAML (`verifier: {name, params}`); its parameters are
validated by the verifier's own pydantic model, so a typo in a user's YAML is refused with the
field's name. Compliance, the headline metric of `claas eval`, is the mean score over the
preference's held-out probes.

    verifier = build_verifier("identity", {"name": "Kuro"})
    verifier.score("I'm Kuro, nice to meet you.", finish_reason="stop")  # 1.0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import emoji
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# A sentence ends at . ! or ? followed by space, or at a line break (a list item is a sentence).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\S+")


class Verifier(Protocol):
    def score(self, response: str, finish_reason: str) -> float: ...


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConciseParams(_Params):
    max_sentences: int = Field(3, ge=1)
    max_words: int = Field(60, ge=1)


def count_sentences(text: str) -> int:
    return sum(1 for part in _SENTENCE_BREAK.split(text.strip()) if _WORD.search(part))


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


class Concise:
    """1.0 within both limits; over a limit, the share of it kept (3 sentences of 6: 0.5).

    An answer cut at max_tokens (finish_reason "length") scores 0: it was interrupted, not
    concise, and would otherwise look compliant exactly when it is longest.
    """

    def __init__(self, params: ConciseParams) -> None:
        self.params = params

    def score(self, response: str, finish_reason: str) -> float:
        if finish_reason == "length":
            return 0.0
        sentences, words = count_sentences(response), count_words(response)
        if words == 0:
            return 0.0
        return min(1.0, self.params.max_sentences / max(sentences, 1)) * min(
            1.0, self.params.max_words / words
        )


class NoEmoji:
    """1.0 when the answer holds no emoji by the `emoji` library's table, else 0.0."""

    def __init__(self, params: _Params) -> None:
        self.params = params

    def score(self, response: str, finish_reason: str) -> float:
        return 0.0 if emoji.emoji_count(response) else 1.0


class IdentityParams(_Params):
    name: str = Field(min_length=1, max_length=64)


class Identity:
    """1.0 when the answer uses the name as the assistant's own, case-insensitively.

    "I'm Kuro", "I am Kuro", "my name is Kuro", "call me Kuro", "this is Kuro", "Kuro here";
    a mere mention ("Kuro is a dog's name", "I'm Kuro's friend") scores 0.
    """

    def __init__(self, params: IdentityParams) -> None:
        name = re.escape(params.name)
        own = r"(?:i\s*['’]?\s*m|i\s+am|my\s+name\s+is|my\s+name['’]s|call\s+me|this\s+is)"
        not_possessive = r"(?!['’]s\b)\b"
        self.pattern = re.compile(
            rf"\b{own}\s+(?:called\s+)?{name}{not_possessive}|(?:^|[\s,.!?]){name}\s+here\b",
            re.IGNORECASE,
        )

    def score(self, response: str, finish_reason: str) -> float:
        return 1.0 if self.pattern.search(response) else 0.0


_REGISTRY: dict[str, tuple[type[_Params], Callable[[Any], Verifier]]] = {
    "concise": (ConciseParams, Concise),
    "no_emoji": (_Params, NoEmoji),
    "identity": (IdentityParams, Identity),
}
VERIFIER_NAMES = tuple(sorted(_REGISTRY))


def build_verifier(name: str, params: Mapping[str, Any]) -> Verifier:
    """The named verifier with validated parameters; ValueError says what is wrong."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown verifier {name!r}; use one of {', '.join(VERIFIER_NAMES)}")
    params_model, factory = _REGISTRY[name]
    try:
        return factory(params_model.model_validate(dict(params)))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ValueError(f"verifier {name!r} parameters: {problems}") from None
