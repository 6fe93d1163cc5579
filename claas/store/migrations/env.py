"""Alembic's entry point: migrate the connection `claas.store.migrate` hands over.

claas never runs the `alembic` command against a URL from a config file: the store opens the
database (SQLite file or PostgreSQL) and passes its connection in `config.attributes`.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
