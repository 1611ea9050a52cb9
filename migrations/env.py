"""Alembic environment for the outbox tables.

The outbox keeps its own version table (outbox_alembic_version), so an
application with an Alembic history of its own can share the database.
"""

from alembic import context
from sqlalchemy import engine_from_config, pool

from worker.backends import backend_for
from worker.db import VERSION_TABLE, normalize_url
from worker.schema import metadata

config = context.config


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=backend_for(connection).alters_tables_by_copy,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = normalize_url(section["sqlalchemy.url"])
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    # One transaction under the migration lock, as `outbox-worker migrate` takes it.
    with engine.begin() as conn:
        backend_for(conn).lock_migrations(conn)
        run_migrations(conn)
