"""Bad requests get clear 4xx errors and touch nothing."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving import HELLO, LiveServer, chat, create, error_of, make_server

# Stand-ins in the table for the completion ids the fixture makes.
ANSWER = "<a completion of alice/valid>"
OTHER_ANSWER = "<a completion of alice/other>"
BASE_ANSWER = "<a completion of the base model>"


def chat_body(model: str, **fields: Any) -> dict[str, Any]:
    """The body `serving.chat` sends."""
    return {"model": model, "messages": HELLO, "max_tokens": 8, "temperature": 0, **fields}


def feedback_body(*items: dict[str, Any]) -> dict[str, Any]:
    return {"items": list(items)}


BAD_LORA_IDS = ["../x", "a/../b", "a/b/c", "..", "/etc/passwd", "a\\b", "a/.b", ""]


def _bad_lora_id(bad: str) -> Any:
    return pytest.param(
        "POST",
        "/v1/adapters",
        {"lora_id": bad},
        422,
        "owner/name",
        id=f"create: lora_id {bad!r} is not owner/name -> 422",
    )


# Sampling at its extremes: a well-defined answer (name, fields), or a 4xx naming the field
# (name, fields, the field); never a 500.
SAMPLING_ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("top_p 5e-324 (a denormal)", {"temperature": 1, "top_p": 5e-324}),
    ("top_p 1e-300", {"temperature": 1, "top_p": 1e-300}),
    ("temperature 5e-324 (greedy)", {"temperature": 5e-324}),
    ("temperature 1e-300 (greedy)", {"temperature": 1e-300}),
    ("temperature 2 with top_p 1", {"temperature": 2, "top_p": 1}),
    ("top_k 1", {"temperature": 1, "top_k": 1}),
    ("top_k over the vocabulary", {"temperature": 1, "top_k": 10**9}),
    ("penalties at their bounds", {"presence_penalty": 2, "frequency_penalty": -2}),
    ("logit_bias +100 and -100", {"temperature": 1, "logit_bias": {"0": 100, "1": -100}}),
    ("logit_bias 0-padded id", {"logit_bias": {"007": 5}}),
]
SAMPLING_REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("top_p 0", {"top_p": 0}, "top_p"),
    ("top_p NaN", {"top_p": math.nan}, "top_p"),
    ("top_p over 1", {"top_p": 1.0000001}, "top_p"),
    ("temperature below 0", {"temperature": -5e-324}, "temperature"),
    ("temperature over 2", {"temperature": 2.0000001}, "temperature"),
    ("temperature infinite", {"temperature": math.inf}, "temperature"),
    ("top_k below 0", {"top_k": -1}, "top_k"),
    ("presence_penalty over 2", {"presence_penalty": 2.0000001}, "presence_penalty"),
    ("frequency_penalty below -2", {"frequency_penalty": -2.0000001}, "frequency_penalty"),
    ("logit_bias over 100", {"logit_bias": {"0": 100.0000001}}, "logit_bias"),
    ("logit_bias NaN", {"logit_bias": {"0": math.nan}}, "logit_bias"),
    ("logit_bias id past the vocabulary", {"logit_bias": {"999999999": 1}}, "logit_bias"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
]

# (method, path, body, expected status, a fragment of the error message). A dict body is sent as
# Python's json writes it (NaN and lone surrogates as escapes, as some clients do); bytes as they
# are. A tuple of statuses allows any of them; a None fragment checks the status only.
# fmt: off
BAD_INPUTS = [
    *(_bad_lora_id(bad) for bad in BAD_LORA_IDS),
    pytest.param(
        "GET", "/v1/adapters/alice/.hidden", None, 422, "owner/name",
        id="get: a dot-name -> 422 owner/name",
    ),
    pytest.param(
        "DELETE", "/v1/adapters/alice/...", None, 422, "owner/name",
        id="delete: a dot-name -> 422 owner/name",
    ),
    pytest.param(
        "GET", "/v1/adapters/alice/..%2F..%2Fetc", None, (404, 422), None,
        id="get: an encoded ../ in the name -> 404 or 422",
    ),
    pytest.param(
        "GET", "/v1/adapters/%2E%2E/%2E%2E", None, (404, 422), None,
        id="get: encoded dots as owner and name -> 404 or 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("nobody/nothing"), 404, "alice/valid",
        id="chat: an unknown model -> 404 listing the models there are",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid@7"), 404, "versions are [1]",
        id="chat: an unknown pinned version -> 404 listing the versions",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid@²"), 422, "must be a number",
        id="chat: a pinned version that is a digit but not a number -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid@99999999999999999999"), 422,
        "must be a number",
        id="chat: a pinned version over int64 -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid", seed=2**64), 422, "seed",
        id="chat: a seed over int64 -> 422 seed",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid", seed=-5), 200, None,
        id="chat: a negative seed is fine -> 200",
    ),
    pytest.param(
        "POST", "/v1/adapters/alice/valid/rollback", {"version": 10**30}, 422, "version",
        id="rollback: a version over int32 -> 422 version",
    ),
    pytest.param(
        "POST", "/v1/adapters", {"lora_id": "alice/valid"}, 409, "exists",
        id="create: an adapter that exists -> 409",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid", max_tokens=100000), 422, "cap",
        id="chat: max_tokens over the cap -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid", n=50), 422, "cap",
        id="chat: n over the cap -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid", messages=HELLO * 300), 422,
        "messages",
        id="chat: more messages than the cap -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid", messages=[]), 422, "messages",
        id="chat: no messages -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", b"{not json", 422, "invalid",
        id="chat: a body that is not JSON -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions",
        {"model": "alice/valid", "messages": [{"role": "user", "content": "a\ud800b"}]},
        422, "surrogate",
        id="chat: a lone surrogate in a message, which no tokenizer can encode -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions",
        {"model": "\ud800", "messages": [{"role": "user", "content": "a\ud800b"}]},
        422, "surrogate",
        id="chat: a lone surrogate as the model -> 422",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", b"x" * 2_000_000, 413, "body",
        id="chat: a body over the size limit -> 413",
    ),
    # Sampling at its extremes (SAMPLING_ACCEPTED, SAMPLING_REFUSED).
    *(
        pytest.param(
            "POST", "/v1/chat/completions", chat_body("alice/valid", **fields), 200, None,
            id=f"chat: {name} -> 200",
        )
        for name, fields in SAMPLING_ACCEPTED
    ),
    *(
        pytest.param(
            "POST", "/v1/chat/completions", chat_body("alice/valid", **fields), 422, param,
            id=f"chat: {name} -> 422 {param}",
        )
        for name, fields, param in SAMPLING_REFUSED
    ),
    pytest.param(
        "POST", "/v1/chat/completions", chat_body("alice/valid", stream_options={}), 400,
        "stream_options",
        id="chat: stream_options without stream -> 400",
    ),
    pytest.param(
        "POST", "/v1/feedback", feedback_body({"feedback": "x"}), 422, "completion_id",
        id="feedback: an item naming no completion -> 422",
    ),
    pytest.param(
        "POST", "/v1/feedback", feedback_body({"completion_id": "chatcmpl-nope", "feedback": "x"}),
        404, "chat again",
        id="feedback: an unknown completion_id -> 404 chat again",
    ),
    pytest.param(
        "POST", "/v1/feedback", feedback_body({"completion_id": BASE_ANSWER, "feedback": "x"}),
        409, "base model",
        id="feedback: on a base-model completion -> 409",
    ),
    pytest.param(
        "POST", "/v1/feedback", feedback_body({"completion_id": ANSWER, "feedback": "  "}),
        422, "empty",
        id="feedback: blank feedback -> 422 empty",
    ),
    pytest.param(
        "POST", "/v1/feedback",
        feedback_body({"completion_id": ANSWER, "feedback": "x", "example": "\u3000"}),
        422, "example is empty",
        id="feedback: a blank example -> 422 example is empty",
    ),
    pytest.param(
        "POST", "/v1/feedback",
        feedback_body({"completion_id": ANSWER, "feedback": "x", "training": {"alpha": 2}}),
        422, "alpha",
        id="feedback: alpha out of range -> 422",
    ),
    pytest.param(
        "POST", "/v1/feedback",
        feedback_body(
            {"completion_id": ANSWER, "feedback": "x", "training": {"learning_rate": math.nan}}
        ),
        422, "learning_rate",
        id="feedback: a NaN learning_rate -> 422",
    ),
    pytest.param(
        "POST", "/v1/feedback",
        feedback_body(
            {"completion_id": ANSWER, "feedback": "x", "training": {"alpha": 0.1}},
            {"completion_id": ANSWER, "feedback": "y", "training": {"alpha": 0.2}},
        ),
        422, "training config",
        id="feedback: items with different training configs -> 422",
    ),
    pytest.param(
        "POST", "/v1/feedback",
        feedback_body(
            {"completion_id": ANSWER, "feedback": "x"},
            {"completion_id": OTHER_ANSWER, "feedback": "y"},
        ),
        422, "different adapters",
        id="feedback: items for different adapters -> 422",
    ),
    pytest.param(
        "GET", "/v1/feedback/fb-unknown", None, 404, "feedback_id",
        id="feedback status: an unknown feedback_id -> 404",
    ),
    pytest.param(
        "POST", "/v1/adapters/alice/valid/rollback", {"version": 9}, 404, "[1]",
        id="rollback: to a version that does not exist -> 404 listing the versions",
    ),
    pytest.param(
        "GET", "/v1/nope", None, 404, "docs",
        id="an unknown route -> 404 pointing to /docs",
    ),
]
# fmt: on


@pytest.fixture(scope="module")
def bad_input_server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """alice/valid and alice/other at version 1, and a completion of each and of the base model."""
    live = make_server(tmp_path_factory.mktemp("bad-inputs"), model_cache, max_tokens_cap=256)
    create(live, "alice/valid")
    create(live, "alice/other")
    completions = {
        ANSWER: chat(live, "alice/valid").json()["id"],
        OTHER_ANSWER: chat(live, "alice/other").json()["id"],
        BASE_ANSWER: chat(live, live.runtime.base_model).json()["id"],
    }
    yield live, completions
    live.close()


def _fill(body: Any, completions: dict[str, str]) -> Any:
    """`body` with each stand-in replaced by its completion id."""
    if isinstance(body, dict):
        return {key: _fill(value, completions) for key, value in body.items()}
    if isinstance(body, list):
        return [_fill(value, completions) for value in body]
    return completions.get(body, body) if isinstance(body, str) else body


@pytest.mark.parametrize(("method", "path", "body", "status", "fragment"), BAD_INPUTS)
def test_bad_inputs_get_clear_errors(
    bad_input_server: tuple[LiveServer, dict[str, str]],
    method: str,
    path: str,
    body: dict[str, Any] | bytes | None,
    status: int | tuple[int, ...],
    fragment: str | None,
) -> None:
    """Each bad request gets a clear 4xx, and touches nothing: no checkpoint, nothing queued."""
    live, completions = bad_input_server
    checkpoints = live.runtime.settings.data_dir / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    if isinstance(body, dict):
        content: bytes | None = json.dumps(_fill(body, completions)).encode()
        headers = {"content-type": "application/json"}
    else:
        content, headers = body, {}
    response = live.client.request(method, path, content=content, headers=headers)
    allowed = status if isinstance(status, tuple) else (status,)
    assert response.status_code in allowed, response.text
    if fragment is not None:
        message = error_of(response)[1]
        assert fragment in message, message
    assert sorted(p.name for p in checkpoints.iterdir()) == before
    assert live.runtime.store.count_feedback(statuses=["queued"]) == 0  # nothing was queued
    assert live.client.get("/v1/health").json()["status"] == "ok"
