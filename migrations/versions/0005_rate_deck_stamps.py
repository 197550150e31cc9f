"""Rate deck stamps: a snapshot rebuild reuses the decks that did not change.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21

Hand-checked against ``guard/config/models.py``. ``rate_decks.stamp`` is a fresh random token
written with every change of a deck's rows; existing decks get NULL (unknown: read again at
every rebuild until their next import). Portable between SQLite (batch mode rebuilds the table)
and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rate_decks") as batch:
        batch.add_column(sa.Column("stamp", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rate_decks") as batch:
        batch.drop_column("stamp")
