"""Figures per transport: the transport of each attempt, and each daemon's requests.

outbox_attempts.transport says which transport a charged attempt went by, so
`events show` lists it. outbox_daemons gains the daemon's transport and what
its requests carried since it started (requests, events sent, the largest
batch, events dead-lettered), written by its heartbeat like `delivered`:
`stats` sums them per transport without a write per request.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DAEMON_FIGURES = ("requests", "events_sent", "largest_batch", "dead")


def upgrade() -> None:
    # Nullable or a constant default: instant on PostgreSQL whatever the tables' size.
    op.add_column("outbox_attempts", sa.Column("transport", sa.String(20), nullable=True))
    op.add_column("outbox_daemons", sa.Column("transport", sa.String(20), nullable=True))
    for name in _DAEMON_FIGURES:
        op.add_column(
            "outbox_daemons",
            sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"),
        )


def downgrade() -> None:
    # In place on both (SQLite 3.35+ drops a column): a batch copy of outbox_attempts
    # would lose its AUTOINCREMENT, and ids must never be given twice.
    for name in reversed(_DAEMON_FIGURES):
        op.drop_column("outbox_daemons", name)
    op.drop_column("outbox_daemons", "transport")
    op.drop_column("outbox_attempts", "transport")
