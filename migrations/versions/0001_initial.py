"""Initial schema: tenants, extensions, routing, rates, rules, audit log and config version.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Hand-checked against ``guard/config/models.py``: the same tables, columns and constraint names
(its naming convention, spelled out because ``op`` tables carry no convention). Portable between
SQLite and PostgreSQL: no dialect types, no server defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tenant_fk(table: str, *, nullable: bool = True) -> list[sa.SchemaItem]:
    """The ``tenant_id`` column and its cascading foreign key, as most tables have them."""
    return [
        sa.Column("tenant_id", sa.Integer(), nullable=nullable),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=f"fk_{table}_tenant_id_tenants", ondelete="CASCADE"
        ),
    ]


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("daily_limit", sa.BigInteger(), nullable=True),
        sa.Column("concurrent_limit", sa.Integer(), nullable=True),
        sa.Column("fail_mode", sa.String(length=16), nullable=False),
        sa.Column("international_prefix", sa.String(length=8), nullable=False),
        sa.Column("national_prefix", sa.String(length=8), nullable=False),
        sa.Column("country_code", sa.String(length=4), nullable=False),
        sa.Column("max_call_seconds", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.create_table(
        "routing_profiles",
        sa.Column("id", sa.Integer(), nullable=False),
        *_tenant_fk("routing_profiles"),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("classes", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_routing_profiles"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_routing_profiles_tenant_id"),
    )
    op.create_table(
        "extensions",
        sa.Column("id", sa.Integer(), nullable=False),
        *_tenant_fk("extensions", nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.Column("daily_limit", sa.BigInteger(), nullable=True),
        sa.Column("concurrent_limit", sa.Integer(), nullable=True),
        sa.Column("ua_mode", sa.String(length=8), nullable=False),
        sa.Column("ua_value", sa.String(length=255), nullable=True),
        sa.Column("locked", sa.Boolean(), nullable=False),
        sa.Column("lock_reason", sa.String(length=255), nullable=False),
        sa.Column("locked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["profile_id"],
            ["routing_profiles.id"],
            name="fk_extensions_profile_id_routing_profiles",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_extensions"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_extensions_tenant_id"),
    )
    op.create_table(
        "networks",
        sa.Column("id", sa.Integer(), nullable=False),
        *_tenant_fk("networks", nullable=False),
        sa.Column("extension_id", sa.Integer(), nullable=True),
        sa.Column("cidr", sa.String(length=64), nullable=False),
        sa.Column("note", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["extension_id"],
            ["extensions.id"],
            name="fk_networks_extension_id_extensions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_networks"),
    )
    op.create_table(
        "time_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        *_tenant_fk("time_windows", nullable=False),
        sa.Column("extension_id", sa.Integer(), nullable=True),
        sa.Column("weekday", sa.Integer(), nullable=False),
        sa.Column("start_minute", sa.Integer(), nullable=False),
        sa.Column("end_minute", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["extension_id"],
            ["extensions.id"],
            name="fk_time_windows_extension_id_extensions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_time_windows"),
    )
    op.create_table(
        "rate_decks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        *_tenant_fk("rate_decks"),
        sa.PrimaryKeyConstraint("id", name="pk_rate_decks"),
        sa.UniqueConstraint("name", name="uq_rate_decks_name"),
        sa.UniqueConstraint("tenant_id", name="uq_rate_decks_tenant_id"),
    )
    op.create_table(
        "rates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deck_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("dest_class", sa.String(length=16), nullable=False),
        sa.Column("rate_per_minute", sa.BigInteger(), nullable=False),
        sa.Column("connect_fee", sa.BigInteger(), nullable=False),
        sa.Column("initial_increment", sa.Integer(), nullable=False),
        sa.Column("subsequent_increment", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["deck_id"], ["rate_decks.id"], name="fk_rates_deck_id_rate_decks", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rates"),
        sa.UniqueConstraint("deck_id", "prefix", name="uq_rates_deck_id"),
    )
    op.create_table(
        "destination_rules",
        sa.Column("id", sa.Integer(), nullable=False),
        *_tenant_fk("destination_rules"),
        sa.Column("prefix", sa.String(length=32), nullable=True),
        sa.Column("dest_class", sa.String(length=16), nullable=True),
        sa.Column("max_rate", sa.BigInteger(), nullable=True),
        sa.Column("note", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_destination_rules"),
    )
    op.create_table(
        "emergency_numbers",
        sa.Column("id", sa.Integer(), nullable=False),
        *_tenant_fk("emergency_numbers"),
        sa.Column("number", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_emergency_numbers"),
        sa.UniqueConstraint("tenant_id", "number", name="uq_emergency_numbers_tenant_id"),
    )
    op.create_table(
        "scanner_patterns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pattern", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scanner_patterns"),
        sa.UniqueConstraint("pattern", name="uq_scanner_patterns_pattern"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=48), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("extension", sa.String(length=80), nullable=False),
        sa.Column("source_ip", sa.String(length=64), nullable=False),
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_tenant", "audit_events", ["tenant"])
    config_meta = op.create_table(
        "config_meta",
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_config_meta"),
    )
    op.bulk_insert(config_meta, [{"key": "version", "value": 0}])


def downgrade() -> None:
    op.drop_table("config_meta")
    op.drop_index("ix_audit_events_tenant", table_name="audit_events")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    for table in (
        "audit_events",
        "scanner_patterns",
        "emergency_numbers",
        "destination_rules",
        "rates",
        "rate_decks",
        "time_windows",
        "networks",
        "extensions",
        "routing_profiles",
        "tenants",
    ):
        op.drop_table(table)
