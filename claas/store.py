"""The durable state of claas: one SQLite database (WAL, foreign keys on).

It holds five kinds of record:
- **adapters**: one row per `owner/name`, with its LoRA shape and `current_version`, the version
  that is served and trained from (None until the first version exists);
- **adapter versions**: numbered 1, 2, 3, … per adapter, never reused, each pointing at the
  checkpoint paths of its training state and its sampler weights;
- **rollouts**: what the sampler produced, token for token, with the behavior log-probs that the
  importance ratios of a later training step need;
- **feedback requests**: the durable training queue, with each request's status
  (queued → running → done | failed) in arrival order;
- **memory**: what each adapter was taught, one item per prompt and feedback text (the
  conversation up to the answer, its prompt tokens, the feedback and example; never the
  answer), written with the request that taught it and replayed by later requests;
- **eval runs**: an eval's config and results (which always name their `divergence_mode`).

Adapter weights are not here: they live on disk in PEFT format. The atomicity rule: a new
version's files are written to a temp dir and renamed into place by the caller *first*; only then
is the version committed here, in one transaction that also moves the adapter's
`current_version`. A crash therefore never leaves "latest" pointing at a half-written version.

One `Store` is shared by the API's event loop and the training worker thread. A lock serialises
access to its single connection, and every write is one short `BEGIN IMMEDIATE` transaction, which
also keeps a second process (the CLI) on the same file correct.

    with Store(Path("~/.local/share/claas/claas.db").expanduser()) as store:
        store.create_adapter("alice/assistant", "SmolLM2-135M-Instruct", 32, 32.0, ["q_proj"])
        store.add_version("alice/assistant", "local://r/weights/v1", "local://r/sw/v1", None, {})
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from claas.errors import (
    AdapterExists,
    AdapterNotFound,
    Conflict,
    FeedbackNotFound,
    IncompatibleDatabase,
    InvalidRequest,
    RolloutNotFound,
    VersionNotFound,
)
from claas.ids import (
    feedback_missing,
    memory_missing,
    rollout_missing,
    text_hash,
    validate_lora_id,
)
from claas.records import (
    Adapter,
    AdapterVersion,
    EvalRun,
    FeedbackRequest,
    FeedbackStatus,
    MemoryItem,
    Rollout,
)
from claas.sdpo.config import DIVERGENCE_MODES, lesson_key

# 2 added the memory table; a version-1 database gains it in place (CREATE IF NOT EXISTS).
SCHEMA_VERSION = 2


_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    lora_id TEXT PRIMARY KEY,
    base_model TEXT NOT NULL,
    rank INTEGER NOT NULL,
    lora_alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    created_at REAL NOT NULL,
    current_version INTEGER
);
CREATE TABLE IF NOT EXISTS adapter_versions (
    lora_id TEXT NOT NULL REFERENCES adapters(lora_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    state_path TEXT NOT NULL,
    sampler_path TEXT NOT NULL,
    created_at REAL NOT NULL,
    feedback_id TEXT,
    metrics TEXT NOT NULL,
    PRIMARY KEY (lora_id, version)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    lora_id TEXT,
    adapter_version INTEGER,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,
    prompt_tokens TEXT NOT NULL,
    response_tokens TEXT NOT NULL,
    behavior_logprobs TEXT NOT NULL,
    sampling_params TEXT NOT NULL,
    response_text TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    response_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    prompt_format TEXT NOT NULL DEFAULT 'chat'
);
CREATE INDEX IF NOT EXISTS rollouts_by_text ON rollouts (lora_id, prompt_hash, response_hash);
CREATE INDEX IF NOT EXISTS rollouts_by_expiry ON rollouts (expires_at);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    lora_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    items TEXT NOT NULL,
    training TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    metrics TEXT NOT NULL,
    version INTEGER,
    coalesced_into TEXT
);
CREATE INDEX IF NOT EXISTS feedback_by_adapter ON feedback (lora_id, status, seq);
CREATE TABLE IF NOT EXISTS memory (
    id TEXT PRIMARY KEY,
    lora_id TEXT NOT NULL REFERENCES adapters(lora_id) ON DELETE CASCADE,
    lesson_hash TEXT NOT NULL,
    feedback_id TEXT NOT NULL,
    messages TEXT NOT NULL,
    prompt_tokens TEXT NOT NULL,
    prompt_format TEXT NOT NULL,
    feedback TEXT NOT NULL,
    example TEXT,
    created_at REAL NOT NULL,
    UNIQUE (lora_id, lesson_hash)
);
CREATE INDEX IF NOT EXISTS memory_by_adapter ON memory (lora_id, created_at);
CREATE TABLE IF NOT EXISTS eval_runs (
    id TEXT PRIMARY KEY,
    lora_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    config TEXT NOT NULL,
    results TEXT NOT NULL
);
"""


_JSON_COLUMNS = frozenset(
    {
        "target_modules",
        "metrics",
        "messages",
        "prompt_tokens",
        "response_tokens",
        "behavior_logprobs",
        "sampling_params",
        "items",
        "training",
        "config",
        "results",
    }
)


def _fields(row: sqlite3.Row) -> dict[str, Any]:
    """A row as model fields: JSON columns decoded, the internal `seq` and `lesson_hash`
    dropped."""
    return {
        key: json.loads(row[key]) if key in _JSON_COLUMNS else row[key]
        for key in row.keys()  # noqa: SIM118 - sqlite3.Row is not a mapping
        if key not in ("seq", "lesson_hash")
    }


def _as_ids(ids: str | Sequence[str]) -> list[str]:
    # A bare string is one id, not a sequence of one-character ids.
    return [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))


class Store:
    """Adapters, versions, rollouts, the feedback queue and eval runs, in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Reentrant, so a write transaction can use the read helpers while it holds the lock.
        self._lock = threading.RLock()
        self._depth = 0  # write transactions open on the lock's holder (nested ones join)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._create_schema()
        except BaseException:
            self._db.close()
            raise

    def _create_schema(self) -> None:
        with self._transaction() as db:
            (found,) = db.execute("PRAGMA user_version").fetchone()
            if found > SCHEMA_VERSION:
                raise IncompatibleDatabase(
                    f"{self.path} has schema version {found}, newer than this claas knows "
                    f"({SCHEMA_VERSION}); upgrade claas, or use another data dir"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so reads inside it
        (max(version), existence checks) cannot go stale before the write. Inside another (the
        lock is reentrant) it joins the outer transaction, which commits or rolls back both."""
        with self._lock:
            if self._depth:  # nested: part of the outer one, which commits or rolls back
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def ping(self) -> bool:
        """True when the database answers a query."""
        try:
            return self._one("SELECT 1") is not None
        except sqlite3.Error:
            return False

    # -- adapters ---------------------------------------------------------------------------
    def create_adapter(
        self,
        lora_id: str,
        base_model: str,
        rank: int,
        lora_alpha: float,
        target_modules: Sequence[str],
    ) -> Adapter:
        adapter = Adapter(
            lora_id=validate_lora_id(lora_id),
            base_model=base_model,
            rank=rank,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            created_at=time.time(),
            current_version=None,
        )
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, NULL)",
                    (
                        adapter.lora_id,
                        adapter.base_model,
                        adapter.rank,
                        adapter.lora_alpha,
                        json.dumps(adapter.target_modules),
                        adapter.created_at,
                    ),
                )
        except sqlite3.IntegrityError:
            raise AdapterExists(
                f"adapter {lora_id} already exists; use it, pick another name, or delete it first"
            ) from None
        return adapter

    def get_adapter(self, lora_id: str) -> Adapter:
        validate_lora_id(lora_id)
        row = self._one("SELECT * FROM adapters WHERE lora_id = ?", (lora_id,))
        if row is None:
            raise AdapterNotFound(
                f"adapter {lora_id} does not exist; create it first with POST /v1/adapters "
                "or `claas adapters create`"
            )
        return Adapter(**_fields(row))

    def list_adapters(self, prefix: str = "") -> list[Adapter]:
        """Adapters whose lora_id starts with `prefix`, exactly and case-sensitively.

        substr() rather than LIKE: LIKE treats `%`/`_` as wildcards and ignores ASCII case, and
        the API scopes an API key to `owner/` with this prefix.
        """
        rows = self._all(
            "SELECT * FROM adapters WHERE substr(lora_id, 1, ?) = ? ORDER BY lora_id",
            (len(prefix), prefix),
        )
        return [Adapter(**_fields(r)) for r in rows]

    def count_adapters(self, owner: str) -> int:
        row = self._one(
            "SELECT COUNT(*) FROM adapters WHERE substr(lora_id, 1, ?) = ?",
            (len(owner) + 1, f"{owner}/"),
        )
        assert row is not None  # COUNT(*) always returns a row
        return int(row[0])

    def delete_adapter(self, lora_id: str) -> list[AdapterVersion]:
        """Delete the adapter with its versions, rollouts, feedback requests, memory and eval
        runs.

        Returns the versions removed, so the caller can delete their checkpoint files. Its
        rollouts go too: an adapter re-created under the same name must not train on answers
        the deleted one gave.
        """
        with self._transaction() as db:
            versions = self.list_versions(lora_id)  # raises AdapterNotFound
            db.execute("DELETE FROM rollouts WHERE lora_id = ?", (lora_id,))
            db.execute("DELETE FROM feedback WHERE lora_id = ?", (lora_id,))
            db.execute("DELETE FROM memory WHERE lora_id = ?", (lora_id,))
            db.execute("DELETE FROM eval_runs WHERE lora_id = ?", (lora_id,))
            db.execute("DELETE FROM adapters WHERE lora_id = ?", (lora_id,))  # cascades versions
        return versions

    # -- versions ---------------------------------------------------------------------------
    def add_version(
        self,
        lora_id: str,
        state_path: str,
        sampler_path: str,
        feedback_id: str | None,
        metrics: dict[str, Any],
        trained_from: Adapter | None = None,
    ) -> AdapterVersion:
        """Register a version whose files are already in place, and make it current.

        The number is max(existing) + 1, so numbers are never reused, even after a rollback.
        `trained_from` is the adapter as it was when training started: if it was rolled back,
        or deleted and re-created, meanwhile, the result is refused (`Conflict`) rather than
        silently undoing that change.
        """
        with self._transaction() as db:
            adapter = self.get_adapter(lora_id)
            if trained_from is not None and (
                adapter.current_version != trained_from.current_version
                or adapter.created_at != trained_from.created_at
            ):
                raise Conflict(
                    f"adapter {lora_id} changed while this request trained (rolled back, or "
                    "deleted and re-created); its result was discarded. Send the feedback again"
                )
            (latest,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM adapter_versions WHERE lora_id = ?",
                (lora_id,),
            ).fetchone()
            version = AdapterVersion(
                lora_id=lora_id,
                version=int(latest) + 1,
                state_path=state_path,
                sampler_path=sampler_path,
                created_at=time.time(),
                feedback_id=feedback_id,
                metrics=metrics,
            )
            db.execute(
                "INSERT INTO adapter_versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    lora_id,
                    version.version,
                    state_path,
                    sampler_path,
                    version.created_at,
                    feedback_id,
                    json.dumps(metrics),
                ),
            )
            db.execute(
                "UPDATE adapters SET current_version = ? WHERE lora_id = ?",
                (version.version, lora_id),
            )
        return version

    def list_versions(self, lora_id: str) -> list[AdapterVersion]:
        """All versions of the adapter, oldest first."""
        with self._lock:
            self.get_adapter(lora_id)
            rows = self._all(
                "SELECT * FROM adapter_versions WHERE lora_id = ? ORDER BY version", (lora_id,)
            )
        return [AdapterVersion(**_fields(r)) for r in rows]

    def checkpoint_paths(self) -> set[str]:
        """Every checkpoint path a version references: what a start-up sweep must keep."""
        rows = self._all("SELECT state_path, sampler_path FROM adapter_versions")
        return {path for row in rows for path in (row[0], row[1])}

    def get_version(self, lora_id: str, version: int) -> AdapterVersion:
        with self._lock:
            self.get_adapter(lora_id)
            row = self._one(
                "SELECT * FROM adapter_versions WHERE lora_id = ? AND version = ?",
                (lora_id, version),
            )
            if row is None:
                existing = [v.version for v in self.list_versions(lora_id)]
                raise VersionNotFound(
                    f"adapter {lora_id} has no version {version}; its versions are {existing}"
                )
        return AdapterVersion(**_fields(row))

    def latest_version(self, lora_id: str) -> AdapterVersion | None:
        """The current version: the one served and trained from (a rollback moves it)."""
        with self._lock:
            adapter = self.get_adapter(lora_id)
            if adapter.current_version is None:
                return None
            return self.get_version(lora_id, adapter.current_version)

    def rollback(self, lora_id: str, version: int) -> Adapter:
        """Serve and train from an existing `version` again; later versions are kept.

        Lessons last taught by the requests that made later versions are forgotten with them,
        so replay does not teach again what the rollback undid."""
        with self._transaction() as db:
            self.get_version(lora_id, version)
            db.execute(
                "DELETE FROM memory WHERE lora_id = ? AND feedback_id IN ("
                "  SELECT f.id FROM feedback f JOIN adapter_versions v"
                "    ON v.lora_id = f.lora_id AND v.feedback_id = COALESCE(f.coalesced_into, f.id)"
                "  WHERE f.lora_id = ? AND v.version > ?)",
                (lora_id, lora_id, version),
            )
            db.execute(
                "UPDATE adapters SET current_version = ? WHERE lora_id = ?", (version, lora_id)
            )
            return self.get_adapter(lora_id)

    # -- rollouts ---------------------------------------------------------------------------
    def add_rollout(
        self,
        *,
        id: str,
        lora_id: str | None,
        adapter_version: int | None,
        model: str,
        messages: list[dict[str, Any]],
        prompt_tokens: list[int],
        response_tokens: list[int],
        behavior_logprobs: list[float],
        sampling_params: dict[str, Any],
        response_text: str,
        prompt_hash: str,
        response_hash: str,
        expires_at: float | None,
        prompt_format: Literal["chat", "text"] = "chat",
    ) -> Rollout:
        """Record a sampled completion; `id` is the caller's (e.g. "chatcmpl-…")."""
        if lora_id is not None:
            validate_lora_id(lora_id)
        rollout = Rollout(
            id=id,
            lora_id=lora_id,
            adapter_version=adapter_version,
            model=model,
            messages=messages,
            prompt_tokens=prompt_tokens,
            response_tokens=response_tokens,
            behavior_logprobs=behavior_logprobs,
            sampling_params=sampling_params,
            response_text=response_text,
            prompt_hash=prompt_hash,
            response_hash=response_hash,
            created_at=time.time(),
            expires_at=expires_at,
            prompt_format=prompt_format,
        )
        values = rollout.model_dump()
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        try:
            with self._transaction() as db:
                db.execute(
                    f"INSERT INTO rollouts ({columns}) VALUES ({marks})",
                    [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()],
                )
        except sqlite3.IntegrityError:
            raise Conflict(
                f"rollout {id!r} already exists; give each completion a new id"
            ) from None
        return rollout

    def get_rollout(self, rollout_id: str) -> Rollout:
        """The rollout, unless it expired (`expires_at <= now`) or never existed."""
        row = self._one(
            "SELECT * FROM rollouts WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
            (rollout_id, time.time()),
        )
        if row is None:
            raise rollout_missing(rollout_id)
        return Rollout(**_fields(row))

    def find_rollout(self, lora_id: str, prompt_hash: str, response_hash: str) -> Rollout:
        """The newest unexpired rollout of the adapter with these `text_hash`es."""
        validate_lora_id(lora_id)
        row = self._one(
            "SELECT * FROM rollouts WHERE lora_id = ? AND prompt_hash = ? AND response_hash = ? "
            "AND (expires_at IS NULL OR expires_at > ?) "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (lora_id, prompt_hash, response_hash, time.time()),
        )
        if row is None:
            raise RolloutNotFound(
                f"no unexpired rollout of {lora_id} has that prompt and response text (it expired "
                "or never existed); chat again and give feedback on the new completion id"
            )
        return Rollout(**_fields(row))

    def purge_expired_rollouts(self, now: float | None = None) -> int:
        """Delete rollouts with `expires_at <= now`; returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM rollouts WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (time.time() if now is None else now,),
            )
            return int(cursor.rowcount)

    # -- the feedback queue -----------------------------------------------------------------
    def enqueue_feedback(
        self, lora_id: str, items: list[dict[str, Any]], training: dict[str, Any]
    ) -> FeedbackRequest:
        """Append a `queued` request; its place in line is its arrival (the `seq` column)."""
        request = FeedbackRequest(
            id=f"fb-{uuid.uuid4().hex}",
            lora_id=validate_lora_id(lora_id),
            status="queued",
            items=items,
            training=training,
            created_at=time.time(),
            started_at=None,
            finished_at=None,
            error=None,
            metrics={},
            version=None,
            coalesced_into=None,
        )
        with self._transaction() as db:
            db.execute(
                "INSERT INTO feedback (id, lora_id, status, items, training, created_at, metrics)"
                " VALUES (?, ?, 'queued', ?, ?, ?, '{}')",
                (request.id, lora_id, json.dumps(items), json.dumps(training), request.created_at),
            )
        return request

    def get_feedback(self, feedback_id: str) -> FeedbackRequest:
        row = self._one("SELECT * FROM feedback WHERE id = ?", (feedback_id,))
        if row is None:
            raise feedback_missing(feedback_id)
        return FeedbackRequest(**_fields(row))

    def list_feedback(
        self, lora_id: str, limit: int = 50, offset: int = 0
    ) -> list[FeedbackRequest]:
        """The adapter's requests, newest first."""
        validate_lora_id(lora_id)
        rows = self._all(
            "SELECT * FROM feedback WHERE lora_id = ? ORDER BY created_at DESC, seq DESC "
            "LIMIT ? OFFSET ?",
            (lora_id, limit, offset),
        )
        return [FeedbackRequest(**_fields(r)) for r in rows]

    def next_queued(self, lora_id: str | None = None) -> FeedbackRequest | None:
        """The oldest queued request (of one adapter, or of any)."""
        if lora_id is None:
            row = self._one("SELECT * FROM feedback WHERE status = 'queued' ORDER BY seq LIMIT 1")
        else:
            row = self._one(
                "SELECT * FROM feedback WHERE lora_id = ? AND status = 'queued' "
                "ORDER BY seq LIMIT 1",
                (validate_lora_id(lora_id),),
            )
        return None if row is None else FeedbackRequest(**_fields(row))

    def queued_for(self, lora_id: str, limit: int) -> list[FeedbackRequest]:
        """The adapter's queued requests, oldest first (arrival order)."""
        rows = self._all(
            "SELECT * FROM feedback WHERE lora_id = ? AND status = 'queued' ORDER BY seq LIMIT ?",
            (validate_lora_id(lora_id), limit),
        )
        return [FeedbackRequest(**_fields(r)) for r in rows]

    def adapters_with_queued(self) -> list[str]:
        """Adapters with queued requests, the one waiting longest first."""
        rows = self._all(
            "SELECT lora_id, MIN(seq) AS first FROM feedback WHERE status = 'queued' "
            "GROUP BY lora_id ORDER BY first"
        )
        return [str(r["lora_id"]) for r in rows]

    def queue_depth(self, lora_id: str | None = None) -> int:
        if lora_id is None:
            row = self._one("SELECT COUNT(*) FROM feedback WHERE status = 'queued'")
        else:
            row = self._one(
                "SELECT COUNT(*) FROM feedback WHERE status = 'queued' AND lora_id = ?",
                (validate_lora_id(lora_id),),
            )
        assert row is not None  # COUNT(*) always returns a row
        return int(row[0])

    def mark_running(self, ids: str | Sequence[str]) -> None:
        self._set_status(ids, "running", "started_at = ?", [time.time()])

    def mark_coalesced(self, feedback_id: str, into: str) -> None:
        """Record that `feedback_id` trains in the same step as the leader `into`.

        A coalesced request then finishes with its leader: the worker passes the whole batch's
        ids to `mark_done` / `mark_failed`.
        """
        with self._transaction() as db:
            leader = self.get_feedback(into)
            follower = self.get_feedback(feedback_id)
            if follower.lora_id != leader.lora_id:
                raise InvalidRequest(
                    f"cannot coalesce {feedback_id} ({follower.lora_id}) into {into} "
                    f"({leader.lora_id}); only requests of one adapter train together"
                )
            db.execute("UPDATE feedback SET coalesced_into = ? WHERE id = ?", (into, feedback_id))

    def mark_done(
        self,
        ids: str | Sequence[str],
        version: int,
        metrics: dict[str, Any],
        learned: Sequence[MemoryItem] = (),
        memory_limit: int | None = None,
    ) -> None:
        """Finish the requests (a leader and its coalesced followers) with the version made,
        and remember what they taught in the same transaction (`remember`)."""
        with self._transaction():
            self._set_status(
                ids,
                "done",
                "finished_at = ?, version = ?, metrics = ?, error = NULL",
                [time.time(), version, json.dumps(metrics)],
            )
            self.remember(learned, memory_limit)

    def mark_failed(
        self, ids: str | Sequence[str], error: str, metrics: dict[str, Any] | None = None
    ) -> None:
        self._set_status(
            ids,
            "failed",
            "finished_at = ?, version = NULL, error = ?, metrics = ?",
            [time.time(), error, json.dumps(metrics or {})],
        )

    def requeue_running(self) -> int:
        """At start-up: requests left `running` by a dead process go back to `queued`.

        Their `seq` (arrival order) is unchanged, so they run before anything newer. Their
        coalescing is undone; the worker forms batches again. A request whose version was
        already registered (the process died between registering and marking it done) is
        marked done with that version instead, so it is never trained twice.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE feedback SET status = 'done', finished_at = ?, error = NULL, version = ("
                "  SELECT v.version FROM adapter_versions v"
                "  WHERE v.feedback_id = COALESCE(feedback.coalesced_into, feedback.id)"
                ") WHERE status = 'running' AND EXISTS ("
                "  SELECT 1 FROM adapter_versions v"
                "  WHERE v.feedback_id = COALESCE(feedback.coalesced_into, feedback.id))",
                (time.time(),),
            )
            cursor = db.execute(
                "UPDATE feedback SET status = 'queued', started_at = NULL, coalesced_into = NULL "
                "WHERE status = 'running'"
            )
            return int(cursor.rowcount)

    def _set_status(
        self,
        ids: str | Sequence[str],
        status: FeedbackStatus,
        assignments: str,
        values: list[Any],
    ) -> None:
        wanted = _as_ids(ids)
        if not wanted:
            return
        marks = ", ".join("?" for _ in wanted)
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE feedback SET status = ?, {assignments} WHERE id IN ({marks})",
                [status, *values, *wanted],
            )
            if cursor.rowcount != len(wanted):  # all or nothing: the transaction rolls back
                found = {
                    r["id"]
                    for r in self._all(f"SELECT id FROM feedback WHERE id IN ({marks})", wanted)
                }
                missing = [i for i in wanted if i not in found]
                raise FeedbackNotFound(
                    f"feedback requests {missing} do not exist (was the adapter deleted?); "
                    "nothing was marked"
                )

    # -- memory -----------------------------------------------------------------------------
    def remember(self, items: Sequence[MemoryItem], limit: int | None = None) -> None:
        """Keep taught lessons. The same prompt taught with the same feedback again is one item
        (its example, request and time are the newest); beyond `limit` items per adapter the
        oldest are forgotten."""
        if not items:
            return
        with self._transaction() as db:
            for item in items:
                db.execute(
                    "INSERT INTO memory (id, lora_id, lesson_hash, feedback_id, messages, "
                    "prompt_tokens, prompt_format, feedback, example, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (lora_id, lesson_hash) DO UPDATE SET "
                    "feedback_id = excluded.feedback_id, example = excluded.example, "
                    "created_at = excluded.created_at",
                    (
                        item.id,
                        validate_lora_id(item.lora_id),
                        text_hash(lesson_key(item.prompt_format, item.messages, item.feedback)),
                        item.feedback_id,
                        json.dumps(item.messages),
                        json.dumps(item.prompt_tokens),
                        item.prompt_format,
                        item.feedback,
                        item.example,
                        item.created_at,
                    ),
                )
            if limit is not None:
                for lora_id in {item.lora_id for item in items}:
                    db.execute(
                        "DELETE FROM memory WHERE lora_id = ? AND id NOT IN (SELECT id FROM "
                        "memory WHERE lora_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?)",
                        (lora_id, lora_id, limit),
                    )

    def memory(self, lora_id: str, limit: int = -1, offset: int = 0) -> list[MemoryItem]:
        """The adapter's memory, newest first (`limit` -1: all of it)."""
        validate_lora_id(lora_id)
        rows = self._all(
            "SELECT * FROM memory WHERE lora_id = ? ORDER BY created_at DESC, rowid DESC "
            "LIMIT ? OFFSET ?",
            (lora_id, limit, offset),
        )
        return [MemoryItem(**_fields(r)) for r in rows]

    def count_memory(self, lora_id: str) -> int:
        row = self._one("SELECT COUNT(*) FROM memory WHERE lora_id = ?", (lora_id,))
        assert row is not None  # COUNT(*) always returns a row
        return int(row[0])

    def forget(self, lora_id: str, memory_id: str | None = None) -> int:
        """Delete one memory item of the adapter (MemoryNotFound if it has none by that id), or
        with `memory_id` None all of them; returns how many."""
        validate_lora_id(lora_id)
        with self._transaction() as db:
            if memory_id is None:
                return int(db.execute("DELETE FROM memory WHERE lora_id = ?", (lora_id,)).rowcount)
            cursor = db.execute(
                "DELETE FROM memory WHERE lora_id = ? AND id = ?", (lora_id, memory_id)
            )
            if cursor.rowcount == 0:
                raise memory_missing(memory_id)
            return 1

    # -- eval runs --------------------------------------------------------------------------
    def add_eval_run(
        self, lora_id: str, config: dict[str, Any], results: dict[str, Any]
    ) -> EvalRun:
        """Record an eval; `results` must name its `divergence_mode`."""
        validate_lora_id(lora_id)
        if results.get("divergence_mode") not in DIVERGENCE_MODES:
            raise InvalidRequest(
                f"eval results must carry divergence_mode, one of {list(DIVERGENCE_MODES)}; "
                f"got {results.get('divergence_mode')!r}"
            )
        run = EvalRun(
            id=f"eval-{uuid.uuid4().hex}",
            lora_id=lora_id,
            created_at=time.time(),
            config=config,
            results=results,
        )
        with self._transaction() as db:
            self.get_adapter(lora_id)
            db.execute(
                "INSERT INTO eval_runs VALUES (?, ?, ?, ?, ?)",
                (run.id, lora_id, run.created_at, json.dumps(config), json.dumps(results)),
            )
        return run

    def list_eval_runs(self, lora_id: str) -> list[EvalRun]:
        """The adapter's eval runs, oldest first."""
        validate_lora_id(lora_id)
        rows = self._all(
            "SELECT * FROM eval_runs WHERE lora_id = ? ORDER BY created_at, rowid", (lora_id,)
        )
        return [EvalRun(**_fields(r)) for r in rows]

    # -- feedback across adapters (the dashboard, per-owner quotas) --------------------------
    @staticmethod
    def _feedback_filter(
        owner: str | None, lora_id: str | None, statuses: Sequence[FeedbackStatus]
    ) -> tuple[str, list[Any]]:
        """A WHERE clause over feedback rows: the owner's adapters (None: all), one adapter,
        some statuses. substr(), not LIKE, for the same reason as in `list_adapters`."""
        clauses, args = ["1"], []
        if owner is not None:
            clauses.append("substr(lora_id, 1, ?) = ?")
            args += [len(owner) + 1, f"{owner}/"]
        if lora_id is not None:
            clauses.append("lora_id = ?")
            args.append(lora_id)
        if statuses:
            clauses.append(f"status IN ({', '.join('?' for _ in statuses)})")
            args += list(statuses)
        return " AND ".join(clauses), args

    def feedback_page(
        self, owner: str | None, lora_id: str | None = None, limit: int = 25, offset: int = 0
    ) -> list[FeedbackRequest]:
        """Feedback requests of every adapter `owner` reaches (None: all), newest first."""
        where, args = self._feedback_filter(owner, lora_id, ())
        rows = self._all(
            f"SELECT * FROM feedback WHERE {where} ORDER BY created_at DESC, seq DESC "
            "LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return [FeedbackRequest(**_fields(r)) for r in rows]

    def count_feedback(
        self,
        owner: str | None,
        lora_id: str | None = None,
        statuses: Sequence[FeedbackStatus] = (),
    ) -> int:
        """How many requests `feedback_page` would page through (only `statuses`, if given)."""
        where, args = self._feedback_filter(owner, lora_id, statuses)
        row = self._one(f"SELECT COUNT(*) FROM feedback WHERE {where}", args)
        assert row is not None  # COUNT(*) always returns a row
        return int(row[0])

    def rollouts_by_id(self, ids: Sequence[str]) -> dict[str, Rollout]:
        """The rollouts still stored under `ids`, expired or not: what a feedback request was
        about stays readable until the start-up purge deletes it."""
        wanted = _as_ids(ids)
        if not wanted:
            return {}
        marks = ", ".join("?" for _ in wanted)
        rows = self._all(f"SELECT * FROM rollouts WHERE id IN ({marks})", wanted)
        return {str(r["id"]): Rollout(**_fields(r)) for r in rows}
