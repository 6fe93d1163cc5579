"""The store's connection to its database: the engine, transactions, and the helpers every part
of the store reads and writes with.

`Database` opens SQLite (a file path) or PostgreSQL (a `postgresql+psycopg://` URL), migrates it
(`claas.store.migrate`) and hands the other parts of the store (`claas.store.adapters`,
`queue`, `rollouts`, `memory`, `notify`) their transactions:

- `_transaction()`: one short write transaction, committed at the end or rolled back on an
  error. On SQLite it begins `BEGIN IMMEDIATE` (`writing`), which serialises writers, processes
  included; on PostgreSQL the writes lock the rows their decision reads. A write inside another
  write on the same thread joins it.
- `_reading()`: a read, which inside a write on the same thread reads through it.

A lost or refused connection is `DatabaseUnavailable`: nothing was changed, so retrying is safe.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, Row, create_engine, event, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError, ResourceClosedError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from claas.errors import DatabaseUnavailable, InvalidRequest
from claas.store.migrate import migrate

_T = TypeVar("_T", bound=BaseModel)


def database_url(target: Path | str) -> str:
    """A SQLAlchemy URL: `target` as given if it is one (`postgresql+psycopg://…`,
    `sqlite:///…`), else a path to a SQLite file."""
    if isinstance(target, str) and "://" in target:
        return target
    return f"sqlite:///{Path(target)}"


SQLITE_BUSY_SECONDS = 10.0


def use_wal(cursor: sqlite3.Cursor) -> None:
    """Switch the file to WAL, waiting up to SQLITE_BUSY_SECONDS for another connection.

    Two connections switching a new file at once can deadlock on its lock (each holds SHARED and
    wants EXCLUSIVE); SQLite then answers one with "database is locked" at once, without its busy
    handler. That one tries again: by then the file is in WAL, and the pragma only reads it.
    """
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_engine(url: str) -> Engine:
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_SECONDS}
    )
    state = threading.local()

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun below, not by pysqlite
        cursor = dbapi_connection.cursor()
        use_wal(cursor)
        for pragma in (
            "synchronous=FULL",
            "foreign_keys=ON",
            f"busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}",
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
def writing(engine: Engine) -> Iterator[None]:
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


def as_ids(ids: str | Sequence[str]) -> list[str]:
    """Ids as a list without repeats; a bare string is one id, not a sequence of one-character
    ids."""
    return [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))


def record(model: type[_T], row: Row[Any]) -> _T:
    """A row as a record: its columns that are fields of `model` (JSON already decoded)."""
    values = row._mapping
    return model(**{name: values[name] for name in model.model_fields if name in values})


def starts_with(column: Any, prefix: str) -> ColumnElement[bool]:
    """`column` starts with `prefix`, exactly and case-sensitively: substr(), not LIKE,
    which treats `%`/`_` as wildcards and ignores ASCII case on SQLite (the API scopes an
    API key to `owner/` with this prefix)."""
    return func.substr(column, 1, len(prefix)) == prefix


class Database:
    """An open, migrated database and its transactions; the base of every part of `Store`."""

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
            with writing(self._engine), self._engine.begin() as connection:
                migrate(connection, self.where)
        except BaseException:
            self._engine.dispose()
            raise

    def close(self) -> None:
        self._closed = True
        self._engine.dispose()

    def _open(self) -> None:
        if self._closed:
            raise ResourceClosedError(f"the store of {self.where} is closed")

    def __enter__(self) -> Self:
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
        with self._unavailable(), writing(self._engine), self._engine.begin() as connection:
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

    def tables(self) -> list[str]:
        """The tables in the database (for checks of a migration)."""
        with self._reading() as connection:
            return sorted(inspect(connection).get_table_names())
