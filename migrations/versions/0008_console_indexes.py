"""Indexes for the console: one contact's events, one event name's, the last hour's attempts.

ix_outbox_events_contact and ix_outbox_events_event make the events search by
email and by event name read only the matching rows, newest first, however
much history the table keeps; ix_outbox_attempts_attempted_at lets the
overview count the last hour's failed attempts without reading them all.

Built in the migration's transaction: on PostgreSQL, writes to the tables wait
while they are built (about 2 s per million rows each). To build them without
blocking first, run the CREATE INDEX CONCURRENTLY statements in
docs/runbook.md ("Upgrading the schema"): this migration then skips them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.backends.sql import contact_key

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_outbox_events_contact",
        "outbox_events",
        [contact_key(sa.column("email")), "id"],
        if_not_exists=True,
    )
    op.create_index("ix_outbox_events_event", "outbox_events", ["event", "id"], if_not_exists=True)
    op.create_index(
        "ix_outbox_attempts_attempted_at", "outbox_attempts", ["attempted_at"], if_not_exists=True
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_attempts_attempted_at", table_name="outbox_attempts")
    op.drop_index("ix_outbox_events_event", table_name="outbox_events")
    op.drop_index("ix_outbox_events_contact", table_name="outbox_events")
