"""outbox_events.traceparent and tracestate: the W3C trace context of the enqueuing span.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: instant on PostgreSQL whatever the table's size, and
    # every row written before (or by plain SQL without them) delivers as before.
    op.add_column("outbox_events", sa.Column("traceparent", sa.Text(), nullable=True))
    op.add_column("outbox_events", sa.Column("tracestate", sa.Text(), nullable=True))


def downgrade() -> None:
    # In place on both (SQLite 3.35+ drops a column): a batch copy of outbox_events
    # would have to drop and rebuild the dead-letter view that reads it.
    op.drop_column("outbox_events", "tracestate")
    op.drop_column("outbox_events", "traceparent")
