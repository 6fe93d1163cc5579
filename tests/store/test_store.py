"""The store on both of its backends, a real SQLite file and a real PostgreSQL (the session's
cluster, `conftest.postgres`): ids, version numbering, the durable queue, claims and leases,
expiry, threads, migrations."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from hypothesis import given
from hypothesis import strategies as st
from postgres import PostgresCluster
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError

from claas.errors import (
    AdapterExists,
    AdapterNotFound,
    ClaimLost,
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
from claas.store import LEGACY_SQLITE_VERSION, Store, head_revision
from claas.store.database import use_wal

LORA = "alice/assistant"
OTHER = "bob/helper"


@pytest.fixture
def store(database: str) -> Iterator[Store]:
    with Store(database) as opened:
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
        Rollout(
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
            created_at=time.time(),
            expires_at=expires_at,
        )
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
        lambda s: s.list_feedback(lora_id="../x"),
        lambda s: s.count_feedback(lora_id="../x"),
        lambda s: s.memory("../x"),
        lambda s: s.forget("../x"),
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
    """SQLite: a trigger makes the transaction's second statement fail."""
    store = Store(tmp_path / "claas.db")
    make_adapter(store)
    add_versions(store, LORA, 2)
    # Make the second statement of the transaction (moving current_version) fail.
    with sqlite3.connect(tmp_path / "claas.db") as other:
        other.execute(
            "CREATE TRIGGER fail_move BEFORE UPDATE OF current_version ON adapters "
            "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
        )
    with pytest.raises(DBAPIError, match="simulated failure"):
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


def test_eight_threads_adding_versions_get_unique_contiguous_numbers(database: str) -> None:
    shared = Store(database)
    make_adapter(shared)
    # Half the threads share one Store; the other half open their own to the same database.
    stores = [shared] * 4 + [Store(database) for _ in range(4)]
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
    assert store.count_feedback(statuses=["queued"]) == 1
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


def test_claims_serve_in_arrival_order_even_when_the_clock_goes_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_adapter(store)
    make_adapter(store, OTHER)
    clock = iter([1000.0, 999.0, 998.0, 997.0])
    monkeypatch.setattr("claas.store.queue.time.time", lambda: next(clock))
    a1 = store.enqueue_feedback(LORA, [{"n": 1}], {})
    b1 = store.enqueue_feedback(OTHER, [{"n": 2}], {})
    a2 = store.enqueue_feedback(LORA, [{"n": 3}], {})
    b2 = store.enqueue_feedback(OTHER, [{"n": 4}], {})
    monkeypatch.undo()

    assert a1.id.startswith("fb-") and a1.status == "queued"
    assert store.get_feedback(a1.id) == a1
    assert store.count_feedback(statuses=["queued"]) == 4
    assert store.count_feedback(lora_id=LORA, statuses=["queued"]) == 2

    # The adapter whose oldest request waited longest comes first, with its run of requests.
    first = store.claim("w1", 30, max_batch=8)
    assert [r.id for r in first] == [a1.id, a2.id]
    assert all(r.status == "running" for r in first)
    assert store.get_feedback(a1.id).status == "running"
    # LORA is busy: another worker (or the same) gets OTHER, one request at a time here.
    assert [r.id for r in store.claim("w2", 30, max_batch=1)] == [b1.id]
    assert store.claim("w2", 30, max_batch=8) == []  # OTHER is busy too, until b1 ends
    store.mark_done([b1.id], 1, {})
    assert [r.id for r in store.claim("w1", 30, max_batch=8)] == [b2.id]
    assert store.count_feedback(statuses=["queued"]) == 0


def test_a_batch_is_a_run_of_one_training_config(store: Store) -> None:
    make_adapter(store)
    ids = [
        store.enqueue_feedback(LORA, [{"n": i}], {"learning_rate": lr}).id
        for i, lr in enumerate([1e-4, 1e-4, 2e-4, 1e-4])
    ]
    assert [r.id for r in store.claim("w", 30, max_batch=8)] == ids[:2]
    store.mark_done(ids[:2], 1, {})
    assert [r.id for r in store.claim("w", 30, max_batch=8)] == [ids[2]]
    store.mark_failed(ids[2], "x")
    assert [r.id for r in store.claim("w", 30, max_batch=8)] == [ids[3]]


def test_concurrent_workers_never_claim_one_adapter_twice(database: str) -> None:
    """Eight workers, each with its own Store (as separate processes have), claim and finish
    40 requests over 4 adapters at once: each request is claimed exactly once, never while
    another request of its adapter runs, and each adapter's requests in arrival order."""
    setup = Store(database)
    lora_ids = [f"alice/a{i}" for i in range(4)]
    for lora_id in lora_ids:
        make_adapter(setup, lora_id)
    queued = {lora_id: [] for lora_id in lora_ids}  # type: dict[str, list[str]]
    for n in range(40):
        lora_id = lora_ids[n % 4]
        queued[lora_id].append(setup.enqueue_feedback(lora_id, [{"n": n}], {}).id)
    stores = [Store(database) for _ in range(8)]
    claimed: list[tuple[str, list[str]]] = []
    busy: set[str] = set()
    overlap: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(stores))

    def work(name: str, store: Store) -> None:
        start.wait()
        idle = 0
        while idle < 20:
            batch = store.claim(name, 30, max_batch=2)
            if not batch:
                idle += 1
                time.sleep(0.01)
                continue
            idle = 0
            lora_id = batch[0].lora_id
            with lock:
                if lora_id in busy:
                    overlap.append(lora_id)
                busy.add(lora_id)
                claimed.append((lora_id, [r.id for r in batch]))
            time.sleep(0.005)
            with lock:
                busy.discard(lora_id)
            store.mark_done([r.id for r in batch], 1, {})

    errors: list[BaseException] = []

    def run(name: str, store: Store) -> None:
        try:
            work(name, store)
        except BaseException as error:  # a claim that raises is a failure, not a quiet worker
            errors.append(error)

    threads = [threading.Thread(target=run, args=(f"w{i}", s)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert overlap == []
    every = [i for _, ids in claimed for i in ids]
    assert sorted(every) == sorted(i for ids in queued.values() for i in ids)  # once each
    for lora_id in lora_ids:
        order = [i for claimed_id, ids in claimed if claimed_id == lora_id for i in ids]
        assert order == queued[lora_id]
    for store in [setup, *stores]:
        store.close()


def test_a_lease_that_ends_gives_the_batch_back_and_the_old_worker_loses_it(
    store: Store,
) -> None:
    make_adapter(store)
    add_versions(store, LORA, 1)
    head = store.enqueue_feedback(LORA, [{"n": 1}], {})
    follower = store.enqueue_feedback(LORA, [{"n": 2}], {})
    batch = store.claim("dead", 30, max_batch=8)
    store.mark_coalesced(follower.id, head.id)
    assert store.extend_lease("dead", [r.id for r in batch], 30) == 2
    assert store.extend_lease("someone-else", [head.id], 30) == 0
    assert store.reclaim() == 0  # the lease holds
    assert store.reclaim(now=time.time() + 31) == 2  # it ended: back in the queue
    requeued = store.get_feedback(head.id)
    assert (requeued.status, requeued.started_at, requeued.coalesced_into) == ("queued", None, None)
    assert store.get_feedback(follower.id).coalesced_into is None
    again = store.claim("alive", 30, max_batch=8)
    assert [r.id for r in again] == [head.id, follower.id]  # arrival order kept
    # The first worker wakes up and tries to register its result: refused, nothing written.
    with pytest.raises(ClaimLost, match="lost its claim"):
        store.add_version(LORA, "s", "w", head.id, {}, worker="dead")
    assert store.extend_lease("dead", [head.id], 30) == 0
    assert [v.version for v in store.list_versions(LORA)] == [1]
    assert store.add_version(LORA, "s", "w", head.id, {}, worker="alive").version == 2


def test_a_restarted_worker_takes_back_its_own_claims_at_once(store: Store) -> None:
    make_adapter(store)
    request = store.enqueue_feedback(LORA, [{"n": 1}], {})
    store.claim("worker-a", 300, max_batch=8)
    assert store.reclaim(worker="worker-b") == 0
    assert store.reclaim(worker="worker-a") == 1
    assert store.get_feedback(request.id).status == "queued"


def test_list_feedback_is_newest_first_and_pages(store: Store) -> None:
    make_adapter(store)
    make_adapter(store, OTHER)
    ids = [store.enqueue_feedback(LORA, [{"n": i}], {}).id for i in range(5)]
    store.enqueue_feedback(OTHER, [], {})
    assert [r.id for r in store.list_feedback(lora_id=LORA)] == ids[::-1]
    assert [r.id for r in store.list_feedback(lora_id=LORA, limit=2, offset=1)] == [
        ids[3],
        ids[2],
    ]
    assert [r.id for r in store.list_feedback(owner="alice")] == ids[::-1]  # by owner
    assert len(store.list_feedback()) == 6
    store.mark_failed(ids[0], "x")
    assert [r.id for r in store.list_feedback(statuses=["failed"])] == [ids[0]]
    assert store.count_feedback(owner="alice", statuses=["queued", "running"]) == 4


def test_coalesced_requests_finish_with_their_leader(store: Store) -> None:
    make_adapter(store)
    make_adapter(store, OTHER)
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
    make_adapter(store)
    real = store.enqueue_feedback(LORA, [], {})
    with pytest.raises(FeedbackNotFound, match="fb-missing"):
        store.mark_done([real.id, "fb-missing"], 1, {})
    assert store.get_feedback(real.id).status == "queued"
    with pytest.raises(FeedbackNotFound):
        store.mark_coalesced("fb-missing", real.id)


def test_reclaim_after_a_crash_keeps_arrival_order(database: str) -> None:
    first = Store(database)
    make_adapter(first)
    ids = [first.enqueue_feedback(LORA, [{"n": i}], {}).id for i in range(4)]
    first.claim("dead", 30, max_batch=2)
    first.mark_coalesced(ids[1], ids[0])
    first.close()  # the process dies with two requests `running`

    second = Store(database)
    assert second.count_feedback(statuses=["queued"]) == 2
    assert second.reclaim(now=time.time() + 60) == 2
    queued = second.list_feedback(lora_id=LORA, statuses=["queued"])[::-1]
    assert [r.id for r in queued] == ids
    assert all(r.started_at is None and r.coalesced_into is None for r in queued)
    assert second.reclaim(now=time.time() + 60) == 0
    second.close()


def test_database_settings_ping_and_close(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "claas.db"
    with Store(path) as store:
        assert store.ping()
    assert not store.ping()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        (revision,) = raw.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision == head_revision()


def test_foreign_keys_are_enforced(store: Store) -> None:
    with pytest.raises(IntegrityError), store._transaction() as db:
        db.execute(
            sqlalchemy.text(
                "INSERT INTO adapter_versions VALUES ('x/y', 1, 's', 'w', 0, NULL, '{}')"
            )
        )


def test_a_newer_schema_is_refused(database: str) -> None:
    Store(database).close()
    engine = sqlalchemy.create_engine(database)
    with engine.begin() as raw:
        raw.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(IncompatibleDatabase, match=r"newer than this claas knows.*upgrade claas"):
        Store(database)


def test_a_newer_legacy_sqlite_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "claas.db"
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version={LEGACY_SQLITE_VERSION + 1}")
    with pytest.raises(IncompatibleDatabase, match="upgrade claas"):
        Store(path)


def test_an_unsupported_database_url_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="postgresql"):
        Store("mysql://x@y/z")


def test_reclaim_does_not_train_a_registered_request_twice(database: str) -> None:
    """The worker died after add_version but before mark_done: the request is done."""
    store = Store(database)
    store.create_adapter(LORA, "base", 4, 32.0, ["q_proj"])
    store.add_version(LORA, "local://r/weights/a", "local://r/sampler_weights/a", None, {})
    head = store.enqueue_feedback(LORA, [{"rollout_id": "r"}], {})
    follower = store.enqueue_feedback(LORA, [{"rollout_id": "r"}], {})
    pending = store.enqueue_feedback(LORA, [{"rollout_id": "r"}], {})
    store.claim("dead", 30, max_batch=2)
    store.mark_coalesced(follower.id, head.id)
    store.mark_running([pending.id])  # running without a lease (a release before leases)
    store.add_version(
        LORA, "local://r/weights/b", "local://r/sampler_weights/b", head.id, {}, worker="dead"
    )
    store.close()

    store = Store(database)
    assert store.reclaim() == 1  # only the one without a lease: the others' holds
    store.reclaim(now=time.time() + 31)
    assert store.get_feedback(head.id).status == "done"
    assert store.get_feedback(head.id).version == 2
    assert store.get_feedback(follower.id).version == 2
    assert store.get_feedback(pending.id).status == "queued"  # nothing registered: retrain
    store.close()


# -- migrations -------------------------------------------------------------------------------

LEGACY = Path(__file__).parents[1] / "data" / "claas-0.1-schema2.db"


def test_a_database_from_the_last_release_upgrades_in_place_with_nothing_lost(
    tmp_path: Path,
) -> None:
    """`tests/data/claas-0.1-schema2.db` was written by claas 0.1's store (SQLite
    `user_version` 2, before Alembic): an adapter with two versions, a rollout, a request
    done, one left running by a crash, one queued, a memory item and an eval run."""
    path = tmp_path / "claas.db"
    shutil.copy(LEGACY, path)
    with Store(path) as store:
        assert store.tables() == [
            "adapter_versions",
            "adapters",
            "alembic_version",
            "feedback",
            "memory",
            "rollouts",
        ]  # eval_runs dropped: runs live in their output directories
        adapter = store.get_adapter("alice/assistant")
        assert (adapter.rank, adapter.target_modules, adapter.current_version) == (
            8,
            ["q_proj", "v_proj"],
            2,
        )
        assert [v.state_path for v in store.list_versions("alice/assistant")] == [
            "local://alice/weights/v1",
            "local://alice/weights/v2",
        ]
        assert store.get_rollout("chatcmpl-legacy").behavior_logprobs == [-0.5]
        requests = store.list_feedback(lora_id="alice/assistant")[::-1]
        assert [r.status for r in requests] == ["done", "running", "queued"]
        assert requests[0].metrics == {"loss": 0.5} and requests[0].version == 2
        assert [m.feedback for m in store.memory("alice/assistant")] == ["shorter"]
        # The request a crash left running has no lease: it goes back to the queue at once,
        # ahead of the newer one, and training continues numbering after version 2.
        assert store.reclaim() == 1
        batch = store.claim("w", 30, max_batch=8)
        assert [r.id for r in batch] == [requests[1].id, requests[2].id]
        assert (
            store.add_version("alice/assistant", "s", "w", batch[0].id, {}, worker="w").version == 3
        )
    with sqlite3.connect(path) as raw:
        (revision,) = raw.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision == head_revision()


def test_a_version_1_database_from_the_last_release_gains_what_it_lacks(tmp_path: Path) -> None:
    path = tmp_path / "claas.db"
    shutil.copy(LEGACY, path)
    with sqlite3.connect(path) as raw:  # as claas 0.1 before memory existed
        raw.execute("DROP TABLE memory")
        raw.execute("PRAGMA user_version=1")
    with Store(path) as store:
        assert store.get_adapter("alice/assistant").current_version == 2
        assert store.count_memory("alice/assistant") == 0
        assert "memory" in store.tables()


def test_two_processes_migrating_one_new_postgres_at_once_both_succeed(
    postgres: PostgresCluster,
) -> None:
    """Replicas start together: the migration's advisory lock lets one create the schema and
    the other find it done."""
    url = postgres.database()
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store(url).close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Store(url) as store:
        assert "feedback" in store.tables()


def test_nothing_is_queued_for_an_adapter_that_does_not_exist(store: Store) -> None:
    """An adapter deleted between validation and queueing: the request is refused, not left
    queued where no claim would ever take it."""
    with pytest.raises(AdapterNotFound, match="nothing was queued"):
        store.enqueue_feedback(LORA, [{"n": 1}], {})
    assert store.count_feedback() == 0


def test_registration_finishes_the_claimed_batch_in_the_same_transaction(store: Store) -> None:
    make_adapter(store)
    add_versions(store, LORA, 1)
    head = store.enqueue_feedback(LORA, [{"n": 1}], {})
    follower = store.enqueue_feedback(LORA, [{"n": 2}], {})
    ids = [r.id for r in store.claim("w", 30, max_batch=8)]
    store.mark_coalesced(follower.id, head.id)
    made = store.add_version(LORA, "s", "w", head.id, {}, worker="w", claimed=ids)
    for request in (store.get_feedback(head.id), store.get_feedback(follower.id)):
        assert (request.status, request.version) == ("done", made.version)
    assert store.reclaim(now=time.time() + 60) == 0  # nothing left to give back


def test_a_stale_worker_can_neither_register_nor_fail_what_another_worker_took(
    store: Store,
) -> None:
    """Worker A's lease ends mid-step; B takes the request and registers it. A, waking up,
    can neither register a second version nor mark B's request failed."""
    make_adapter(store)
    add_versions(store, LORA, 1)
    request = store.enqueue_feedback(LORA, [{"n": 1}], {})
    store.claim("a", 30, max_batch=8)
    store.reclaim(now=time.time() + 31)
    store.claim("b", 30, max_batch=8)
    with pytest.raises(ClaimLost):
        store.add_version(LORA, "sa", "wa", request.id, {}, worker="a", claimed=[request.id])
    made = store.add_version(LORA, "sb", "wb", request.id, {}, worker="b", claimed=[request.id])
    with pytest.raises(ClaimLost):
        store.mark_failed(request.id, "A's step broke", worker="a")
    done = store.get_feedback(request.id)
    assert (done.status, done.version, done.error) == ("done", made.version, None)
    assert [v.version for v in store.list_versions(LORA)] == [1, 2]


def test_switching_to_wal_waits_out_a_lock_sqlite_answers_at_once(tmp_path: Path) -> None:
    """When two connections switch a new file to WAL at once, SQLite answers one "database is
    locked" without its busy handler (each holds SHARED, each wants EXCLUSIVE). A connection
    without a busy handler (timeout 0) meets the same immediate answer while another holds the
    file's lock; the store's switch tries again until that lock is gone."""
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    waiting = sqlite3.connect(path, timeout=0, check_same_thread=False)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        waiting.execute("PRAGMA journal_mode=WAL")
    use_wal(waiting.cursor())
    assert waiting.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    waiting.close()
    holder.close()


def test_two_processes_creating_one_new_sqlite_file_at_once_both_succeed(tmp_path: Path) -> None:
    """`claas serve` and `claas worker` started together on a fresh data dir: the migration
    takes SQLite's write lock, so one creates the schema and the other finds it done."""
    path = tmp_path / "fresh.db"
    script = "import sys; from claas.store import Store; Store(sys.argv[1]).close(); print('ok')"
    for _ in range(3):
        path.unlink(missing_ok=True)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(4)
        ]
        outcomes = [process.communicate(timeout=120) for process in processes]
        assert all(out.strip() == b"ok" for out, _ in outcomes), [e[-300:] for _, e in outcomes]
