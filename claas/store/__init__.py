"""The durable state of claas, in SQLite (the embedded default) or PostgreSQL (shared by
API replicas and workers on other machines), through SQLAlchemy Core; Alembic migrates both.

It holds five kinds of record:
- **adapters**: one row per `owner/name`, with its LoRA shape and `current_version`, the version
  that is served and trained from (None until the first version exists);
- **adapter versions**: numbered 1, 2, 3, … per adapter, never reused, each pointing at the
  checkpoint paths of its training state and its sampler weights;
- **rollouts**: what the sampler produced, token for token, with the behavior log-probs that the
  importance ratios of a later training step need;
- **feedback requests**: the durable training queue, with each request's status
  (queued → running → done | failed) in arrival order. A worker *claims* an adapter's oldest
  requests (`claim`): they become `running` under its name with a lease that its heartbeat
  extends; a lease that ends (the worker died) puts them back in the queue (`reclaim`);
- **memory**: what each adapter was taught, one item per prompt and feedback text (the
  conversation up to the answer, its prompt tokens, the feedback and example; never the
  answer), written with the request that taught it and replayed by later requests.

Adapter weights are not here: they live in the checkpoint root. The atomicity rule: a new
version's files are written to a temp dir and renamed into place by the caller *first*; only then
is the version committed here, in one transaction that also moves the adapter's
`current_version`. A crash therefore never leaves "latest" pointing at a half-written version.

Every write is one short transaction. On SQLite it is `BEGIN IMMEDIATE`, which serialises
writers, processes included; on PostgreSQL the rows a decision reads are locked
(`SELECT … FOR UPDATE`, and `SKIP LOCKED` for claims, as job queues on Postgres do). A write
inside another write (on the same thread) joins it. The methods block: callers on an event loop
run them in a thread (`asyncio.to_thread`).

    with Store(Path("~/.local/share/claas/claas.db").expanduser()) as store:  # or a URL:
        # Store("postgresql+psycopg://claas@db/claas")
        store.create_adapter("alice/assistant", "SmolLM2-135M-Instruct", 32, 32.0, ["q_proj"])
        store.add_version("alice/assistant", "local://r/weights/v1", "local://r/sw/v1", None, {})
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from pydantic import BaseModel
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    ResourceClosedError,
    SQLAlchemyError,
)
from sqlalchemy.sql.elements import ColumnElement

from claas.errors import (
    AdapterExists,
    AdapterNotFound,
    ClaimLost,
    Conflict,
    DatabaseUnavailable,
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
    FeedbackRequest,
    FeedbackStatus,
    MemoryItem,
    Rollout,
)
from claas.sdpo.config import lesson_key
from claas.store.tables import adapter_versions, adapters, feedback, memory, rollouts

# The last `PRAGMA user_version` of the SQLite schema before Alembic; such a database is adopted
# by migration 0001 (which creates only what is missing) and then upgraded.
LEGACY_SQLITE_VERSION = 2

_T = TypeVar("_T", bound=BaseModel)

# PostgreSQL's notice channel, and what its notices say: feedback was queued (workers look for
# work), a request finished (waiters re-read their status).
CHANNEL = "claas_feedback"
NOTICE_QUEUED = "queued"
NOTICE_FINISHED = "finished"

__all__ = ["LEGACY_SQLITE_VERSION", "Store", "database_url", "head_revision"]


def database_url(target: Path | str) -> str:
    """A SQLAlchemy URL: `target` as given if it is one (`postgresql+psycopg://…`,
    `sqlite:///…`), else a path to a SQLite file."""
    if isinstance(target, str) and "://" in target:
        return target
    return f"sqlite:///{Path(target)}"


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("claas.store") / "migrations"))
    return config


def head_revision() -> str:
    """The newest migration this claas knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None  # there are migrations
    return head


def _migrate(engine: Engine, where: str) -> None:
    """Bring the database to this claas's schema, or refuse one that is newer.

    One process migrates at a time: on PostgreSQL under an advisory lock held for the
    migration's transaction (its DDL is transactional), on SQLite under the write lock.
    """
    config = _alembic_config()
    scripts = ScriptDirectory.from_config(config)
    with _writing(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(7426353)"))  # 'claas'
        else:
            (legacy,) = connection.execute(text("PRAGMA user_version")).one()
            if legacy > LEGACY_SQLITE_VERSION:
                raise IncompatibleDatabase(
                    f"{where} has schema version {legacy}, newer than this claas knows "
                    f"({LEGACY_SQLITE_VERSION}); upgrade claas, or use another data dir"
                )
        current = MigrationContext.configure(connection).get_current_revision()
        if current is not None:
            try:
                scripts.get_revision(current)
            except CommandError:
                raise IncompatibleDatabase(
                    f"{where} is at schema revision {current!r}, newer than this claas knows "
                    f"(head {scripts.get_current_head()!r}); upgrade claas, or use another "
                    "database"
                ) from None
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _sqlite_engine(url: str) -> Engine:
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
    state = threading.local()

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun below, not by pysqlite
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "foreign_keys=ON",
            "busy_timeout=10000",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # IMMEDIATE for writes: the write lock up front, so what a write reads (max(version),
        # existence) cannot go stale before it writes. Reads begin a deferred transaction.
        connection.exec_driver_sql("BEGIN IMMEDIATE" if state.__dict__.get("write") else "BEGIN")

    engine.info_state = state  # type: ignore[attr-defined]
    return engine


@contextmanager
def _writing(engine: Engine) -> Iterator[None]:
    """The next transaction this thread begins on `engine` is a write: on SQLite it begins
    IMMEDIATE (the write lock up front); elsewhere nothing changes."""
    state = getattr(engine, "info_state", None)
    if state is None:
        yield
        return
    state.write = True
    try:
        yield
    finally:
        state.write = False


def _as_ids(ids: str | Sequence[str]) -> list[str]:
    # A bare string is one id, not a sequence of one-character ids.
    return [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))


def _record(model: type[_T], row: Row[Any]) -> _T:
    """A row as a record: its columns that are fields of `model` (JSON already decoded)."""
    values = row._mapping
    return model(**{name: values[name] for name in model.model_fields if name in values})


class Store:
    """Adapters, versions, rollouts, the feedback queue and memory, in SQLite or PostgreSQL."""

    def __init__(self, target: Path | str) -> None:
        self.url = database_url(target)
        url = make_url(self.url)
        self.backend = url.get_backend_name()
        self.where = url.render_as_string(hide_password=True)  # for messages: no password
        if self.backend == "sqlite":
            self._engine = _sqlite_engine(self.url)
        elif self.backend == "postgresql":
            # pre_ping: a connection the server dropped (a restart) is replaced, not used.
            self._engine = create_engine(self.url, pool_pre_ping=True, pool_size=8)
        else:
            raise InvalidRequest(
                f"unsupported database {self.where!r}: use a SQLite file path or "
                "postgresql+psycopg://user@host/db"
            )
        self._local = threading.local()  # this thread's open write transaction, if any
        self._closed = False
        try:
            _migrate(self._engine, self.where)
        except BaseException:
            self._engine.dispose()
            raise

    def close(self) -> None:
        self._closed = True
        self._engine.dispose()

    def _open(self) -> None:
        if self._closed:
            raise ResourceClosedError(f"the store of {self.where} is closed")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One write transaction, committed at the end or rolled back on an error. Inside
        another one on this thread it joins it: the outer one commits or rolls back both."""
        joined: Connection | None = getattr(self._local, "connection", None)
        if joined is not None:
            yield joined
            return
        self._open()
        with self._unavailable(), _writing(self._engine), self._engine.begin() as connection:
            self._local.connection = connection
            try:
                yield connection
            finally:
                self._local.connection = None

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        joined: Connection | None = getattr(self._local, "connection", None)
        if joined is not None:
            yield joined
            return
        self._open()
        with self._unavailable(), self._engine.connect() as connection:
            yield connection

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """A lost or refused connection (the server restarts, a lock waited too long) is
        `DatabaseUnavailable`: the transaction was rolled back, so retrying is safe."""
        try:
            yield
        except (OperationalError, InterfaceError) as error:
            raise DatabaseUnavailable(
                f"the database {self.where} did not answer ({type(error.orig).__name__}); "
                "nothing was changed: retry in a few seconds",
                headers={"Retry-After": "5"},
            ) from error

    def _one(self, statement: Any) -> Row[Any] | None:
        with self._reading() as connection:
            return connection.execute(statement).first()

    def _all(self, statement: Any) -> list[Row[Any]]:
        with self._reading() as connection:
            return list(connection.execute(statement).all())

    def _count(self, statement: Any) -> int:
        with self._reading() as connection:
            return int(connection.execute(statement).scalar_one())

    def ping(self) -> bool:
        """True when the database answers a query."""
        try:
            return self._one(select(1)) is not None
        except (SQLAlchemyError, DatabaseUnavailable):
            return False

    # -- notices between processes (PostgreSQL LISTEN/NOTIFY) ---------------------------------
    def _notify(self, db: Connection, notice: str) -> None:
        """Tell every listening process, when this transaction commits (PostgreSQL only; on
        SQLite the other processes poll)."""
        if self.backend == "postgresql":
            db.execute(select(func.pg_notify(CHANNEL, notice)))

    def listen(self, on_notice: Callable[[str], None]) -> Callable[[], None] | None:
        """Call `on_notice(NOTICE_QUEUED | NOTICE_FINISHED)`, from a thread of its own, whenever
        any process queues or finishes feedback; returns a function that stops listening. None
        on SQLite, which has no notices: callers poll. The listener reconnects by itself when
        the server restarts, and then sends a notice of each kind, since it may have missed
        some."""
        if self.backend != "postgresql":
            return None
        conninfo = make_url(self.url).set(drivername="postgresql")
        dsn = conninfo.render_as_string(hide_password=False)
        stopped = threading.Event()

        def run() -> None:
            import psycopg

            while not stopped.is_set():
                try:
                    with psycopg.connect(dsn, autocommit=True) as connection:
                        connection.execute(f"LISTEN {CHANNEL}")
                        on_notice(NOTICE_QUEUED)
                        on_notice(NOTICE_FINISHED)
                        while not stopped.is_set():
                            for notice in connection.notifies(timeout=0.5):
                                on_notice(notice.payload)
                except psycopg.Error:
                    stopped.wait(1.0)  # the server is down or restarting: try again

        thread = threading.Thread(target=run, name="claas-listen", daemon=True)
        thread.start()

        def stop() -> None:
            stopped.set()
            thread.join(timeout=5)

        return stop

    def _upsert(self, table: Any) -> Any:
        dialect = postgresql if self.backend == "postgresql" else sqlite
        return dialect.insert(table)

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
                db.execute(insert(adapters).values(**adapter.model_dump()))
        except IntegrityError:
            raise AdapterExists(
                f"adapter {lora_id} already exists; use it, pick another name, or delete it first"
            ) from None
        return adapter

    def get_adapter(self, lora_id: str, *, lock: bool = False) -> Adapter:
        """The adapter; with `lock`, inside a write, its row stays locked until the write ends
        (PostgreSQL; SQLite's write lock covers the whole database already)."""
        validate_lora_id(lora_id)
        query = select(adapters).where(adapters.c.lora_id == lora_id)
        row = self._one(query.with_for_update() if lock else query)
        if row is None:
            raise AdapterNotFound(
                f"adapter {lora_id} does not exist; create it first with POST /v1/adapters "
                "or `claas adapters create`"
            )
        return _record(Adapter, row)

    @staticmethod
    def _prefixed(column: Any, prefix: str) -> ColumnElement[bool]:
        """`column` starts with `prefix`, exactly and case-sensitively: substr(), not LIKE,
        which treats `%`/`_` as wildcards and ignores ASCII case on SQLite (the API scopes an
        API key to `owner/` with this prefix)."""
        return func.substr(column, 1, len(prefix)) == prefix

    def list_adapters(self, prefix: str = "") -> list[Adapter]:
        """Adapters whose lora_id starts with `prefix`."""
        rows = self._all(
            select(adapters)
            .where(self._prefixed(adapters.c.lora_id, prefix))
            .order_by(adapters.c.lora_id)
        )
        return [_record(Adapter, r) for r in rows]

    def count_adapters(self, owner: str) -> int:
        return self._count(
            select(func.count())
            .select_from(adapters)
            .where(self._prefixed(adapters.c.lora_id, f"{owner}/"))
        )

    def delete_adapter(self, lora_id: str) -> list[AdapterVersion]:
        """Delete the adapter with its versions, rollouts, feedback requests and memory.

        Returns the versions removed, so the caller can delete their checkpoint files. Its
        rollouts go too: an adapter re-created under the same name must not train on answers
        the deleted one gave.
        """
        with self._transaction() as db:
            self.get_adapter(lora_id, lock=True)  # raises AdapterNotFound
            versions = self.list_versions(lora_id)
            for table in (rollouts, feedback, memory, adapter_versions, adapters):
                db.execute(delete(table).where(table.c.lora_id == lora_id))
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
        worker: str | None = None,
        claimed: Sequence[str] = (),
        request_metrics: dict[str, Any] | None = None,
        learned: Sequence[MemoryItem] = (),
        memory_limit: int | None = None,
    ) -> AdapterVersion:
        """Register a version whose files are already in place, and make it current.

        The number is max(existing) + 1, so numbers are never reused, even after a rollback.
        `trained_from` is the adapter as it was when training started: if it was rolled back,
        or deleted and re-created, meanwhile, the result is refused (`Conflict`) rather than
        silently undoing that change. With `worker`, the requests `claimed` (the batch: its
        head `feedback_id` and the requests coalesced with it) must all still be claimed by it,
        and they are marked `done` with the new version, their `request_metrics`, and what they
        taught (`learned`, kept as in `remember`) in the same transaction: a worker whose lease
        ran out (another one trains the requests now) is refused (`ClaimLost`), so a request is
        trained into exactly one version, and a request is never seen done without its
        metrics.
        """
        with self._transaction() as db:
            adapter = self.get_adapter(lora_id, lock=True)
            if trained_from is not None and (
                adapter.current_version != trained_from.current_version
                or adapter.created_at != trained_from.created_at
            ):
                raise Conflict(
                    f"adapter {lora_id} changed while this request trained (rolled back, or "
                    "deleted and re-created); its result was discarded. Send the feedback again"
                )
            latest = db.execute(
                select(func.coalesce(func.max(adapter_versions.c.version), 0)).where(
                    adapter_versions.c.lora_id == lora_id
                )
            ).scalar_one()
            version = AdapterVersion(
                lora_id=lora_id,
                version=int(latest) + 1,
                state_path=state_path,
                sampler_path=sampler_path,
                created_at=time.time(),
                feedback_id=feedback_id,
                metrics=metrics,
            )
            db.execute(insert(adapter_versions).values(**version.model_dump()))
            db.execute(
                update(adapters)
                .where(adapters.c.lora_id == lora_id)
                .values(current_version=version.version)
            )
            if worker is not None:
                batch = _as_ids(claimed) or _as_ids(feedback_id or [])
                finished = db.execute(
                    update(feedback)
                    .where(
                        feedback.c.id.in_(batch),
                        feedback.c.status == "running",
                        feedback.c.worker == worker,
                    )
                    .values(
                        status="done",
                        version=version.version,
                        finished_at=version.created_at,
                        metrics=request_metrics or {},
                        error=None,
                        lease_expires_at=None,
                    )
                )
                if finished.rowcount != len(batch):  # the transaction rolls back: no version
                    raise ClaimLost(
                        f"worker {worker} lost its claim on {batch} (its lease ended, and the "
                        "requests went back to the queue); its result was discarded"
                    )
                self.remember(learned, memory_limit)
                self._notify(db, NOTICE_FINISHED)
        return version

    def list_versions(self, lora_id: str) -> list[AdapterVersion]:
        """All versions of the adapter, oldest first."""
        with self._reading():
            self.get_adapter(lora_id)
            rows = self._all(
                select(adapter_versions)
                .where(adapter_versions.c.lora_id == lora_id)
                .order_by(adapter_versions.c.version)
            )
        return [_record(AdapterVersion, r) for r in rows]

    def checkpoint_paths(self) -> set[str]:
        """Every checkpoint path a version references: what a sweep must keep."""
        rows = self._all(select(adapter_versions.c.state_path, adapter_versions.c.sampler_path))
        return {str(row.state_path) for row in rows} | {str(row.sampler_path) for row in rows}

    def get_version(self, lora_id: str, version: int) -> AdapterVersion:
        self.get_adapter(lora_id)
        row = self._one(
            select(adapter_versions).where(
                adapter_versions.c.lora_id == lora_id, adapter_versions.c.version == version
            )
        )
        if row is None:
            existing = [v.version for v in self.list_versions(lora_id)]
            raise VersionNotFound(
                f"adapter {lora_id} has no version {version}; its versions are {existing}"
            )
        return _record(AdapterVersion, row)

    def latest_version(self, lora_id: str) -> AdapterVersion | None:
        """The current version: the one served and trained from (a rollback moves it)."""
        adapter = self.get_adapter(lora_id)
        if adapter.current_version is None:
            return None
        return self.get_version(lora_id, adapter.current_version)

    def rollback(self, lora_id: str, version: int) -> Adapter:
        """Serve and train from an existing `version` again; later versions are kept.

        Lessons last taught by the requests that made later versions are forgotten with them,
        so replay does not teach again what the rollback undid."""
        with self._transaction() as db:
            self.get_adapter(lora_id, lock=True)
            self.get_version(lora_id, version)
            later = select(feedback.c.id).join(
                adapter_versions,
                and_(
                    adapter_versions.c.lora_id == feedback.c.lora_id,
                    adapter_versions.c.feedback_id
                    == func.coalesce(feedback.c.coalesced_into, feedback.c.id),
                ),
            )
            later = later.where(feedback.c.lora_id == lora_id, adapter_versions.c.version > version)
            db.execute(
                delete(memory).where(memory.c.lora_id == lora_id, memory.c.feedback_id.in_(later))
            )
            db.execute(
                update(adapters)
                .where(adapters.c.lora_id == lora_id)
                .values(current_version=version)
            )
            return self.get_adapter(lora_id)

    # -- rollouts ---------------------------------------------------------------------------
    def add_rollout(self, rollout: Rollout) -> Rollout:
        """Record a sampled completion; its `id` is the caller's (e.g. "chatcmpl-…")."""
        if rollout.lora_id is not None:
            validate_lora_id(rollout.lora_id)
        try:
            with self._transaction() as db:
                db.execute(insert(rollouts).values(**rollout.model_dump()))
        except IntegrityError:
            raise Conflict(
                f"rollout {rollout.id!r} already exists; give each completion a new id"
            ) from None
        return rollout

    def _unexpired(self) -> ColumnElement[bool]:
        return or_(rollouts.c.expires_at.is_(None), rollouts.c.expires_at > time.time())

    def get_rollout(self, rollout_id: str) -> Rollout:
        """The rollout, unless it expired (`expires_at <= now`) or never existed."""
        row = self._one(select(rollouts).where(rollouts.c.id == rollout_id, self._unexpired()))
        if row is None:
            raise rollout_missing(rollout_id)
        return _record(Rollout, row)

    def find_rollout(self, lora_id: str, prompt_hash: str, response_hash: str) -> Rollout:
        """The newest unexpired rollout of the adapter with these `text_hash`es."""
        validate_lora_id(lora_id)
        row = self._one(
            select(rollouts)
            .where(
                rollouts.c.lora_id == lora_id,
                rollouts.c.prompt_hash == prompt_hash,
                rollouts.c.response_hash == response_hash,
                self._unexpired(),
            )
            .order_by(rollouts.c.created_at.desc(), rollouts.c.id.desc())
            .limit(1)
        )
        if row is None:
            raise RolloutNotFound(
                f"no unexpired rollout of {lora_id} has that prompt and response text (it expired "
                "or never existed); chat again and give feedback on the new completion id"
            )
        return _record(Rollout, row)

    def purge_expired_rollouts(self, now: float | None = None) -> int:
        """Delete rollouts with `expires_at <= now`; returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                delete(rollouts).where(
                    rollouts.c.expires_at.is_not(None),
                    rollouts.c.expires_at <= (time.time() if now is None else now),
                )
            )
            return int(cursor.rowcount)

    def rollouts_by_id(self, ids: Sequence[str]) -> dict[str, Rollout]:
        """The rollouts still stored under `ids`, expired or not: what a feedback request was
        about stays readable until a purge deletes it."""
        wanted = _as_ids(ids)
        if not wanted:
            return {}
        rows = self._all(select(rollouts).where(rollouts.c.id.in_(wanted)))
        return {str(r.id): _record(Rollout, r) for r in rows}

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
            # The adapter's row lock orders its requests: `seq` is taken and committed in
            # turn, so a claim never sees a later request before an earlier one.
            found = db.execute(
                select(adapters.c.lora_id).where(adapters.c.lora_id == lora_id).with_for_update()
            ).first()
            if found is None:
                raise AdapterNotFound(
                    f"adapter {lora_id} does not exist (was it just deleted?); nothing was queued"
                )
            db.execute(insert(feedback).values(**request.model_dump()))
            self._notify(db, NOTICE_QUEUED)
        return request

    def get_feedback(self, feedback_id: str) -> FeedbackRequest:
        row = self._one(select(feedback).where(feedback.c.id == feedback_id))
        if row is None:
            raise feedback_missing(feedback_id)
        return _record(FeedbackRequest, row)

    def _feedback_filter(
        self, owner: str | None, lora_id: str | None, statuses: Sequence[FeedbackStatus]
    ) -> list[ColumnElement[bool]]:
        """Feedback rows of the adapters `owner` reaches (None: all), of one adapter, with
        some statuses (none given: any)."""
        clauses: list[ColumnElement[bool]] = []
        if owner is not None:
            clauses.append(self._prefixed(feedback.c.lora_id, f"{owner}/"))
        if lora_id is not None:
            clauses.append(feedback.c.lora_id == validate_lora_id(lora_id))
        if statuses:
            clauses.append(feedback.c.status.in_(list(statuses)))
        return clauses

    def list_feedback(
        self,
        *,
        owner: str | None = None,
        lora_id: str | None = None,
        statuses: Sequence[FeedbackStatus] = (),
        limit: int = 50,
        offset: int = 0,
    ) -> list[FeedbackRequest]:
        """Feedback requests of every adapter `owner` reaches (None: all), or of one adapter,
        newest (last to arrive) first."""
        rows = self._all(
            select(feedback)
            .where(*self._feedback_filter(owner, lora_id, statuses))
            .order_by(feedback.c.seq.desc())  # arrival order; clocks can go back
            .limit(limit)
            .offset(offset)
        )
        return [_record(FeedbackRequest, r) for r in rows]

    def count_feedback(
        self,
        *,
        owner: str | None = None,
        lora_id: str | None = None,
        statuses: Sequence[FeedbackStatus] = (),
    ) -> int:
        """How many requests `list_feedback` would page through; ("queued",): the queue's
        depth."""
        return self._count(
            select(func.count())
            .select_from(feedback)
            .where(*self._feedback_filter(owner, lora_id, statuses))
        )

    def claim(
        self, worker: str, lease_seconds: float, max_batch: int, lora_id: str | None = None
    ) -> list[FeedbackRequest]:
        """Claim the next batch to train, as `worker`, for `lease_seconds`; [] if none.

        The batch is the oldest queued requests of one adapter, in arrival order, up to
        `max_batch` and only while they share a training config; the adapter is the one whose
        oldest queued request has waited longest among those with nothing running (`lora_id`:
        only that one). They become `running`, claimed by `worker` until the lease ends. Any
        number of workers may claim at once: an adapter another claim holds is skipped, so one
        adapter never trains two batches at a time and its requests run in arrival order.
        """
        now = time.time()
        with self._transaction() as db:
            busy = select(feedback.c.lora_id).where(feedback.c.status == "running")
            first = func.min(feedback.c.seq)
            candidates = db.execute(
                select(feedback.c.lora_id)
                .where(feedback.c.status == "queued", feedback.c.lora_id.not_in(busy))
                .where(feedback.c.lora_id.in_(select(adapters.c.lora_id)))
                .where(*([feedback.c.lora_id == lora_id] if lora_id is not None else []))
                .group_by(feedback.c.lora_id)
                .order_by(first)
                .limit(32)
            ).all()
            for (candidate,) in candidates:
                # Whoever holds the adapter's row is claiming it now: take the next adapter.
                locked = db.execute(
                    select(adapters.c.lora_id)
                    .where(adapters.c.lora_id == candidate)
                    .with_for_update(skip_locked=True)
                ).first()
                if locked is None:
                    continue
                running = db.execute(  # again, under the lock: a claim may have just committed
                    select(func.count())
                    .select_from(feedback)
                    .where(feedback.c.lora_id == candidate, feedback.c.status == "running")
                ).scalar_one()
                if running:
                    continue
                queued = [
                    _record(FeedbackRequest, r)
                    for r in db.execute(
                        select(feedback)
                        .where(feedback.c.lora_id == candidate, feedback.c.status == "queued")
                        .order_by(feedback.c.seq)
                        .limit(max_batch)
                    ).all()
                ]
                batch = [queued[0]]
                for request in queued[1:]:  # a contiguous run with the same config
                    if request.training != batch[0].training:
                        break
                    batch.append(request)
                ids = [r.id for r in batch]
                db.execute(
                    update(feedback)
                    .where(feedback.c.id.in_(ids))
                    .values(
                        status="running",
                        started_at=now,
                        worker=worker,
                        lease_expires_at=now + lease_seconds,
                    )
                )
                return [
                    r.model_copy(update={"status": "running", "started_at": now}) for r in batch
                ]
        return []

    def extend_lease(self, worker: str, ids: Sequence[str], lease_seconds: float) -> int:
        """The heartbeat: `worker`'s claims on `ids` last `lease_seconds` from now; returns how
        many it still held (fewer than asked: the lease ran out and they were reclaimed)."""
        wanted = _as_ids(ids)
        with self._transaction() as db:
            cursor = db.execute(
                update(feedback)
                .where(
                    feedback.c.id.in_(wanted),
                    feedback.c.status == "running",
                    feedback.c.worker == worker,
                )
                .values(lease_expires_at=time.time() + lease_seconds)
            )
            return int(cursor.rowcount)

    def reclaim(self, now: float | None = None, worker: str | None = None) -> int:
        """Requests whose claim ended go back to the queue; returns how many.

        A claim ends when its lease runs out (its worker died or hung), or, with `worker`, when
        it is that worker's (a worker that restarts under its old name). A request left
        `running` without a lease (by a release before leases) counts as ended. Its `seq`
        (arrival order) is unchanged, so it runs before anything newer, and its coalescing is
        undone. A request whose version was already registered (the worker died between
        registering and marking it done) is marked done with that version instead, so it is
        never trained twice.
        """
        now = time.time() if now is None else now
        ended = or_(feedback.c.lease_expires_at.is_(None), feedback.c.lease_expires_at <= now)
        if worker is not None:
            ended = or_(ended, feedback.c.worker == worker)
        leader = func.coalesce(feedback.c.coalesced_into, feedback.c.id)
        registered = (
            select(func.min(adapter_versions.c.version))
            .where(
                adapter_versions.c.lora_id == feedback.c.lora_id,
                adapter_versions.c.feedback_id == leader,
            )
            .scalar_subquery()
        )
        with self._transaction() as db:
            db.execute(
                update(feedback)
                .where(feedback.c.status == "running", ended, registered.is_not(None))
                .values(
                    status="done",
                    finished_at=now,
                    error=None,
                    version=registered,
                    worker=None,
                    lease_expires_at=None,
                )
            )
            cursor = db.execute(
                update(feedback)
                .where(feedback.c.status == "running", ended, registered.is_(None))
                .values(
                    status="queued",
                    started_at=None,
                    coalesced_into=None,
                    worker=None,
                    lease_expires_at=None,
                )
            )
            return int(cursor.rowcount)

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
            db.execute(
                update(feedback).where(feedback.c.id == feedback_id).values(coalesced_into=into)
            )

    def mark_running(
        self,
        ids: str | Sequence[str],
        worker: str | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        """Mark requests running outside `claim`, by `worker` for `lease_seconds` (None: no
        lease, so the next `reclaim` gives them back)."""
        now = time.time()
        lease = None if lease_seconds is None else now + lease_seconds
        self._set_status(ids, "running", started_at=now, worker=worker, lease_expires_at=lease)

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
                finished_at=time.time(),
                version=version,
                metrics=metrics,
                error=None,
                lease_expires_at=None,
            )
            self.remember(learned, memory_limit)

    def mark_failed(
        self,
        ids: str | Sequence[str],
        error: str,
        metrics: dict[str, Any] | None = None,
        worker: str | None = None,
    ) -> None:
        """Fail the requests. With `worker`, only those it still claims: a request whose claim
        ended belongs to whichever worker took it next (`ClaimLost` if none is left)."""
        wanted = _as_ids(ids)
        if worker is not None:
            with self._transaction() as db:
                wanted = list(
                    db.execute(
                        select(feedback.c.id)
                        .where(
                            feedback.c.id.in_(wanted),
                            feedback.c.status == "running",
                            feedback.c.worker == worker,
                        )
                        .with_for_update()
                    ).scalars()
                )
                if not wanted:
                    raise ClaimLost(f"worker {worker} no longer claims {_as_ids(ids)}")
                self._mark_failed(wanted, error, metrics)
            return
        self._mark_failed(wanted, error, metrics)

    def _mark_failed(self, ids: list[str], error: str, metrics: dict[str, Any] | None) -> None:
        self._set_status(
            ids,
            "failed",
            finished_at=time.time(),
            version=None,
            error=error,
            metrics=metrics or {},
            lease_expires_at=None,
        )

    def _set_status(self, ids: str | Sequence[str], status: FeedbackStatus, **values: Any) -> None:
        wanted = _as_ids(ids)
        if not wanted:
            return
        with self._transaction() as db:
            cursor = db.execute(
                update(feedback).where(feedback.c.id.in_(wanted)).values(status=status, **values)
            )
            if status in ("done", "failed"):
                self._notify(db, NOTICE_FINISHED)
            if cursor.rowcount != len(wanted):  # all or nothing: the transaction rolls back
                found = set(
                    db.execute(select(feedback.c.id).where(feedback.c.id.in_(wanted))).scalars()
                )
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
                validate_lora_id(item.lora_id)
                row = item.model_dump() | {
                    "lesson_hash": text_hash(
                        lesson_key(item.prompt_format, item.messages, item.feedback)
                    )
                }
                statement = self._upsert(memory).values(**row)
                db.execute(
                    statement.on_conflict_do_update(
                        index_elements=["lora_id", "lesson_hash"],
                        set_={
                            "feedback_id": statement.excluded.feedback_id,
                            "example": statement.excluded.example,
                            "created_at": statement.excluded.created_at,
                        },
                    )
                )
            if limit is not None:
                for lora_id in {item.lora_id for item in items}:
                    kept = (
                        select(memory.c.id)
                        .where(memory.c.lora_id == lora_id)
                        .order_by(memory.c.created_at.desc(), memory.c.id.desc())
                        .limit(limit)
                    )
                    db.execute(
                        delete(memory).where(memory.c.lora_id == lora_id, memory.c.id.not_in(kept))
                    )

    def memory(self, lora_id: str, limit: int | None = None, offset: int = 0) -> list[MemoryItem]:
        """The adapter's memory, newest first (`limit` None: all of it)."""
        validate_lora_id(lora_id)
        rows = self._all(
            select(memory)
            .where(memory.c.lora_id == lora_id)
            .order_by(memory.c.created_at.desc(), memory.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return [_record(MemoryItem, r) for r in rows]

    def count_memory(self, lora_id: str) -> int:
        return self._count(
            select(func.count()).select_from(memory).where(memory.c.lora_id == lora_id)
        )

    def forget(self, lora_id: str, memory_id: str | None = None) -> int:
        """Delete one memory item of the adapter (MemoryNotFound if it has none by that id), or
        with `memory_id` None all of them; returns how many."""
        validate_lora_id(lora_id)
        condition = memory.c.lora_id == lora_id
        if memory_id is not None:
            condition = and_(condition, memory.c.id == memory_id)
        with self._transaction() as db:
            removed = int(db.execute(delete(memory).where(condition)).rowcount)
        if memory_id is not None and removed == 0:
            raise memory_missing(memory_id)
        return removed

    def tables(self) -> list[str]:
        """The tables in the database (for checks of a migration)."""
        with self._reading() as connection:
            return sorted(inspect(connection).get_table_names())
