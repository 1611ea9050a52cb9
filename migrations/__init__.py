"""Alembic migrations of the outbox tables (installed as worker.migrations)."""
