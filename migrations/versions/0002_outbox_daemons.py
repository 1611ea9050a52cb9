"""outbox_daemons: which daemons are alive, and whether one has halted delivery.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.backends.sql import utcnow

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox_daemons",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), nullable=False, server_default=utcnow()
        ),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False, server_default=utcnow()),
        sa.Column("halted_reason", sa.Text(), nullable=True),
        sa.Column("delivered", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("outbox_daemons")
