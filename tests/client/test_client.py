"""`claas.client` against a real server on 127.0.0.1 (the tiny Llama), sync and async.

One keyed server serves the module (alice's and bob's keys and the admin's); each test uses
adapters of its own. Errors are the server's own answers, mapped to typed exceptions.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from pydantic import BaseModel
from serving import (
    HELLO,
    HeldTraining,
    LiveServer,
    free_port,
    make_server,
)

import claas.client as client_module
from claas.api import openai_responses, schemas
from claas.client import (
    AsyncClient,
    AuthenticationError,
    BadGatewayError,
    ClaasAPIError,
    Client,
    ConflictError,
    FeedbackItem,
    FeedbackTimeout,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from claas.client import models as mirrors
from claas.client.errors import api_error
from claas.models import tiny_llama
from claas.sdpo.prompts import chat_prompt_tokens

QUICK = {"steps_per_batch": 1}  # one optimizer step: enough to make a new version


@pytest.fixture
def alice(shared: LiveServer) -> Iterator[Client]:
    with Client(shared.url, "sk-alice") as claas:
        yield claas


@pytest.fixture
def held(shared: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldTraining]:
    gate = HeldTraining(shared.runtime.queue.engine, monkeypatch)
    yield gate
    gate.release()


def answer(claas: Client, model: str) -> str:
    """A short greedy chat through the OpenAI client `claas.openai()`; its completion id."""
    with claas.openai() as chat:
        completion = chat.chat.completions.create(
            model=model,
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
        )
    return completion.id


# ---------------------------------------------------------------------------------------------
# The loop, sync and async
# ---------------------------------------------------------------------------------------------


def test_the_module_docstring_runs(
    shared: LiveServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example at the top of claas/client/__init__.py, verbatim, with the URL and key from
    the env."""
    doc = client_module.__doc__ or ""
    blocks = re.findall(r"\n\n((?:    .*\n|\n)+)(?=\S)", doc)  # indented lines, blank ones inside
    assert len(blocks) == 1, "the docstring should hold exactly one indented example"
    code = textwrap.dedent(blocks[0])
    monkeypatch.setenv("CLAAS_URL", shared.url)
    monkeypatch.setenv("CLAAS_API_KEY", "sk-alice")
    exec(compile(code, "claas/client/__init__.py docstring", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "alice/assistant is now at version 2"
    assert len(lines) >= 2  # the second answer
    served = shared.runtime.store.latest_version("alice/assistant")
    assert served is not None and served.version == 2


def test_adapters_and_feedback_sync(alice: Client) -> None:
    created = alice.adapters.create("alice/sync", rank=4, lora_alpha=8)
    assert (created.lora_id, created.rank, created.lora_alpha) == ("alice/sync", 4, 8.0)
    assert created.current_version == 1 and [v.version for v in created.versions] == [1]
    assert "alice/sync" in [a.lora_id for a in alice.adapters.list("alice/s")]
    assert alice.adapters.list("alice/nothing-like-it") == []

    completion_id = answer(alice, "alice/sync")
    done = alice.feedback.send_and_wait(
        FeedbackItem(completion_id=completion_id, feedback="Shorter.", training=QUICK)
    )
    assert done.status == "done" and done.finished and done.version == 2
    assert done.items[0]["rollout_id"] == completion_id and done.training["steps_per_batch"] == 1
    assert alice.feedback.status(done.feedback_id) == done
    assert [f.feedback_id for f in alice.feedback.log("alice/sync")] == [done.feedback_id]

    remembered = alice.adapters.memory("alice/sync")
    assert [(m.feedback, m.feedback_id) for m in remembered] == [("Shorter.", done.feedback_id)]
    assert alice.adapters.forget("alice/sync", remembered[0].id).forgotten == 1
    with pytest.raises(NotFoundError, match="GET /v1/adapters"):
        alice.adapters.forget("alice/sync", remembered[0].id)
    assert alice.adapters.memory("alice/sync") == []
    for not_an_id in ("..", ".", "", "mem-1/../.."):  # never sent: ".." would name the adapter
        with pytest.raises(ValueError, match="not a memory item's id"):
            alice.adapters.forget("alice/sync", not_an_id)
    assert alice.adapters.get("alice/sync").current_version == 2

    detail = alice.adapters.get("alice/sync")
    assert detail.current_version == 2
    assert detail.versions[1].feedback_id == done.feedback_id
    assert alice.adapters.rollback("alice/sync", 1).current_version == 1

    deleted = alice.adapters.delete("alice/sync")
    assert deleted.deleted and deleted.versions_removed == 2
    with pytest.raises(NotFoundError):
        alice.adapters.get("alice/sync")


def test_feedback_by_text_and_in_one_batch(alice: Client) -> None:
    """Both ways of naming an answer, as two items of one request: one training step."""
    alice.adapters.create("alice/texty", rank=4)
    by_id = answer(alice, "alice/texty")
    with alice.openai() as chat:
        reply = chat.chat.completions.create(
            model="alice/texty",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8,
            temperature=0,
        )
    completion = reply.choices[0].message.content
    assert completion is not None
    accepted = alice.feedback.send(
        FeedbackItem(completion_id=by_id, feedback="Shorter.", training=QUICK),
        FeedbackItem(
            lora_id="alice/texty",
            prompt="  Name a   colour. ",  # whitespace differs: the server normalises it
            response=completion,
            feedback="Shorter.",
            training=QUICK,
        ),
    )
    assert accepted.lora_id == "alice/texty" and accepted.status in ("queued", "running")
    done = alice.feedback.wait(accepted.feedback_id, timeout=300, interval=0.05)
    assert done.status == "done" and done.version == 2 and len(done.items) == 2
    with pytest.raises(ValueError, match="completion_id, or with lora_id"):
        FeedbackItem(lora_id="alice/texty", prompt="only a prompt", feedback="x")


def test_async_client(shared: LiveServer, tmp_path: Path) -> None:
    async def body() -> None:
        async with AsyncClient(shared.url, "sk-bob") as claas:
            assert (await claas.health()).status == "ok"
            created = await claas.adapters.create("bob/async", rank=4)
            assert created.current_version == 1
            assert [a.lora_id for a in await claas.adapters.list()] == ["bob/async"]
            async with claas.openai() as openai_client:
                chat = await openai_client.chat.completions.create(
                    model="bob/async",
                    messages=HELLO,  # type: ignore[arg-type]
                    max_tokens=8,
                    temperature=0,
                )
            item = FeedbackItem(completion_id=chat.id, feedback="Shorter.", training=QUICK)
            accepted = await claas.feedback.send(item)
            done = await claas.feedback.wait(accepted.feedback_id, timeout=300, interval=0.05)
            assert done.status == "done" and done.version == 2
            assert await claas.feedback.status(done.feedback_id) == done
            again = await claas.feedback.send_and_wait(item, timeout=300)
            assert again.version == 3
            log = await claas.feedback.log("bob/async", limit=1)
            assert [f.feedback_id for f in log] == [again.feedback_id]  # newest first, one page
            remembered = await claas.adapters.memory("bob/async")
            assert [m.feedback for m in remembered] == ["Shorter."]  # taught twice, kept once
            assert (await claas.adapters.forget("bob/async")).forgotten == 1
            assert (await claas.adapters.get("bob/async")).current_version == 3
            assert (await claas.adapters.rollback("bob/async", 2)).current_version == 2
            directory = await claas.adapters.export("bob/async", tmp_path / "v1", version=1)
            assert sorted(p.name for p in directory.iterdir()) == [
                "adapter_config.json",
                "adapter_model.safetensors",
            ]
            assert (await claas.adapters.delete("bob/async")).versions_removed == 3
            with pytest.raises(NotFoundError):
                await claas.adapters.get("bob/async")
            with pytest.raises(PermissionDeniedError):
                await claas.adapters.get("alice/anything")

    asyncio.run(body())


def test_export_unpacks_the_version_the_server_serves(
    alice: Client, shared: LiveServer, tmp_path: Path, model_cache: Path
) -> None:
    """The exported directory loads in plain PEFT and scores exactly as the server does."""
    alice.adapters.create("alice/exported", rank=4)
    item = FeedbackItem(
        completion_id=answer(alice, "alice/exported"),
        feedback="Shorter.",
        training={**QUICK, "learning_rate": 1e-2},  # a step large enough to see in log-probs
    )
    assert alice.feedback.send_and_wait(item).version == 2
    directory = alice.adapters.export("alice/exported", tmp_path / "nested" / "v2", version=2)
    assert directory == tmp_path / "nested" / "v2"
    assert {p.name for p in directory.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    zipped = alice.adapters.archive("alice/exported", version=2)
    assert zipped.startswith(b"PK")

    completion = "Rainbows form when sunlight is refracted by raindrops."
    scored = alice.score("alice/exported@2", HELLO, completion)
    assert scored.total_logprob == pytest.approx(sum(scored.logprobs))
    loaded = tiny_llama(model_cache, seed=0)  # the server's base model, loaded afresh
    prompt = chat_prompt_tokens(loaded.tokenizer, HELLO)
    ids = torch.tensor([prompt + scored.token_ids])
    targets = torch.tensor(scored.token_ids)

    def logprobs(model: Any) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits.float(), -1)[torch.arange(len(targets)), targets]

    base = logprobs(loaded.model)
    exported = logprobs(PeftModel.from_pretrained(loaded.model, directory))
    served = torch.tensor(scored.logprobs)
    torch.testing.assert_close(exported, served, rtol=0, atol=1e-5)
    assert (base - served).abs().max() > 1e-2  # the adapter, not the base, was exported


# ---------------------------------------------------------------------------------------------
# Waiting, and its timeouts
# ---------------------------------------------------------------------------------------------


def test_waits_that_run_out_raise_feedback_timeout(alice: Client, held: HeldTraining) -> None:
    alice.adapters.create("alice/slow", rank=4)
    item = FeedbackItem(completion_id=answer(alice, "alice/slow"), feedback="x", training=QUICK)
    with pytest.raises(FeedbackTimeout) as server_side:
        alice.feedback.send_and_wait(item, timeout=0.2)
    pending = server_side.value.feedback
    assert pending.lora_id == "alice/slow" and pending.status in ("queued", "running")
    assert not pending.finished and "still" in str(server_side.value)
    with pytest.raises(FeedbackTimeout) as client_side:
        alice.feedback.wait(pending.feedback_id, timeout=0.2, interval=0.05)
    assert client_side.value.feedback.feedback_id == pending.feedback_id

    async def async_waits() -> None:
        async with AsyncClient(alice.base_url, "sk-alice") as claas:
            with pytest.raises(FeedbackTimeout):
                await claas.feedback.wait(pending.feedback_id, timeout=0.2, interval=0.05)
            with pytest.raises(FeedbackTimeout):
                await claas.feedback.send_and_wait(item, timeout=0.2)

    asyncio.run(async_waits())
    held.release()
    done = alice.feedback.wait(pending.feedback_id, timeout=300, interval=0.05)
    assert done.status == "done" and done.version == 2  # the timed-out request still trained
    for request in alice.feedback.log("alice/slow"):
        assert alice.feedback.wait(request.feedback_id, timeout=300).status == "done"


# ---------------------------------------------------------------------------------------------
# Errors: the server's own answers, typed
# ---------------------------------------------------------------------------------------------


def test_errors_are_typed_with_the_servers_message(shared: LiveServer, alice: Client) -> None:
    with Client(shared.url) as anonymous, pytest.raises(AuthenticationError) as missing:
        anonymous.adapters.list()
    assert missing.value.status == 401 and "missing API key" in missing.value.message
    with Client(shared.url, "sk-nobody") as stranger, pytest.raises(AuthenticationError) as bad:
        stranger.adapters.list()
    assert "unknown API key" in bad.value.message

    alice.adapters.create("alice/errors", rank=4)
    with Client(shared.url, "sk-bob") as bob:
        with pytest.raises(PermissionDeniedError) as forbidden:
            bob.adapters.get("alice/errors")
        assert forbidden.value.status == 403 and forbidden.value.type == "Forbidden"
        assert "cannot reach alice/errors" in forbidden.value.message
        feedback_id = alice.feedback.send(
            FeedbackItem(completion_id=answer(alice, "alice/errors"), feedback="x", training=QUICK)
        ).feedback_id
        with pytest.raises(NotFoundError):  # another owner's request is answered as unknown
            bob.feedback.status(feedback_id)
    assert alice.feedback.wait(feedback_id, timeout=300).status == "done"

    with pytest.raises(NotFoundError) as unknown:
        alice.adapters.get("alice/never-made")
    assert unknown.value.type == "AdapterNotFound" and "create it first" in unknown.value.message
    with pytest.raises(ConflictError) as twice:
        alice.adapters.create("alice/errors")
    assert twice.value.status == 409 and twice.value.type == "AdapterExists"
    with pytest.raises(UnprocessableEntityError) as invalid:
        alice.adapters.create("alice/too-big", rank=100_000)
    assert invalid.value.status == 422 and "rank" in invalid.value.message
    with pytest.raises(NotFoundError, match="does not exist"):
        alice.feedback.status("fb-unknown")
    for error in (missing, forbidden, unknown, twice, invalid):
        assert isinstance(error.value, ClaasAPIError)
    with pytest.raises(ValueError, match="owner/name"):
        alice.adapters.get("no-owner")  # refused before it becomes a wrong URL


def test_too_much_pending_feedback_is_a_rate_limit_error(
    alice: Client, shared: LiveServer, held: HeldTraining, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner limit (CLAAS_MAX_PENDING_FEEDBACK_PER_OWNER) at 1, while the first is held.
    monkeypatch.setattr(shared.runtime.queue, "max_pending_per_owner", 1)
    alice.adapters.create("alice/busy", rank=4)
    item = FeedbackItem(completion_id=answer(alice, "alice/busy"), feedback="x", training=QUICK)
    first = alice.feedback.send(item)
    with pytest.raises(RateLimitError) as limited:
        alice.feedback.send(item)
    assert limited.value.status == 429 and limited.value.retry_after == 30.0
    assert "CLAAS_MAX_PENDING_FEEDBACK_PER_OWNER" in limited.value.message
    held.release()
    assert alice.feedback.wait(first.feedback_id, timeout=300).status == "done"


def test_a_server_whose_inference_is_down(tmp_path: Path, model_cache: Path) -> None:
    """Health reports the outage instead of raising; a 503 answer is ServiceUnavailableError."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    live = make_server(tmp_path, model_cache, inference="vllm", vllm_url=url)
    try:
        with Client(live.url) as claas:
            health = claas.health()
        assert health.status == "unavailable" and health.database_ok
        assert health.inference is not None and health.inference["status"] == "unreachable"
        body = {"model": live.runtime.base_model, "messages": HELLO, "max_tokens": 4}
        refused = live.client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 503
        error = api_error(refused)
        assert isinstance(error, ServiceUnavailableError) and url in error.message
    finally:
        live.close()


@pytest.mark.parametrize(
    ("response", "kind", "fields"),
    [
        pytest.param(
            httpx.Response(
                429,
                json={"error": {"message": "m", "type": "TooManyRequests", "code": 429}},
                headers={"retry-after": "7"},
            ),
            RateLimitError,
            {"type": "TooManyRequests", "message": "m", "retry_after": 7.0, "param": None},
            id="429 with Retry-After seconds",
        ),
        pytest.param(
            httpx.Response(
                422,
                json={
                    "error": {"message": "m", "type": "InvalidRequest", "code": 422, "param": "n"}
                },
            ),
            UnprocessableEntityError,
            {"message": "m", "param": "n"},
            id="422 naming its param",
        ),
        pytest.param(
            httpx.Response(502, text="<html>Bad Gateway</html>"),
            BadGatewayError,
            {"status": 502, "type": "HTTPError", "message": "<html>Bad Gateway</html>"},
            id="a proxy's page, not claas's error body",
        ),
    ],
)
def test_error_bodies_not_sent_by_this_server(
    response: httpx.Response, kind: type[ClaasAPIError], fields: dict[str, Any]
) -> None:
    """Bodies a real server here does not produce: a proxy's page, a `param`, another delay."""
    error = api_error(response)
    assert type(error) is kind
    assert {name: getattr(error, name) for name in fields} == fields


# ---------------------------------------------------------------------------------------------
# Configuration and imports
# ---------------------------------------------------------------------------------------------


def test_url_and_key_come_from_the_environment(
    shared: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAAS_URL", shared.url + "/")
    monkeypatch.setenv("CLAAS_API_KEY", "sk-bob")
    with Client() as claas:
        assert claas.base_url == shared.url and claas.openai_base_url == f"{shared.url}/v1"
        claas.adapters.create("bob/from-env", rank=4)
        assert "bob/from-env" in [a.lora_id for a in claas.adapters.list()]
        with claas.openai() as chat:  # the OpenAI client carries the same key
            assert "bob/from-env" in [m.id for m in chat.models.list().data]
    monkeypatch.delenv("CLAAS_URL")
    monkeypatch.delenv("CLAAS_API_KEY")
    with Client() as default:
        assert default.base_url == "http://127.0.0.1:8000" and default.api_key is None


def test_importing_the_client_loads_no_torch() -> None:
    code = "import sys, claas.client; print(sorted({'torch', 'fastapi'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_clients_feedback_item_has_every_field_the_server_takes() -> None:
    """The client's `FeedbackItem` is written apart from the server's (it imports no server
    code): a field the server gains must be sendable from the client too."""
    from claas.feedback import FeedbackItem as ServerFeedbackItem

    assert set(FeedbackItem.model_fields) == set(ServerFeedbackItem.model_fields)


@pytest.mark.parametrize(
    ("mirror", "server_model"),
    [
        (mirrors.AdapterDetail, schemas.AdapterView),
        (mirrors.AdapterDeleted, schemas.AdapterDeleted),
        (mirrors.MemoryItem, schemas.MemoryView),
        (mirrors.MemoryForgotten, schemas.MemoryForgotten),
        (mirrors.FeedbackAccepted, schemas.FeedbackAccepted),
        (mirrors.FeedbackView, schemas.FeedbackView),
        (mirrors.Score, openai_responses.ScoreResponse),
        (mirrors.Health, schemas.Health),
    ],
)
def test_the_clients_answers_mirror_the_servers_schemas(
    mirror: type[BaseModel], server_model: type[BaseModel]
) -> None:
    """The client cannot import the server's schemas (they load the server), so it mirrors
    them: each mirror has every field of the server's answer, and of the same type."""

    def fields(model: type[BaseModel]) -> dict[str, object]:
        return {name: field.annotation for name, field in model.model_fields.items()}

    assert fields(mirror) == fields(server_model)
