"""The HTTP API against a real uvicorn server on 127.0.0.1, with the tiny model (and SmolLM2).

In-process servers run uvicorn in a thread; the restart test runs `claas serve` as a
subprocess so that it can be killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serving import (
    ADMIN,
    ADMIN_KEY,
    ALICE,
    BOB,
    HELLO,
    OWNER_KEYS,
    LiveServer,
    bearer,
    chat,
    create,
    error_of,
    finished,
    free_port,
    make_server,
    save_tiny_model,
    train_once,
    wait_healthy,
)
from sqlalchemy import text

from claas.api.dashboard.feedback_log import feedback_rows
from claas.models import LoadedModel
from claas.sdpo.prompts import EXAMPLE_INTRO, chat_prompt_tokens

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# The README, verbatim
# ---------------------------------------------------------------------------------------------


def readme_quickstart() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "README has no bash block under ## Quickstart"
    return match.group(1)


def test_readme_quickstart_runs_verbatim(server: LiveServer, tmp_path: Path) -> None:
    script = readme_quickstart()
    assert script.count("curl ") == 4
    script = script.replace("http://127.0.0.1:8000", server.url)
    script = script.replace("/tmp/claas-chat.json", str(tmp_path / "chat.json"))
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    outputs = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    created, first, feedback, second = outputs
    assert created["lora_id"] == "alice/assistant" and created["current_version"] == 1
    assert first["model"] == "alice/assistant" and first["choices"][0]["message"]["content"]
    assert feedback["status"] == "done" and feedback["version"] == 2, feedback
    assert feedback["metrics"]["divergence_mode"] == "topk_gjs"
    assert second["choices"][0]["message"]["content"]
    rollout = server.runtime.store.get_rollout(second["id"])
    assert rollout.adapter_version == 2  # served by the new version at once


# ---------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------


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
    stream = client.chat.completions.create(
        model="alice/streamer",
        messages=HELLO,  # type: ignore[arg-type]
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
        messages=HELLO,
        max_tokens=40,
        temperature=0,  # type: ignore[arg-type]
    )
    assert len(pieces) > 5  # token by token, not one block at the end
    assert "".join(pieces) == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert len(ids) == 1
    rollout = server.runtime.store.get_rollout(ids.pop())  # stored before the stream ended
    assert rollout.response_text == "".join(pieces)


# ---------------------------------------------------------------------------------------------
# Feedback: ordering, failures, restart
# ---------------------------------------------------------------------------------------------


def test_feedback_by_text_and_status(server: LiveServer) -> None:
    create(server, "alice/texty")
    answer = chat(server, "alice/texty").json()
    text = answer["choices"][0]["message"]["content"]
    response = server.client.post(
        "/v1/feedback",
        json={
            "items": [
                {
                    "lora_id": "alice/texty",
                    "prompt": "  Hello   there! ",  # whitespace differences are normalised
                    "response": text,
                    "feedback": "Shorter please.",
                    "training": {"steps_per_batch": 1},
                }
            ]
        },
    )
    assert response.status_code == 202, response.text
    feedback_id = response.json()["feedback_id"]
    status = finished(server.client, feedback_id)
    assert status["status"] == "done" and status["version"] == 2
    assert status["items"][0]["rollout_id"] == answer["id"]
    log = server.client.get("/v1/feedback", params={"lora_id": "alice/texty"}).json()
    assert [entry["feedback_id"] for entry in log["data"]] == [feedback_id]


def test_concurrent_feedback_keeps_order_per_adapter(server: LiveServer) -> None:
    adapters = ["alice/one", "bob/two", "carol/three"]
    rollouts = {}
    for lora_id in adapters:
        create(server, lora_id)
        rollouts[lora_id] = chat(server, lora_id, max_tokens=4).json()["id"]

    async def send_all() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def send(index: int) -> tuple[str, str]:
                lora_id = adapters[index % 3]
                item = {
                    "completion_id": rollouts[lora_id],
                    "feedback": f"note {index}",
                    "training": {"steps_per_batch": 1},
                }
                response = await client.post("/v1/feedback", json={"items": [item]})
                assert response.status_code == 202, response.text
                return lora_id, response.json()["feedback_id"]

            return list(await asyncio.gather(*(send(i) for i in range(20))))

    sent = asyncio.run(send_all())
    deadline = time.monotonic() + 300
    for lora_id in adapters:
        while True:
            log = server.client.get("/v1/feedback", params={"lora_id": lora_id}).json()["data"]
            if all(entry["status"] == "done" for entry in log) and len(log) == sum(
                1 for owner, _ in sent if owner == lora_id
            ):
                break
            assert time.monotonic() < deadline, log
            time.sleep(0.1)
        arrival = list(reversed(log))  # the log is newest first
        versions = [entry["version"] for entry in arrival]
        assert versions == sorted(versions), versions  # trained in arrival order
        distinct = sorted(set(versions))
        assert distinct == list(range(2, 2 + len(distinct)))  # contiguous, none lost
        stored = [
            v["version"] for v in server.client.get(f"/v1/adapters/{lora_id}").json()["versions"]
        ]
        assert stored == [1, *distinct]
        for entry in arrival:  # coalescing is reported
            if entry["coalesced_into"] is not None:
                assert entry["metrics"]["coalesced"] > 1


def test_training_failure_keeps_the_last_good_version(server: LiveServer) -> None:
    create(server, "alice/fragile")
    answer = chat(server, "alice/fragile").json()
    # A teacher prompt over the tiny model's 2048-token context is refused before queueing.
    too_long = server.client.post(
        "/v1/feedback",
        json={"items": [{"completion_id": answer["id"], "feedback": ("no " * 2700)[:7990]}]},
    )
    assert too_long.status_code == 422 and "context" in too_long.json()["error"]["message"]
    assert server.runtime.store.count_feedback(statuses=["queued"]) == 0
    # Injected failure: the training state of the current version vanished from disk.
    version = server.runtime.store.latest_version("alice/fragile")
    assert version is not None
    state_dir = server.runtime.service.checkpoint_dir(version.state_path)
    (state_dir / "adapter_model.safetensors").unlink()
    response = server.client.post(
        "/v1/feedback?wait=true",
        json={"items": [{"completion_id": answer["id"], "feedback": "shorter"}]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed" and "does not exist" in body["error"], body
    adapter = server.client.get("/v1/adapters/alice/fragile").json()
    assert adapter["current_version"] == 1 and len(adapter["versions"]) == 1
    assert chat(server, "alice/fragile").status_code == 200  # still serving (sampler weights)


def _start(model_dir: Path, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    # A short lease: the batch a killed process was training is taken back 5 s after its last
    # heartbeat, not 30 s.
    env = {**os.environ, "CLAAS_DATA_DIR": str(data_dir), "CLAAS_LEASE_SECONDS": "5"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "claas.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_healthy(f"http://127.0.0.1:{port}", process, timeout=120)
    return process


@pytest.fixture(scope="module")
def tiny_dir(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(model_cache, tmp_path_factory.mktemp("tiny-model"))


def test_restart_after_sigkill_resumes_queued_feedback(tiny_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start(tiny_dir, tmp_path, port)
    try:
        httpx.post(f"{url}/v1/adapters", json={"lora_id": "alice/durable", "rank": 4}, timeout=60)
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "alice/durable", "messages": HELLO, "max_tokens": 8},
            timeout=60,
        ).json()
        items = [
            {
                "completion_id": answer["id"],
                "feedback": "shorter",
                "training": {"steps_per_batch": 64},
            }
        ]
        first = httpx.post(f"{url}/v1/feedback", json={"items": items}, timeout=60).json()
        second = httpx.post(f"{url}/v1/feedback", json={"items": items}, timeout=60).json()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process = _start(tiny_dir, tmp_path, port)
        deadline = time.monotonic() + 300
        for feedback_id in (first["feedback_id"], second["feedback_id"]):
            while (status := httpx.get(f"{url}/v1/feedback/{feedback_id}").json())[
                "status"
            ] != "done":
                assert status["status"] != "failed", status
                assert time.monotonic() < deadline
                time.sleep(0.2)
        versions = httpx.get(f"{url}/v1/adapters/alice/durable").json()["versions"]
        numbers = [v["version"] for v in versions]
        assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) in (2, 3)
        made = {
            httpx.get(f"{url}/v1/feedback/{f['feedback_id']}").json()["version"]
            for f in (first, second)
        }
        assert made == set(numbers[1:])  # every version belongs to a request: none duplicated
        checkpoints = tmp_path / "checkpoints"
        runs_on_disk = {p.parent.parent.name for p in checkpoints.glob("*/weights/*")}
        runs_in_db = {v["state_path"].split("/")[2] for v in versions}
        assert runs_in_db <= runs_on_disk
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------


def test_api_keys_scope_owners(tmp_path: Path, model_cache: Path) -> None:
    live = make_server(tmp_path, model_cache, api_keys=OWNER_KEYS, admin_key=ADMIN_KEY)
    try:
        assert live.client.get("/v1/adapters").status_code == 401
        assert live.client.get("/v1/adapters", headers=bearer("x")).status_code == 401
        create(live, "alice/private", headers=ALICE)
        assert (
            live.client.post(
                "/v1/adapters", json={"lora_id": "alice/stolen"}, headers=BOB
            ).status_code
            == 403
        )
        assert live.client.get("/v1/adapters/alice/private", headers=BOB).status_code == 403
        assert chat(live, "alice/private", h=BOB).status_code == 403
        answer = chat(live, "alice/private", h=ALICE).json()
        cross = live.client.post(
            "/v1/feedback",
            json={"items": [{"completion_id": answer["id"], "feedback": "x"}]},
            headers=BOB,
        )
        assert cross.status_code == 404  # another owner's id looks like no id at all
        mine = live.client.post(
            "/v1/feedback",
            json={
                "items": [
                    {
                        "completion_id": answer["id"],
                        "feedback": "x",
                        "training": {"steps_per_batch": 1},
                    }
                ]
            },
            headers=ALICE,
        )
        assert mine.status_code == 202
        feedback_id = mine.json()["feedback_id"]
        assert live.client.get(f"/v1/feedback/{feedback_id}", headers=BOB).status_code == 404
        assert live.client.get(f"/v1/feedback/{feedback_id}", headers=ALICE).status_code == 200
        assert live.client.get("/v1/adapters", headers=BOB).json()["data"] == []
        listed = live.client.get("/v1/adapters", headers=ADMIN)
        assert [a["lora_id"] for a in listed.json()["data"]] == ["alice/private"]
        assert chat(live, live.runtime.base_model, h=BOB).status_code == 200
        for response in [live.client.get("/v1/adapters/alice/private", headers=BOB)]:
            assert "alice" in response.json()["error"]["message"]
        unknown = chat(live, "bob/nothing", h=BOB)  # 404 lists only bob's own names
        assert unknown.status_code == 404 and "alice" not in unknown.json()["error"]["message"]
    finally:
        live.close()


def test_no_keys_means_loopback_only() -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "claas.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("CLAAS_")},
    )
    assert refused.returncode == 2
    assert "refusing to bind 0.0.0.0 without API keys" in refused.stderr
    assert "--insecure" in refused.stderr


# ---------------------------------------------------------------------------------------------
# Bad input: clear 4xx errors, nothing touched
# ---------------------------------------------------------------------------------------------


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
    # Sampling at its extremes: a 4xx naming the field, or a well-defined answer; never a 500.
    *(
        pytest.param(
            "POST", "/v1/chat/completions", chat_body("alice/valid", **fields), 200, None,
            id=f"chat: {name} -> 200",
        )
        for name, fields in [
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
    ),
    *(
        pytest.param(
            "POST", "/v1/chat/completions", chat_body("alice/valid", **fields), 422, param,
            id=f"chat: {name} -> 422 {param}",
        )
        for name, fields, param in [
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


def test_adapter_lifecycle_over_http(server: LiveServer) -> None:
    create(server, "alice/life")
    answer = chat(server, "alice/life").json()
    done = train_once(server, answer["id"])
    assert done["version"] == 2
    rolled = server.client.post("/v1/adapters/alice/life/rollback", json={"version": 1}).json()
    assert rolled["current_version"] == 1
    assert (
        server.runtime.store.get_rollout(chat(server, "alice/life").json()["id"]).adapter_version
        == 1
    )
    archive = server.client.get("/v1/adapters/alice/life/export", params={"version": 2})
    assert archive.status_code == 200 and archive.content[:2] == b"PK"
    listed = server.client.get("/v1/adapters", params={"prefix": "alice/"}).json()["data"]
    assert [a["lora_id"] for a in listed] == ["alice/life"]
    assert server.client.delete("/v1/adapters/alice/life").json()["versions_removed"] == 2
    assert server.client.get("/v1/adapters/alice/life").status_code == 404
    assert not any((server.runtime.settings.data_dir / "checkpoints").glob("*/weights/*"))
    metrics = server.client.get("/metrics").text
    assert 'claas_http_requests_total{method="POST",route="/v1/feedback",status="200"}' in metrics
    assert "claas_feedback_queue_depth 0.0" in metrics
    assert "claas_feedback_train_seconds_count 1.0" in metrics
    health = server.client.get("/v1/health").json()
    assert health["database_ok"] and health["model_loaded"] and health["queue_depth"] == 0


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_answers_shorter_after_feedback_at_the_defaults(
    smol: LoadedModel, tmp_path: Path, model_cache: Path
) -> None:
    """The README's scenario with the default training config: after ONE request the answer
    ends by itself, in at most 0.6x the tokens of the first (which was cut at max_tokens).

    The adapter is created as the README does (default rank and alpha), with a fixed LoRA
    init seed: without one the init is random, and how much shorter the answer gets varies
    from run to run. Only the direction is asserted, at #22's 0.6x."""
    own = LoadedModel(smol.name, copy.deepcopy(smol.model), smol.tokenizer, smol.device)
    live = make_server(tmp_path, model_cache, loaded=own)
    try:
        created = live.client.post("/v1/adapters", json={"lora_id": "alice/real", "seed": 1})
        assert created.status_code == 201, created.text
        question = [{"role": "user", "content": "Explain how a rainbow forms."}]
        answers = [chat(live, "alice/real", messages=question, max_tokens=64).json()]
        for _ in range(1):
            item = {
                "completion_id": answers[-1]["id"],
                "feedback": "Way too long. Answer in one short sentence.",
            }
            trained = live.client.post("/v1/feedback?wait=true", json={"items": [item]}).json()
            assert trained["status"] == "done", trained
            assert trained["metrics"]["learning_rate"] == pytest.approx(1e-4, rel=0.02)
            answers.append(chat(live, "alice/real", messages=question, max_tokens=64).json())
        texts = [a["choices"][0]["message"]["content"] for a in answers]
        lengths = [a["usage"]["completion_tokens"] for a in answers]
        assert texts[1] != texts[0], texts
        assert answers[0]["choices"][0]["finish_reason"] == "length"
        assert answers[-1]["choices"][0]["finish_reason"] == "stop", texts
        assert lengths[-1] <= 0.6 * lengths[0], (lengths, texts)
    finally:
        live.close()


def test_an_unset_learning_rate_follows_the_model_and_a_set_one_is_kept(
    server: LiveServer,
) -> None:
    create(server, "alice/lr")
    for training, expected in (
        ({"steps_per_batch": 1}, server.runtime.engine.learning_rate),
        ({"steps_per_batch": 1, "learning_rate": 3e-3}, 3e-3),
    ):
        answer = chat(server, "alice/lr").json()["id"]
        item = {"completion_id": answer, "feedback": "x", "training": training}
        done = server.client.post("/v1/feedback?wait=true", json={"items": [item]}).json()
        assert done["metrics"]["learning_rate"] == pytest.approx(expected), done
    # the tiny model (hidden 64) is below the calibrated range: it gets SmolLM2-135M's rate
    assert server.runtime.engine.learning_rate == pytest.approx(1e-4, rel=0.02)


# ---------------------------------------------------------------------------------------------
# The CLI against the server
# ---------------------------------------------------------------------------------------------


def test_cli_manages_adapters_and_feedback(server: LiveServer, tmp_path: Path) -> None:
    def claas(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "claas.cli", *args, "--url", server.url],
            capture_output=True,
            text=True,
            timeout=300,
        )

    created = claas("adapters", "create", "alice/cli", "--rank", "4")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["current_version"] == 1
    answer = chat(server, "alice/cli").json()
    done = train_once(server, answer["id"])
    status = claas("feedback", "status", done["feedback_id"])
    assert json.loads(status.stdout)["version"] == 2
    listed = json.loads(claas("adapters", "list", "--prefix", "alice/").stdout)
    assert [a["lora_id"] for a in listed["data"]] == ["alice/cli"]
    versions = json.loads(claas("adapters", "versions", "alice/cli").stdout)["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    assert (
        json.loads(claas("adapters", "rollback", "alice/cli", "1").stdout)["current_version"] == 1
    )
    zip_path = tmp_path / "cli.zip"
    exported = claas("adapters", "export", "alice/cli", "-o", str(zip_path))
    assert exported.returncode == 0 and zip_path.read_bytes()[:2] == b"PK"
    missing = claas("adapters", "versions", "alice/none")
    assert missing.returncode == 1 and "create it first" in missing.stderr
    assert claas("adapters", "delete", "alice/cli").returncode == 0


# ---------------------------------------------------------------------------------------------
# Fuzzing the OpenAPI schema
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """Keyed, as a deployment is; small caps keep each generated request quick."""
    live = make_server(
        tmp_path_factory.mktemp("fuzz"),
        model_cache,
        api_keys=OWNER_KEYS,
        admin_key=ADMIN_KEY,
        max_tokens_cap=8,
        max_samples=2,
    )
    create(live, "alice/target", headers=ALICE)
    yield live
    live.close()


# The one answer JSON Schema cannot foresee: a body over CLAAS_MAX_BODY_BYTES is refused by its
# size (413, documented on each route) before its fields are read, whatever they hold.
SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
[checks.positive_data_acceptance]
expected-statuses = [200, 201, 202, 204, 401, 403, 404, 409, 413, 429]
"""


def test_schemathesis_with_every_check_finds_nothing(
    fuzz_server: LiveServer, tmp_path: Path
) -> None:
    """schemathesis's own CLI with `--checks all` (no 5xx, documented statuses, headers and
    bodies, `Allow` on 405, schema-valid requests accepted and invalid ones refused, auth not
    ignored, one owner's objects not reached by another) over every phase, the stateful one
    included, from a fixed seed, as alice. Any finding fails the test."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "--config-file",
            str(config),
            "run",
            f"{fuzz_server.url}/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            "15",
            "--seed",
            "42",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--continue-on-failure",
            "-H",
            f"Authorization: {ALICE['authorization']}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path,  # its crash and example caches stay out of the checkout
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-20000:]
    assert "Stateful" in report and "failures" not in report.lower(), report[-5000:]


def test_feedback_with_an_example_is_trained_with_it(server: LiveServer) -> None:
    """An item's `example` is kept with the request and shown to the teacher: the dashboard's
    teacher prompt, rendered by the engine's own function, carries it."""
    create(server, "alice/named")
    answer = chat(server, "alice/named").json()["id"]
    item = {
        "completion_id": answer,
        "feedback": "Your name is Kuro.",
        "example": "I'm Kuro.",
        "training": {"steps_per_batch": 1},
    }
    done = server.client.post("/v1/feedback?wait=true", json={"items": [item]}).json()
    assert done["status"] == "done", done
    assert done["items"] == [
        {"rollout_id": answer, "feedback": "Your name is Kuro.", "example": "I'm Kuro."}
    ]
    request = server.runtime.store.get_feedback(done["feedback_id"])
    (row,) = feedback_rows(server.runtime, [request])
    (sample,) = row.samples
    assert sample.teacher_prompt is not None
    assert "Your name is Kuro.)\n\n" + EXAMPLE_INTRO + "\nI'm Kuro." in sample.teacher_prompt


def test_a_bad_request_in_a_coalesced_batch_fails_alone(server: LiveServer) -> None:
    create(server, "alice/batch")
    answer = chat(server, "alice/batch").json()["id"]
    doomed = chat(server, "alice/batch").json()["id"]

    def submit(completion_id: str, feedback: str, steps: int) -> str:
        item = {
            "completion_id": completion_id,
            "feedback": feedback,
            "training": {"steps_per_batch": steps},
        }
        response = server.client.post("/v1/feedback", json={"items": [item]})
        assert response.status_code == 202, response.text
        return str(response.json()["feedback_id"])

    running = submit(answer, "first", 64)  # keeps the adapter busy while the next two queue
    expired = submit(doomed, "second", 2)
    fine = submit(answer, "third", 2)
    store = server.runtime.store
    with store._transaction() as db:  # simulates the rollout expiring while it was queued
        db.execute(text("DELETE FROM rollouts WHERE id = :id"), {"id": doomed})
    results = {fid: finished(server.client, fid) for fid in (running, expired, fine)}
    assert results[running]["status"] == "done"
    assert results[expired]["status"] == "failed" and "expired" in results[expired]["error"]
    assert results[fine]["status"] == "done", results[fine]
    assert results[fine]["version"] == results[running]["version"] + 1
