"""Notices between processes that share a PostgreSQL database (LISTEN/NOTIFY).

A write that queues feedback sends `NOTICE_QUEUED` (workers look for work at once) and one that
finishes a request sends `NOTICE_FINISHED` (waiters re-read its status), on the channel
`CHANNEL`, when its transaction commits. SQLite has no notices: there the other processes poll.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sqlalchemy import Connection, func, select
from sqlalchemy.engine import make_url

from claas.store.database import Database

# PostgreSQL's notice channel, and what its notices say: feedback was queued (workers look for
# work), a request finished (waiters re-read their status).
CHANNEL = "claas_feedback"
NOTICE_QUEUED = "queued"
NOTICE_FINISHED = "finished"


def notify(db: Connection, notice: str) -> None:
    """Tell every listening process, when this transaction commits (PostgreSQL only; on
    SQLite the other processes poll)."""
    if db.dialect.name == "postgresql":
        db.execute(select(func.pg_notify(CHANNEL, notice)))


class Notices(Database):
    """The part of `Store` that listens for other processes' notices."""

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
