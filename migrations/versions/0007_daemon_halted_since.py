"""outbox_daemons.halted_since: when the daemon's halt began, for the console and stats.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: instant on PostgreSQL; the next heartbeat of a halted daemon fills it.
    op.add_column(
        "outbox_daemons", sa.Column("halted_since", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("outbox_daemons") as batch:
        batch.drop_column("halted_since")
