"""Adapter ids and text hashes: who may reach what, and how feedback finds a rollout by text.
Also `Int64`, the one shape of a seed in every request body.

An adapter id is `owner/name`; the owner part is what an API key reaches. These checks are
pure functions, so the chat, feedback and engine layers use them without the database.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Annotated

from pydantic import Field, WithJsonSchema

from claas.errors import (
    FeedbackNotFound,
    Forbidden,
    InvalidLoraId,
    MemoryNotFound,
    RolloutNotFound,
)

LORA_ID_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LORA_ID_PATTERN = f"^{LORA_ID_PART.pattern}/{LORA_ID_PART.pattern}$"  # for the OpenAPI schema

# A seed: any int64. The schema's bounds are the int64 values furthest from 0 that a double holds
# exactly (JSON Schema validators compare numbers as doubles, so a bound of 2**63 - 1 admits
# 2**63 + 500 there, which the server refuses); the server takes the few int64 beyond them too.
INT64_SCHEMA = {
    "type": "integer",
    "format": "int64",
    "minimum": -(2**63 - 1024),
    "maximum": 2**63 - 1024,
}
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), WithJsonSchema(INT64_SCHEMA)]


def parse_lora_id(lora_id: str) -> tuple[str, str]:
    """Split `owner/name`, refusing anything else: no dots, no extra slashes, no whitespace.

    Each part is `[A-Za-z0-9][A-Za-z0-9_-]{0,63}`, so a lora_id can never be a path that leaves
    its directory (`..`, `.hidden`, `/abs`, `a\\b`).
    """
    parts = lora_id.split("/") if isinstance(lora_id, str) else []
    if len(parts) != 2 or not all(LORA_ID_PART.fullmatch(part) for part in parts):
        raise InvalidLoraId(
            "lora_id must look like 'owner/name' (letters, digits, '_' and '-', up to 64 each, "
            f"starting with a letter or digit); got {lora_id!r}"
        )
    return parts[0], parts[1]


def validate_lora_id(lora_id: str) -> str:
    """Return `lora_id` unchanged if it is a valid `owner/name`, else raise `InvalidLoraId`."""
    parse_lora_id(lora_id)
    return lora_id


def check_owner(owner: str | None, lora_id: str) -> None:
    """Refuse (403) an adapter that `owner` may not reach; `None` reaches every adapter.

    Only for ids the caller *named*: a record found by its own id (a rollout, a feedback request)
    that the caller may not see is answered as missing instead, see `visible_to`.
    """
    if owner is not None and parse_lora_id(lora_id)[0] != owner:
        raise Forbidden(
            f"this API key belongs to {owner!r} and cannot reach {lora_id}; use adapters named "
            f"'{owner}/...'"
        )


def visible_to(owner: str | None, lora_id: str | None) -> bool:
    """Whether a record of adapter `lora_id` exists for `owner` (`None`: the admin)."""
    return owner is None or (lora_id is not None and lora_id.startswith(f"{owner}/"))


def text_hash(text: str) -> str:
    """sha256 of the text after NFC normalisation, stripping, and collapsing whitespace runs.

    Prompt and response hashes both use it, so feedback that quotes an answer with different
    line wrapping or Unicode composition still finds the rollout.
    """
    normal = " ".join(unicodedata.normalize("NFC", text).split())
    # surrogatepass: a lone surrogate (valid in a Python str, not in UTF-8) still hashes.
    return hashlib.sha256(normal.encode("utf-8", "surrogatepass")).hexdigest()


def rollout_missing(rollout_id: str) -> RolloutNotFound:
    """The one answer for a rollout id that is unknown, expired, or another owner's."""
    return RolloutNotFound(
        f"rollout {rollout_id!r} has expired or never existed; chat again and give feedback "
        "on the new completion id"
    )


MEMORY_ID_PATTERN = r"^mem-[0-9a-f]{32}$"  # what `FeedbackQueue` names a memory item


def memory_missing(memory_id: str) -> MemoryNotFound:
    """The one answer for a memory id that is unknown, forgotten, or another adapter's."""
    return MemoryNotFound(
        f"memory item {memory_id!r} does not exist on this adapter; list them with "
        "GET /v1/adapters/{owner}/{name}/memory"
    )


def feedback_missing(feedback_id: str) -> FeedbackNotFound:
    """The one answer for a feedback id that is unknown, deleted, or another owner's."""
    return FeedbackNotFound(
        f"feedback request {feedback_id!r} does not exist; use the feedback_id returned by "
        "POST /v1/feedback (requests of a deleted adapter are deleted with it)"
    )
