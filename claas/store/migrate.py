"""The store's schema migrations: Alembic, run by the store itself when it opens a database.

claas never runs the `alembic` command against a URL from a config file. `migrate` is handed an
open write transaction and brings the database to the newest revision this claas knows
(`head_revision`), or refuses a database that a newer claas has migrated past it. The scripts are
in `claas/store/migrations/`; their `env.py` migrates the connection passed here.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, text

from claas.errors import IncompatibleDatabase

# The last `PRAGMA user_version` of the SQLite schema before Alembic; such a database is adopted
# by migration 0001 (which creates only what is missing) and then upgraded.
LEGACY_SQLITE_VERSION = 2


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("claas.store") / "migrations"))
    return config


def head_revision() -> str:
    """The newest migration this claas knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None  # there are migrations
    return head


def migrate(connection: Connection, where: str) -> None:
    """Bring the database to this claas's schema, or refuse one that is newer.

    `connection` is a write transaction (on SQLite begun IMMEDIATE, so under the write lock);
    on PostgreSQL an advisory lock, held for the migration's transaction (its DDL is
    transactional), makes one process migrate at a time. `where` names the database in errors.
    """
    config = _alembic_config()
    scripts = ScriptDirectory.from_config(config)
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
