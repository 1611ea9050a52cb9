"""outbox_daemons.paused_until: a long pause the endpoint asked for, shown in stats.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: instant on PostgreSQL whatever the table's size.
    op.add_column(
        "outbox_daemons", sa.Column("paused_until", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("outbox_daemons") as batch:
        batch.drop_column("paused_until")
