"""Interval reservations: a tenant's reservation mode and slice length.

Revision ID: 0003
Revises: 0002
Create Date: 2025-03-01

Hand-checked against ``guard/config/models.py``. The new NOT NULL columns carry a server default
(``call``, 300 s) so that existing tenants keep reserving whole calls; portable between SQLite
(batch mode rebuilds the table) and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(
            sa.Column(
                "reservation_mode", sa.String(length=16), nullable=False, server_default="call"
            )
        )
        batch.add_column(
            sa.Column("slice_seconds", sa.Integer(), nullable=False, server_default="300")
        )


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("slice_seconds")
        batch.drop_column("reservation_mode")
