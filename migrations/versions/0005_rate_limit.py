"""outbox_rate_limit: the account's rate limit, shared by every daemon on PostgreSQL.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.schema import utcnow

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A new, small table: nothing to rewrite. SQLite gets it too (one schema for
    # both), though a SQLite daemon keeps its limit in process.
    op.create_table(
        "outbox_rate_limit",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("next_slot_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paused_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paused_by", sa.String(200), nullable=True),
        sa.Column("pause_reason", sa.Text(), nullable=True),
        sa.Column("rate_limit", sa.Text(), nullable=True),
        sa.Column("granted", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("grants", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=utcnow()
        ),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Its rows are moments of the last few seconds, worthless after a crash (a
        # grant writes the row anew), so no WAL: a grant's commit waits for no disk
        # flush, and its answer comes back as fast as the statement runs.
        op.execute("ALTER TABLE outbox_rate_limit SET UNLOGGED")


def downgrade() -> None:
    op.drop_table("outbox_rate_limit")
