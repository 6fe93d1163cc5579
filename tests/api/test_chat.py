"""Chat completions over HTTP on the tiny model: usage, rollouts, logprobs, streaming."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionUserMessageParam
from serving import HELLO, LiveServer, chat, create

from claas.sdpo.prompts import chat_prompt_tokens


def test_chat_response_usage_and_rollout(server: LiveServer) -> None:
    create(server, "alice/bot")
    response = chat(server, "alice/bot", n=2, temperature=1.0, seed=3, logprobs=True)
    assert response.status_code == 200, response.text
    body = response.json()
    prompt = chat_prompt_tokens(server.runtime.tokenizer, HELLO)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert len(body["choices"]) == 2
    completion_tokens = 0
    for choice in body["choices"]:
        rollout_id = body["id"] if choice["index"] == 0 else f"{body['id']}.{choice['index']}"
        rollout = server.runtime.store.get_rollout(rollout_id)
        assert rollout.prompt_tokens == prompt
        assert rollout.lora_id == "alice/bot" and rollout.adapter_version == 1
        assert len(rollout.response_tokens) == len(rollout.behavior_logprobs)
        assert [c["logprob"] for c in choice["logprobs"]["content"]] == pytest.approx(
            rollout.behavior_logprobs
        )
        assert choice["finish_reason"] == (
            "length" if len(rollout.response_tokens) == 8 else "stop"
        )
        assert rollout.sampling_params["temperature"] == 1.0
        completion_tokens += len(rollout.response_tokens)
    assert body["usage"]["completion_tokens"] == completion_tokens
    pinned = chat(server, "alice/bot@1").json()
    assert server.runtime.store.get_rollout(pinned["id"]).adapter_version == 1
    base = chat(server, server.runtime.base_model).json()
    assert server.runtime.store.get_rollout(base["id"]).lora_id is None
    parts = chat(
        server,
        "alice/bot",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there!"}],
            }
        ],
    )
    assert parts.json()["usage"]["prompt_tokens"] == len(prompt)


def test_streaming_with_the_openai_client(server: LiveServer) -> None:
    create(server, "alice/streamer")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [ChatCompletionUserMessageParam(role="user", content=m["content"]) for m in HELLO]
    stream = client.chat.completions.create(
        model="alice/streamer",
        messages=messages,
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    pieces, finishes, ids = [], [], set()
    for event in stream:
        ids.add(event.id)
        for choice in event.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    whole = client.chat.completions.create(
        model="alice/streamer",
        messages=messages,
        max_tokens=40,
        temperature=0,
    )
    assert len(pieces) > 5  # token by token, not one block at the end
    assert "".join(pieces) == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert len(ids) == 1
    rollout = server.runtime.store.get_rollout(ids.pop())  # stored before the stream ended
    assert rollout.response_text == "".join(pieces)
