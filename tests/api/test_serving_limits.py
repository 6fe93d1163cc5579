"""What one client cannot make the server do: generate for nobody, generate without bound, or
take more than its owner's share of the decoder.

Real uvicorn servers on 127.0.0.1 on the tiny random Llama; a client that leaves is a real
socket closed mid-request. Nothing here times anything: the decoder's own row counts say
whether generation went on.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from serving import ALICE, BOB, HELLO, OWNER_KEYS, LiveServer, chat, create, make_server

from claas.api.openai_requests import COMPLETION_MAX_TOKENS
from claas.chat import GenerationSlots
from claas.errors import TooManyRequests
from claas.services.local.scheduler import ContinuousDecoder

LONG = 1500  # tokens asked for by the answers nobody waits for


@pytest.fixture(scope="module")
def limited(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Keyed, with room for long answers, and two generations at once per owner."""
    live = make_server(
        tmp_path_factory.mktemp("limits"),
        model_cache,
        api_keys=OWNER_KEYS,
        max_concurrent_generations_per_owner=2,
    )
    create(live, "alice/long", headers=ALICE)
    create(live, "bob/long", headers=BOB)
    yield live
    live.close()


def decoder_of(live: LiveServer) -> ContinuousDecoder:
    decoder = live.runtime.service.host.decoder  # type: ignore[attr-defined]
    assert isinstance(decoder, ContinuousDecoder)
    return decoder


def wait_until(condition: Callable[[], bool], what: str, limit: float = 120) -> None:
    """Poll until `condition` holds; the limit only keeps a broken build from hanging."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def send_and_leave_open(live: LiveServer, path: str, body: dict[str, Any]) -> socket.socket:
    """POST `body` as alice on a raw socket and leave it open: closing it is the client going."""
    host, port = live.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: {ALICE['authorization']}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode() + payload)
    return sock


LEAVING = [
    pytest.param(
        "/v1/chat/completions",
        {"model": "alice/long", "messages": HELLO, "max_tokens": LONG, "temperature": 0},
        id="chat",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "alice/long", "prompt": "Once upon a time", "max_tokens": LONG},
        id="completion",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "alice/long", "messages": HELLO, "max_tokens": LONG, "stream": True},
        id="streamed chat",
    ),
]


@pytest.mark.parametrize(("path", "body"), LEAVING)
def test_a_client_that_leaves_frees_its_rows_at_once(
    limited: LiveServer, path: str, body: dict[str, Any]
) -> None:
    """A 1,500-token answer whose client disconnects as soon as it starts decoding leaves the
    batch: its row is freed long before its tokens are done, and its owner's generation slot
    is given back. Feedback is another matter (next test)."""
    decoder = decoder_of(limited)
    wait_until(lambda: decoder.running_rows == 0, "an idle decoder")
    before = decoder.rows_decoded
    with send_and_leave_open(limited, path, body):
        wait_until(lambda: decoder.running_rows == 1, "the answer decoding")
    wait_until(lambda: decoder.running_rows == 0, "its row freed")
    decoded = decoder.rows_decoded - before
    assert 0 < decoded < LONG // 2, f"{decoded} tokens were decoded for nobody"
    wait_until(lambda: limited.runtime.chat.generations.running("alice") == 0, "slot given back")


def test_feedback_is_trained_when_its_waiting_client_leaves(limited: LiveServer) -> None:
    """`?wait=true` is only a wait: a feedback request admitted is durable, and trained even if
    its caller disconnects while it trains."""
    answer = chat(limited, "alice/long", h=ALICE).json()["id"]
    item = {"completion_id": answer, "feedback": "Shorter.", "training": {"steps_per_batch": 2}}
    store = limited.runtime.store
    with send_and_leave_open(limited, "/v1/feedback?wait=true", {"items": [item]}):
        wait_until(lambda: store.count_feedback(owner="alice") == 1, "the request admitted")
    (request,) = store.list_feedback(lora_id="alice/long")
    wait_until(lambda: store.get_feedback(request.id).status == "done", "the request trained")
    assert store.get_feedback(request.id).version == 2


def test_plain_completions_default_to_16_tokens(limited: LiveServer) -> None:
    """OpenAI's default for /v1/completions, not the room left in the context (~2,000 here)."""
    body = {"model": "alice/long", "prompt": "Once upon a time", "temperature": 0}
    answer = limited.client.post("/v1/completions", json=body, headers=ALICE).json()
    (choice,) = answer["choices"]
    tokens = answer["usage"]["completion_tokens"]
    assert tokens <= COMPLETION_MAX_TOKENS
    assert choice["finish_reason"] == "stop" or tokens == COMPLETION_MAX_TOKENS
    longer = limited.client.post("/v1/completions", json={**body, "max_tokens": 40}, headers=ALICE)
    assert longer.json()["usage"]["completion_tokens"] > COMPLETION_MAX_TOKENS  # no hidden cap


def test_an_owner_past_its_concurrent_generations_gets_429(limited: LiveServer) -> None:
    """Two generations at once per owner here: a third waits for one of them (429 with
    Retry-After); another owner is not held back; a slot comes back when its stream closes."""
    streamed = {
        "model": "alice/long",
        "messages": HELLO,
        "max_tokens": 2000,
        "temperature": 0,  # the tiny model repeats a newline: it runs to max_tokens
        "stream": True,
    }
    client = limited.client
    with ExitStack() as streams:
        running = []  # an iterator dropped closes its stream: these are kept until the end
        for _ in range(2):
            stream = streams.enter_context(
                client.stream("POST", "/v1/chat/completions", json=streamed, headers=ALICE)
            )
            assert stream.status_code == 200
            running.append(stream.iter_lines())
            next(running[-1])  # it runs
        refused = chat(limited, "alice/long", h=ALICE)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "CLAAS_MAX_CONCURRENT_GENERATIONS_PER_OWNER" in refused.json()["error"]["message"]
        completion = {"model": "alice/long", "prompt": "x"}
        assert client.post("/v1/completions", json=completion, headers=ALICE).status_code == 429
        assert chat(limited, "bob/long", h=BOB).status_code == 200
    generations = limited.runtime.chat.generations
    wait_until(lambda: generations.running("alice") == 0, "both streams' slots given back")
    assert chat(limited, "alice/long", h=ALICE).status_code == 200


@pytest.mark.parametrize(
    "extreme",
    [
        pytest.param({"temperature": 1.0, "top_p": 5e-324}, id="top_p a denormal"),
        pytest.param({"temperature": 1.0, "top_p": 1e-300}, id="top_p 1e-300"),
        pytest.param({"temperature": 5e-324}, id="temperature a denormal"),
        pytest.param({"temperature": 1.0, "top_k": 1}, id="top_k 1"),
    ],
)
def test_sampling_that_keeps_one_token_is_greedy(
    limited: LiveServer, extreme: dict[str, Any]
) -> None:
    """A top_p no token's mass reaches keeps the likeliest one (as vLLM does), and a temperature
    too small to divide by is greedy: the answer is the greedy answer, token for token."""
    fields = {"max_tokens": 12, "logprobs": True, "seed": 7}
    greedy = chat(limited, "alice/long", h=ALICE, **fields).json()["choices"][0]
    sampled = chat(limited, "alice/long", h=ALICE, **{**fields, **extreme})
    assert sampled.status_code == 200, sampled.text
    tokens = [t["token"] for t in sampled.json()["choices"][0]["logprobs"]["content"]]
    assert tokens == [t["token"] for t in greedy["logprobs"]["content"]]


def test_a_generation_slot_is_released_once() -> None:
    slots = GenerationSlots(2)
    slot = slots.take("carol")
    assert slots.running("carol") == 1
    slot.release()
    slot.release()  # the stream's end and its background task both release it
    assert slots.running("carol") == 0
    with slots.take("carol"), slots.take("carol"), pytest.raises(TooManyRequests):
        slots.take("carol")
    assert slots.running("carol") == 0


def test_no_limit_never_refuses() -> None:
    """A limit of None (the ChatService default, used in-process) never refuses."""
    slots = GenerationSlots(None)
    held = [slots.take("x") for _ in range(100)]
    assert slots.running("x") == 100
    for slot in held:
        slot.release()
    assert slots.running("x") == 0
