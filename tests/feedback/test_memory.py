"""Memory of earlier feedback (#22): kept with the request that taught it, replayed by later
requests on fresh answers, listed and forgotten by its owner only, deleted with its adapter.

The store tests use a real SQLite file; the API tests a real server on 127.0.0.1 with the tiny
random Llama, two owners' keys, and real training steps.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving import ALICE, BOB, LiveServer, chat, create, error_of, make_server

from claas.errors import MemoryNotFound
from claas.feedback import choose_replay
from claas.records import MemoryItem
from claas.sdpo.config import Lesson
from claas.store import Store


def item(
    lora_id: str, prompt: str, feedback: str, created_at: float, example: str | None = None
) -> MemoryItem:
    return MemoryItem(
        id=f"mem-{prompt}-{feedback}-{created_at}",
        lora_id=lora_id,
        feedback_id="fb-1",
        messages=[{"role": "user", "content": prompt}],
        prompt_tokens=[1, 2, 3],
        prompt_format="chat",
        feedback=feedback,
        example=example,
        created_at=created_at,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "claas.db") as store:
        store.create_adapter("alice/a", "m", 4, 4.0, ["q_proj"])
        yield store


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def test_one_item_per_prompt_and_feedback_newest_kept_oldest_forgotten_beyond_the_limit(
    store: Store,
) -> None:
    store.remember([item("alice/a", "p1", "short", 1.0), item("alice/a", "p2", "short", 2.0)])
    store.remember([item("alice/a", "p1", "short", 3.0, example="Yes.")])  # taught again
    listed = store.memory("alice/a")
    assert [(m.messages[0]["content"], m.created_at, m.example) for m in listed] == [
        ("p1", 3.0, "Yes."),
        ("p2", 2.0, None),
    ]
    store.remember([item("alice/a", "p3", "short", 4.0), item("alice/a", "p1", "kuro", 5.0)], 3)
    assert [(m.messages[0]["content"], m.feedback) for m in store.memory("alice/a")] == [
        ("p1", "kuro"),
        ("p3", "short"),
        ("p1", "short"),
    ]
    assert store.count_memory("alice/a") == 3
    assert [m.feedback for m in store.memory("alice/a", limit=1, offset=1)] == ["short"]


def test_forgetting_one_item_or_all_and_deleting_the_adapter(store: Store) -> None:
    store.remember([item("alice/a", f"p{i}", "short", float(i)) for i in range(3)])
    first = store.memory("alice/a")[0]
    assert store.forget("alice/a", first.id) == 1
    with pytest.raises(MemoryNotFound, match="GET /v1/adapters"):
        store.forget("alice/a", first.id)
    store.create_adapter("bob/b", "m", 4, 4.0, ["q_proj"])
    other = store.memory("alice/a")[0]
    with pytest.raises(MemoryNotFound):  # another adapter's id is not this adapter's
        store.forget("bob/b", other.id)
    assert store.forget("alice/a") == 2
    store.remember([item("alice/a", "p", "short", 1.0)])
    store.delete_adapter("alice/a")
    store.create_adapter("alice/a", "m", 4, 4.0, ["q_proj"])
    assert store.memory("alice/a") == []  # the re-created adapter remembers nothing


# ---------------------------------------------------------------------------------------------
# Which items a request replays
# ---------------------------------------------------------------------------------------------

# Newest first, as the store lists them: two concise lessons, then identity, then emoji.
MEMORY = [
    item("alice/a", "q5", "no emoji", 5.0),
    item("alice/a", "q4", "kuro", 4.0),
    item("alice/a", "q3", "kuro", 3.0),
    item("alice/a", "q2", "short", 2.0),
    item("alice/a", "q1", "short", 1.0),
]


def lesson(prompt: str, feedback: str) -> Lesson:
    return Lesson(
        lora_id="alice/a",
        messages=[{"role": "user", "content": prompt}],
        prompt_tokens=[1],
        feedback=feedback,
    )


def prompts(items: list[MemoryItem]) -> list[str]:
    return [m.messages[0]["content"] for m in items]


def test_preferences_rehearse_every_other_feedback_newest_first_then_round_again() -> None:
    batch = [lesson("new", "short")]
    one_each = choose_replay(MEMORY, batch, 2, "preferences", random.Random(0))
    assert [m.feedback for m in one_each] == ["no emoji", "kuro"]
    everything = choose_replay(MEMORY, batch, 8, "preferences", random.Random(0))
    assert [m.feedback for m in everything] == ["no emoji", "kuro", "kuro"]  # never "short"
    picks = {
        prompts(choose_replay(MEMORY, batch, 2, "preferences", random.Random(s)))[1]
        for s in range(20)
    }
    assert picks == {"q3", "q4"}  # within a feedback text the seed chooses


def test_recent_and_spread_and_what_the_batch_teaches_anyway() -> None:
    batch = [lesson("q4", "kuro")]  # already in the batch: not replayed
    assert prompts(choose_replay(MEMORY, batch, 2, "recent", random.Random(0))) == ["q5", "q3"]
    spread = choose_replay(MEMORY, [lesson("x", "y")], 2, "spread", random.Random(0))
    assert len(spread) == 2 and spread[0].created_at < 3.0 <= spread[1].created_at
    assert choose_replay(MEMORY, batch, 0, "recent", random.Random(0)) == []
    assert choose_replay([], batch, 4, "preferences", random.Random(0)) == []


# ---------------------------------------------------------------------------------------------
# Through the API
# ---------------------------------------------------------------------------------------------


def teach(live: LiveServer, lora_id: str, content: str, feedback: str, **training: Any) -> Any:
    answer = chat(live, lora_id, h=ALICE, messages=[{"role": "user", "content": content}])
    body = {
        "items": [
            {
                "completion_id": answer.json()["id"],
                "feedback": feedback,
                "training": {"steps_per_batch": 1, **training},
            }
        ]
    }
    done = live.client.post("/v1/feedback?wait=true", json=body, headers=ALICE).json()
    assert done["status"] == "done", done
    return done


def test_memory_is_kept_replayed_listed_and_forgotten_by_its_owner_only(keyed: LiveServer) -> None:
    create(keyed, "alice/mem", headers=ALICE)
    first = teach(keyed, "alice/mem", "Tell me about rain.", "Shorter.")
    assert first["metrics"]["replayed"] == 0  # nothing to remember yet
    assert first["metrics"]["fresh_samples"] == 0  # samples_per_request 1 by default
    second = teach(keyed, "alice/mem", "Who are you?", "Your name is Kuro.")
    assert second["metrics"]["replayed"] == 1
    # a replayed lesson's text stays in the memory, not in the feedback record: forgetting it
    # leaves no copy behind
    assert not [t for t in second["metrics"]["teacher_texts"] if "Shorter." in t]

    page = keyed.client.get("/v1/adapters/alice/mem/memory", headers=ALICE).json()
    assert page["total"] == 2
    assert [m["feedback"] for m in page["data"]] == ["Your name is Kuro.", "Shorter."]
    assert page["data"][1]["messages"] == [{"role": "user", "content": "Tell me about rain."}]
    assert page["data"][1]["feedback_id"] == first["feedback_id"]
    assert "prompt_tokens" not in page["data"][0]

    # Bob can neither read nor forget Alice's memory; an unknown id is a 404 that says what to do.
    for method, path in (
        ("GET", "/v1/adapters/alice/mem/memory"),
        ("DELETE", "/v1/adapters/alice/mem/memory"),
        ("DELETE", f"/v1/adapters/alice/mem/memory/{page['data'][0]['id']}"),
    ):
        assert keyed.client.request(method, path, headers=BOB).status_code == 403
    unknown = "mem-" + "0" * 32
    status, message = error_of(
        keyed.client.delete(f"/v1/adapters/alice/mem/memory/{unknown}", headers=ALICE)
    )
    assert status == 404 and "GET /v1/adapters" in message
    malformed = keyed.client.delete("/v1/adapters/alice/mem/memory/mem-nope", headers=ALICE)
    assert malformed.status_code == 422
    assert keyed.client.get("/v1/adapters/alice/none/memory", headers=ALICE).status_code == 404

    forgotten = keyed.client.delete(
        f"/v1/adapters/alice/mem/memory/{page['data'][1]['id']}", headers=ALICE
    ).json()
    assert forgotten == {"lora_id": "alice/mem", "forgotten": 1}
    third = teach(keyed, "alice/mem", "Who are you?", "Your name is Kuro.")
    assert third["metrics"]["replayed"] == 0  # "Shorter." is forgotten; Kuro is the batch's own
    assert keyed.client.delete("/v1/adapters/alice/mem/memory", headers=ALICE).json() == {
        "lora_id": "alice/mem",
        "forgotten": 1,
    }
    teach(keyed, "alice/mem", "Hi", "Be nice.", replay=0)
    assert keyed.runtime.store.count_memory("alice/mem") == 1
    assert keyed.client.delete("/v1/adapters/alice/mem", headers=ALICE).status_code == 200
    assert keyed.runtime.store.count_memory("alice/mem") == 0


def test_a_rollback_forgets_what_the_later_versions_taught(keyed: LiveServer) -> None:
    create(keyed, "alice/back", headers=ALICE)
    teach(keyed, "alice/back", "Tell me about rain.", "Shorter.")  # v2
    teach(keyed, "alice/back", "Who are you?", "Your name is Kuro.")  # v3
    rolled = keyed.client.post(
        "/v1/adapters/alice/back/rollback", json={"version": 2}, headers=ALICE
    )
    assert rolled.status_code == 200, rolled.text
    page = keyed.client.get("/v1/adapters/alice/back/memory", headers=ALICE).json()
    assert [m["feedback"] for m in page["data"]] == ["Shorter."]
    done = teach(keyed, "alice/back", "Hi", "Be nice.")
    assert done["metrics"]["replayed"] == 1  # "Shorter." only: Kuro went with v3


def test_memory_off_keeps_and_replays_nothing(tmp_path: Path, model_cache: Path) -> None:
    live = make_server(tmp_path, model_cache, memory_items=0)
    try:
        create(live, "alice/off")
        teach(live, "alice/off", "Tell me about rain.", "Shorter.")
        done = teach(live, "alice/off", "Who are you?", "Your name is Kuro.")
        assert done["metrics"]["replayed"] == 0
        assert live.client.get("/v1/adapters/alice/off/memory").json()["total"] == 0
    finally:
        live.close()
