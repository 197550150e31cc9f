"""Perimeter and warnings: block thresholds, country lists, IP allow-list, temporary raises.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01

Hand-checked against ``guard/config/models.py`` (its naming convention spelled out). New NOT NULL
columns carry a server default so that existing rows get a value; portable between SQLite
(batch mode rebuilds the tables) and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _country_columns() -> list[sa.Column[str]]:
    return [
        sa.Column("country_mode", sa.String(length=8), nullable=False, server_default="off"),
        sa.Column("countries", sa.String(length=255), nullable=False, server_default=""),
    ]


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("block_threshold", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("block_seconds", sa.Integer(), nullable=True))
        for column in _country_columns():
            batch.add_column(column)
    with op.batch_alter_table("extensions") as batch:
        for column in _country_columns():
            batch.add_column(column)
    op.create_table(
        "ip_allow",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("cidr", sa.String(length=64), nullable=False),
        sa.Column("note", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_ip_allow_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_ip_allow"),
        sa.UniqueConstraint("tenant_id", "cidr", name="uq_ip_allow_tenant_id"),
    )
    op.create_table(
        "limit_raises",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("extension_id", sa.Integer(), nullable=True),
        sa.Column("daily_limit", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_limit_raises_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["extension_id"],
            ["extensions.id"],
            name="fk_limit_raises_extension_id_extensions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_limit_raises"),
    )
    op.create_index("ix_limit_raises_expires_at", "limit_raises", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_limit_raises_expires_at", table_name="limit_raises")
    op.drop_table("limit_raises")
    op.drop_table("ip_allow")
    with op.batch_alter_table("extensions") as batch:
        batch.drop_column("countries")
        batch.drop_column("country_mode")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("countries")
        batch.drop_column("country_mode")
        batch.drop_column("block_seconds")
        batch.drop_column("block_threshold")
