"""The feedback log filtered by status, through the route (`GET /v1/feedback?status=…`) and
through `claas.client` (`feedback.log(..., statuses=...)`), against a real server with the tiny
Llama whose training is held at a gate (`serving.HeldTraining`: the real engine, waiting)."""

from __future__ import annotations

import pytest
from serving import ALICE, HeldTraining, LiveServer, chat, create, error_of

from claas.client import Client, FeedbackItem, FeedbackView
from claas.records import FINISHED, PENDING

QUICK = {"steps_per_batch": 1}


def ids(views: list[FeedbackView]) -> list[str]:
    return [view.feedback_id for view in views]


def test_the_log_lists_only_the_statuses_asked_for(
    keyed: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    create(keyed, "alice/log", headers=ALICE)
    first = chat(keyed, "alice/log", h=ALICE).json()["id"]
    second = chat(keyed, "alice/log", h=ALICE).json()["id"]
    with Client(keyed.url, "sk-alice") as alice:
        done = alice.feedback.send_and_wait(
            FeedbackItem(completion_id=first, feedback="Shorter.", training=QUICK)
        )
        held = HeldTraining(keyed.runtime.queue.engine, monkeypatch)
        try:
            pending = alice.feedback.send(
                FeedbackItem(completion_id=second, feedback="Kinder.", training=QUICK)
            )
            assert ids(alice.feedback.log("alice/log")) == [pending.feedback_id, done.feedback_id]
            assert ids(alice.feedback.log("alice/log", statuses=PENDING)) == [pending.feedback_id]
            assert ids(alice.feedback.log("alice/log", statuses=FINISHED)) == [done.feedback_id]
            assert ids(alice.feedback.log("alice/log", statuses=("failed",))) == []
        finally:
            held.release()
        assert alice.feedback.wait(pending.feedback_id, timeout=120).status == "done"
        assert ids(alice.feedback.log("alice/log", statuses=PENDING)) == []

    refused = keyed.client.get(
        "/v1/feedback", params={"lora_id": "alice/log", "status": "paused"}, headers=ALICE
    )
    code, message = error_of(refused)
    assert code == 422 and "status" in message
