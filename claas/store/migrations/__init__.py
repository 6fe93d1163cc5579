"""Alembic migrations of the store, for SQLite and PostgreSQL alike (`claas.store.migrate`)."""
