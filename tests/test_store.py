"""The store on a real SQLite file: ids, version numbering, the durable queue, expiry, threads."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from claas.errors import (
    AdapterExists,
    AdapterNotFound,
    Conflict,
    FeedbackNotFound,
    IncompatibleDatabase,
    InvalidLoraId,
    InvalidRequest,
    RolloutNotFound,
    VersionNotFound,
)
from claas.ids import LORA_ID_PART, parse_lora_id, text_hash, validate_lora_id
from claas.records import Rollout
from claas.store import SCHEMA_VERSION, Store

LORA = "alice/assistant"
OTHER = "bob/helper"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "claas.db") as opened:
        yield opened


def make_adapter(store: Store, lora_id: str = LORA) -> None:
    store.create_adapter(lora_id, "SmolLM2-135M-Instruct", 8, 16.0, ["q_proj", "v_proj"])


def add_versions(store: Store, lora_id: str, count: int) -> list[int]:
    return [
        store.add_version(lora_id, f"local://r/weights/{i}", f"local://r/sw/{i}", None, {}).version
        for i in range(count)
    ]


def add_rollout(
    store: Store,
    rollout_id: str,
    *,
    expires_at: float | None,
    prompt: str = "hi",
    response: str = "hello there",
    lora_id: str | None = LORA,
) -> Rollout:
    return store.add_rollout(
        id=rollout_id,
        lora_id=lora_id,
        adapter_version=1,
        model=lora_id or "base",
        messages=[{"role": "user", "content": prompt}],
        prompt_tokens=[1, 2, 3],
        response_tokens=[4, 5],
        behavior_logprobs=[-0.25, -1.5],
        sampling_params={"temperature": 0.7},
        response_text=response,
        prompt_hash=text_hash(prompt),
        response_hash=text_hash(response),
        expires_at=expires_at,
    )


# -- lora_id validation -----------------------------------------------------------------------

# Characters that matter at the edges of the grammar, plus arbitrary Unicode.
_ID_ALPHABET = st.sampled_from(list("aZ09_-./\\ \t\n\x00%é٣ＡK"))
_ID_LIKE = st.text(_ID_ALPHABET, max_size=12) | st.text(max_size=12)


@given(_ID_LIKE)
def test_random_strings_pass_only_when_they_are_owner_slash_name(candidate: str) -> None:
    parts = candidate.split("/")
    expected = len(parts) == 2 and all(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", part, re.ASCII) for part in parts
    )
    try:
        assert parse_lora_id(candidate) == (parts[0], parts[1])
        accepted = True
    except InvalidLoraId:
        accepted = False
    assert accepted == expected, candidate


@given(st.from_regex(LORA_ID_PART, fullmatch=True), st.from_regex(LORA_ID_PART, fullmatch=True))
def test_every_owner_name_of_the_grammar_passes(owner: str, name: str) -> None:
    assert parse_lora_id(f"{owner}/{name}") == (owner, name)
    assert validate_lora_id(f"{owner}/{name}") == f"{owner}/{name}"


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a/../b",
        "a/b/c",
        "a/.b",
        ".a/b",
        "a/..",
        "a\\b",
        "a/b\\c",
        "/abs",
        "",
        "a/",
        "/",
        "a",
        "a /b",
        "a/b\n",
        "a/b\x00",
        "_a/b",
        "a/-b",
        "é/b",
        "a/ｂ",  # fullwidth letter
        "a/٣",  # Arabic-Indic digit: \d would let it through
        f"a/{'b' * 65}",
    ],
)
def test_traversal_and_odd_ids_are_refused_with_the_expected_form(bad: str) -> None:
    with pytest.raises(InvalidLoraId, match=r"must look like 'owner/name'") as caught:
        validate_lora_id(bad)
    assert repr(bad) in str(caught.value)


def test_longest_parts_are_accepted() -> None:
    assert parse_lora_id(f"{'o' * 64}/{'n' * 64}") == ("o" * 64, "n" * 64)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.create_adapter("../x", "m", 1, 1.0, []),
        lambda s: s.get_adapter("../x"),
        lambda s: s.delete_adapter("../x"),
        lambda s: s.add_version("../x", "a", "b", None, {}),
        lambda s: s.list_versions("../x"),
        lambda s: s.get_version("../x", 1),
        lambda s: s.latest_version("../x"),
        lambda s: s.rollback("../x", 1),
        lambda s: add_rollout(s, "r", expires_at=None, lora_id="../x"),
        lambda s: s.find_rollout("../x", "p", "r"),
        lambda s: s.enqueue_feedback("../x", [], {}),
        lambda s: s.list_feedback("../x"),
        lambda s: s.next_queued("../x"),
        lambda s: s.queued_for("../x", 5),
        lambda s: s.queue_depth("../x"),
        lambda s: s.add_eval_run("../x", {}, {"divergence_mode": "topk_gjs"}),
        lambda s: s.list_eval_runs("../x"),
    ],
)
def test_every_method_taking_a_lora_id_validates_it(
    store: Store, call: Callable[[Store], Any]
) -> None:
    with pytest.raises(InvalidLoraId):
        call(store)


# -- adapters and versions --------------------------------------------------------------------


def test_adapter_round_trip_and_errors(store: Store) -> None:
    make_adapter(store)
    adapter = store.get_adapter(LORA)
    assert (adapter.rank, adapter.lora_alpha, adapter.target_modules) == (
        8,
        16.0,
        ["q_proj", "v_proj"],
    )
    assert adapter.current_version is None
    assert store.latest_version(LORA) is None
    with pytest.raises(AdapterExists):
        make_adapter(store)
    with pytest.raises(AdapterNotFound, match="POST /v1/adapters"):
        store.get_adapter(OTHER)
    with pytest.raises(ValidationError):
        adapter.rank = 4  # type: ignore[misc]


def test_versions_are_contiguous_and_monotonic_across_rollback(store: Store) -> None:
    make_adapter(store)
    assert add_versions(store, LORA, 3) == [1, 2, 3]
    assert store.rollback(LORA, 1).current_version == 1
    assert store.latest_version(LORA).version == 1  # type: ignore[union-attr]
    # The next version continues after the highest ever made, not after the current one.
    assert add_versions(store, LORA, 1) == [4]
    assert store.get_adapter(LORA).current_version == 4
    assert [v.version for v in store.list_versions(LORA)] == [1, 2, 3, 4]
    with pytest.raises(VersionNotFound, match=r"\[1, 2, 3, 4\]"):
        store.rollback(LORA, 7)
    assert store.get_adapter(LORA).current_version == 4


def test_add_version_moves_current_only_with_a_committed_row(tmp_path: Path) -> None:
    store = Store(tmp_path / "claas.db")
    make_adapter(store)
    add_versions(store, LORA, 2)
    # Make the second statement of the transaction (moving current_version) fail.
    with sqlite3.connect(tmp_path / "claas.db") as other:
        other.execute(
            "CREATE TRIGGER fail_move BEFORE UPDATE OF current_version ON adapters "
            "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
        )
    with pytest.raises(sqlite3.Error, match="simulated failure"):
        store.add_version(LORA, "s3", "w3", None, {})
    assert [v.version for v in store.list_versions(LORA)] == [1, 2]
    assert store.get_adapter(LORA).current_version == 2
    with sqlite3.connect(tmp_path / "claas.db") as other:
        other.execute("DROP TRIGGER fail_move")
    assert add_versions(store, LORA, 1) == [3]  # the failed attempt left no lock or number behind
    store.close()


def test_add_version_to_a_missing_adapter_writes_nothing(store: Store) -> None:
    with pytest.raises(AdapterNotFound):
        store.add_version(LORA, "s", "w", None, {})
    make_adapter(store)
    assert store.list_versions(LORA) == []


def test_eight_threads_adding_versions_get_unique_contiguous_numbers(tmp_path: Path) -> None:
    shared = Store(tmp_path / "claas.db")
    make_adapter(shared)
    # Half the threads share one Store; the other half open their own connection to the file.
    stores = [shared] * 4 + [Store(tmp_path / "claas.db") for _ in range(4)]
    per_thread = 25
    made: list[int] = []
    made_lock = threading.Lock()
    start = threading.Barrier(len(stores))

    def work(store: Store) -> None:
        start.wait()
        numbers = add_versions(store, LORA, per_thread)
        with made_lock:
            made.extend(numbers)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = per_thread * len(stores)
    assert sorted(made) == list(range(1, total + 1))
    assert [v.version for v in shared.list_versions(LORA)] == list(range(1, total + 1))
    assert shared.get_adapter(LORA).current_version == total
    for store in set(stores):
        store.close()


def test_delete_returns_versions_and_removes_feedback(store: Store) -> None:
    make_adapter(store)
    make_adapter(store, OTHER)
    add_versions(store, LORA, 2)
    mine = store.enqueue_feedback(LORA, [{"rollout_id": "r"}], {})
    theirs = store.enqueue_feedback(OTHER, [{"rollout_id": "r"}], {})
    add_rollout(store, "chatcmpl-1", expires_at=None)
    store.add_eval_run(LORA, {}, {"divergence_mode": "scalar_kl"})

    removed = store.delete_adapter(LORA)

    assert [(v.version, v.state_path) for v in removed] == [
        (1, "local://r/weights/0"),
        (2, "local://r/weights/1"),
    ]
    with pytest.raises(AdapterNotFound):
        store.get_adapter(LORA)
    with pytest.raises(FeedbackNotFound):
        store.get_feedback(mine.id)
    assert store.get_feedback(theirs.id).status == "queued"
    assert store.queue_depth() == 1
    assert store.list_eval_runs(LORA) == []
    with pytest.raises(RolloutNotFound):  # a re-created namesake must not train on them
        store.get_rollout("chatcmpl-1")
    with pytest.raises(AdapterNotFound):
        store.delete_adapter(LORA)
    make_adapter(store)  # the name is free again, and numbering starts over
    assert add_versions(store, LORA, 1) == [1]


def test_list_prefix_is_literal_and_case_sensitive(store: Store) -> None:
    for lora_id in ["a_b/x", "axb/x", "a-b/x", "Alice/x", "alice/y"]:
        make_adapter(store, lora_id)

    def listed(prefix: str) -> list[str]:
        return [a.lora_id for a in store.list_adapters(prefix)]

    assert listed("a_") == ["a_b/x"]
    assert listed("%") == []
    assert listed("a%") == []
    assert listed("alice/") == ["alice/y"]
    assert listed("") == ["Alice/x", "a-b/x", "a_b/x", "alice/y", "axb/x"]


# -- rollouts ---------------------------------------------------------------------------------


def test_rollout_round_trip(store: Store) -> None:
    written = add_rollout(store, "chatcmpl-1", expires_at=None)
    assert store.get_rollout("chatcmpl-1") == written
    with pytest.raises(Conflict):
        add_rollout(store, "chatcmpl-1", expires_at=None)


def test_expired_rollouts_are_gone(store: Store) -> None:
    now = time.time()
    add_rollout(store, "old", expires_at=now - 1)
    add_rollout(store, "fresh", expires_at=now + 3600)
    add_rollout(store, "forever", expires_at=None)
    with pytest.raises(RolloutNotFound, match=r"expired or never existed.*chat again"):
        store.get_rollout("old")
    with pytest.raises(RolloutNotFound, match="chat again"):
        store.get_rollout("never")
    assert store.get_rollout("fresh").id == "fresh"
    assert store.purge_expired_rollouts(now) == 1
    assert store.purge_expired_rollouts(now + 7200) == 1
    assert store.get_rollout("forever").id == "forever"
    with pytest.raises(RolloutNotFound):
        store.get_rollout("fresh")


def test_find_rollout_returns_the_newest_unexpired_match(store: Store) -> None:
    now = time.time()
    add_rollout(store, "first", expires_at=now + 3600)
    add_rollout(store, "second", expires_at=now + 3600)
    add_rollout(store, "third-expired", expires_at=now - 1)
    add_rollout(store, "other-adapter", expires_at=None, lora_id=OTHER)
    found = store.find_rollout(LORA, text_hash("hi"), text_hash("hello there"))
    assert found.id == "second"
    with pytest.raises(RolloutNotFound):
        store.find_rollout(LORA, text_hash("hi"), text_hash("something else"))


def test_text_hash_normalises_whitespace_and_unicode() -> None:
    assert text_hash("  hello\n\n\tworld  ") == text_hash("hello world")
    assert text_hash("caf\u0065\u0301") == text_hash("caf\u00e9")  # decomposed vs composed é
    assert text_hash("hello world") != text_hash("helloworld")
    assert text_hash("Hello") != text_hash("hello")
    assert re.fullmatch(r"[0-9a-f]{64}", text_hash(""))


@given(st.lists(st.text(st.characters(blacklist_categories=["Z", "Cc"]), min_size=1), max_size=6))
def test_text_hash_ignores_how_words_are_spaced(words: list[str]) -> None:
    assert text_hash(" ".join(words)) == text_hash("\n  " + "\t \n".join(words) + "  ")


# -- the feedback queue -----------------------------------------------------------------------


def test_queue_serves_in_arrival_order_even_when_the_clock_goes_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([1000.0, 999.0, 998.0, 997.0])
    monkeypatch.setattr("claas.store.time.time", lambda: next(clock))
    a1 = store.enqueue_feedback(LORA, [{"n": 1}], {})
    b1 = store.enqueue_feedback(OTHER, [{"n": 2}], {})
    a2 = store.enqueue_feedback(LORA, [{"n": 3}], {})
    b2 = store.enqueue_feedback(OTHER, [{"n": 4}], {})
    monkeypatch.undo()

    assert a1.id.startswith("fb-") and a1.status == "queued"
    assert store.get_feedback(a1.id) == a1
    assert [r.id for r in store.queued_for(LORA, 10)] == [a1.id, a2.id]
    assert [r.id for r in store.queued_for(OTHER, 1)] == [b1.id]
    assert store.adapters_with_queued() == [LORA, OTHER]
    assert store.next_queued().id == a1.id  # type: ignore[union-attr]
    assert store.next_queued(OTHER).id == b1.id  # type: ignore[union-attr]
    assert (store.queue_depth(), store.queue_depth(LORA)) == (4, 2)

    store.mark_running([a1.id])
    assert store.next_queued().id == b1.id  # type: ignore[union-attr]
    assert store.adapters_with_queued() == [OTHER, LORA]
    store.mark_running([b1.id, a2.id, b2.id])
    assert store.next_queued() is None
    assert store.queue_depth() == 0
    assert store.adapters_with_queued() == []


def test_list_feedback_is_newest_first_and_pages(store: Store) -> None:
    ids = [store.enqueue_feedback(LORA, [{"n": i}], {}).id for i in range(5)]
    store.enqueue_feedback(OTHER, [], {})
    assert [r.id for r in store.list_feedback(LORA)] == ids[::-1]
    assert [r.id for r in store.list_feedback(LORA, limit=2, offset=1)] == [ids[3], ids[2]]


def test_coalesced_requests_finish_with_their_leader(store: Store) -> None:
    leader = store.enqueue_feedback(LORA, [{"n": 1}], {"lr": 1e-4})
    follower = store.enqueue_feedback(LORA, [{"n": 2}], {"lr": 1e-4})
    store.mark_running([leader.id, follower.id])
    store.mark_coalesced(follower.id, leader.id)
    assert store.get_feedback(leader.id).started_at is not None
    store.mark_done([leader.id, follower.id], 3, {"divergence_mode": "topk_gjs"})
    for request in (store.get_feedback(leader.id), store.get_feedback(follower.id)):
        assert (request.status, request.version, request.metrics) == (
            "done",
            3,
            {"divergence_mode": "topk_gjs"},
        )
        assert request.finished_at is not None
    assert store.get_feedback(follower.id).coalesced_into == leader.id

    other = store.enqueue_feedback(OTHER, [], {})
    with pytest.raises(InvalidRequest, match="one adapter"):
        store.mark_coalesced(other.id, leader.id)
    store.mark_failed(other.id, "InvalidFeedback: no such rollout")  # a bare id is one id
    failed = store.get_feedback(other.id)
    assert (failed.status, failed.error, failed.version) == (
        "failed",
        "InvalidFeedback: no such rollout",
        None,
    )


def test_marking_an_unknown_id_marks_nothing(store: Store) -> None:
    real = store.enqueue_feedback(LORA, [], {})
    with pytest.raises(FeedbackNotFound, match="fb-missing"):
        store.mark_done([real.id, "fb-missing"], 1, {})
    assert store.get_feedback(real.id).status == "queued"
    with pytest.raises(FeedbackNotFound):
        store.mark_coalesced("fb-missing", real.id)


def test_requeue_running_after_a_crash_keeps_arrival_order(tmp_path: Path) -> None:
    path = tmp_path / "claas.db"
    first = Store(path)
    ids = [first.enqueue_feedback(LORA, [{"n": i}], {}).id for i in range(4)]
    first.mark_running(ids[:2])
    first.mark_coalesced(ids[1], ids[0])
    first.mark_running(ids[2])
    first.mark_done(ids[2], 1, {})
    first.close()  # the process dies with two requests `running`

    second = Store(path)
    assert second.queue_depth() == 1
    assert second.requeue_running() == 2
    queued = second.queued_for(LORA, 10)
    assert [r.id for r in queued] == [ids[0], ids[1], ids[3]]
    assert all(r.started_at is None and r.coalesced_into is None for r in queued)
    assert second.get_feedback(ids[2]).status == "done"
    assert second.requeue_running() == 0
    second.close()


# -- eval runs, health, schema ----------------------------------------------------------------


def test_eval_runs_carry_their_divergence_mode(store: Store) -> None:
    make_adapter(store)
    run = store.add_eval_run(LORA, {"prompts": 3}, {"divergence_mode": "topk_gjs", "win": 0.5})
    assert store.list_eval_runs(LORA) == [run]
    assert run.divergence_mode == "topk_gjs"
    with pytest.raises(InvalidRequest, match="divergence_mode"):
        store.add_eval_run(LORA, {}, {"win": 0.5})
    with pytest.raises(AdapterNotFound):
        store.add_eval_run(OTHER, {}, {"divergence_mode": "scalar_kl"})


def test_database_settings_ping_and_close(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "claas.db"
    with Store(path) as store:
        assert store.ping()
    assert not store.ping()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_foreign_keys_are_enforced(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store._db.execute("INSERT INTO adapter_versions VALUES ('x/y', 1, 's', 'w', 0, NULL, '{}')")


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "claas.db"
    Store(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(IncompatibleDatabase, match="upgrade claas"):
        Store(path)


def test_requeue_does_not_train_a_registered_request_twice(tmp_path: Path) -> None:
    """The process died after add_version but before mark_done: the request is done."""
    path = tmp_path / "claas.db"
    store = Store(path)
    store.create_adapter(LORA, "base", 4, 32.0, ["q_proj"])
    store.add_version(LORA, "local://r/weights/a", "local://r/sampler_weights/a", None, {})
    head = store.enqueue_feedback(LORA, [{"rollout_id": "r"}], {})
    follower = store.enqueue_feedback(LORA, [{"rollout_id": "r"}], {})
    pending = store.enqueue_feedback(LORA, [{"rollout_id": "r"}], {})
    store.mark_running([head.id, follower.id])
    store.mark_coalesced(follower.id, head.id)
    store.mark_running([pending.id])
    store.add_version(LORA, "local://r/weights/b", "local://r/sampler_weights/b", head.id, {})
    store.close()

    store = Store(path)
    store.requeue_running()
    assert store.get_feedback(head.id).status == "done"
    assert store.get_feedback(head.id).version == 2
    assert store.get_feedback(follower.id).version == 2
    assert store.get_feedback(pending.id).status == "queued"  # nothing registered: retrain
    store.close()
