"""Feedback over HTTP on the tiny model: by text, ordering per adapter, failures, examples,
the learning rate."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serving import HeldTraining, LiveServer, chat, create, finished
from sqlalchemy import text

from claas.api.dashboard.feedback_log import feedback_rows
from claas.sdpo.prompts import EXAMPLE_INTRO
from claas.services.local import LocalServiceClient


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
    service = server.runtime.service
    assert isinstance(service, LocalServiceClient)
    state_dir = service.checkpoint_dir(version.state_path)
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


def test_a_bad_request_in_a_coalesced_batch_fails_alone(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
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

    held = HeldTraining(server.runtime.queue.engine, monkeypatch)
    # Held, it keeps the adapter busy while the next two queue; its other training config keeps
    # it out of their batch.
    running = submit(answer, "first", 1)
    expired = submit(doomed, "second", 2)
    fine = submit(answer, "third", 2)
    store = server.runtime.store
    with store._transaction() as db:  # simulates the rollout expiring while it was queued
        db.execute(text("DELETE FROM rollouts WHERE id = :id"), {"id": doomed})
    held.release()
    results = {fid: finished(server.client, fid) for fid in (running, expired, fine)}
    assert results[running]["status"] == "done"
    assert results[expired]["status"] == "failed" and "expired" in results[expired]["error"]
    assert results[fine]["status"] == "done", results[fine]
    assert results[fine]["version"] == results[running]["version"] + 1
