"""Shadow mode: tenants and extensions that Guard judges but never refuses.

Revision ID: 0004
Revises: 0003
Create Date: 2025-03-15

Hand-checked against ``guard/config/models.py``. The new NOT NULL columns carry a server default
(shadow off, perimeter enforced in shadow mode) so that existing tenants and extensions keep
being enforced; portable between SQLite (batch mode rebuilds the table) and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(
            sa.Column("shadow", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column(
                "shadow_enforce_perimeter",
                sa.Boolean(),
                nullable=False,
                server_default=sa.true(),
            )
        )
    with op.batch_alter_table("extensions") as batch:
        batch.add_column(
            sa.Column("shadow", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("extensions") as batch:
        batch.drop_column("shadow")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("shadow_enforce_perimeter")
        batch.drop_column("shadow")
