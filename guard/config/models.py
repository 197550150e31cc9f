"""SQLAlchemy 2 models of Guard's configuration and audit log.

Portable between SQLite and PostgreSQL (no dialect-specific types). Money columns are
``BigInteger`` sub-units (see ``guard.money``); ``None`` limits mean "no limit". Every schema
change goes through an Alembic migration in ``migrations/``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    currency: Mapped[str] = mapped_column(String(3), default="EUR")
    daily_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    concurrent_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    fail_mode: Mapped[str] = mapped_column(String(16), default="deny")
    international_prefix: Mapped[str] = mapped_column(String(8), default="00")
    national_prefix: Mapped[str] = mapped_column(String(8), default="0")
    country_code: Mapped[str] = mapped_column(String(4), default="")
    max_call_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Refused attempts from one IP in the window that block it, and the block's length in
    #: seconds; NULL: the global settings (migration 0002).
    block_threshold: Mapped[int | None] = mapped_column(Integer, nullable=True)
    block_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: GeoIP country list: ``off``, ``allow`` or ``deny`` the comma-separated ISO codes.
    country_mode: Mapped[str] = mapped_column(String(8), default="off", server_default="off")
    countries: Mapped[str] = mapped_column(String(255), default="", server_default="")
    #: ``call`` or ``interval`` (``guard.domain.ReservationMode``), and the seconds an interval
    #: reservation holds at a time (migration 0003).
    reservation_mode: Mapped[str] = mapped_column(String(16), default="call", server_default="call")
    slice_seconds: Mapped[int] = mapped_column(Integer, default=300, server_default="300")
    #: Shadow mode: judge every call, refuse none but the perimeter's when
    #: ``shadow_enforce_perimeter`` (``guard.shadow``, migration 0004).
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    shadow_enforce_perimeter: Mapped[bool] = mapped_column(
        Boolean, default=True, server_default=true()
    )

    extensions: Mapped[list[Extension]] = relationship(
        back_populates="tenant", cascade="all, delete-orphan", passive_deletes=True
    )


class RoutingProfile(Base):
    """A named set of destination classes; ``tenant_id`` NULL makes it global."""

    __tablename__ = "routing_profiles"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True
    )
    name: Mapped[str] = mapped_column(String(64))
    #: Comma-separated ``DestinationClass`` values, validated on write.
    classes: Mapped[str] = mapped_column(String(255), default="")


class Extension(Base):
    __tablename__ = "extensions"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    #: The authenticated endpoint name (PJSIP endpoint / SIP peer), not a caller ID.
    name: Mapped[str] = mapped_column(String(80))
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("routing_profiles.id", ondelete="SET NULL"), nullable=True
    )
    daily_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    concurrent_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ua_mode: Mapped[str] = mapped_column(String(8), default="off")
    ua_value: Mapped[str | None] = mapped_column(String(255), nullable=True)
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    lock_reason: Mapped[str] = mapped_column(String(255), default="")
    locked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: GeoIP country list of the extension, checked besides the tenant's (migration 0002).
    country_mode: Mapped[str] = mapped_column(String(8), default="off", server_default="off")
    countries: Mapped[str] = mapped_column(String(255), default="", server_default="")
    #: Shadow mode for this extension alone (``guard.shadow``, migration 0004).
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    tenant: Mapped[Tenant] = relationship(back_populates="extensions")
    profile: Mapped[RoutingProfile | None] = relationship()


class Network(Base):
    """An allowed source network of a tenant, or of one extension when ``extension_id`` is set."""

    __tablename__ = "networks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    extension_id: Mapped[int | None] = mapped_column(
        ForeignKey("extensions.id", ondelete="CASCADE"), nullable=True
    )
    cidr: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(String(255), default="")


class TimeWindow(Base):
    """A weekly window when outbound calls are allowed (tenant, or one extension)."""

    __tablename__ = "time_windows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    extension_id: Mapped[int | None] = mapped_column(
        ForeignKey("extensions.id", ondelete="CASCADE"), nullable=True
    )
    #: 0 = Monday … 6 = Sunday.
    weekday: Mapped[int] = mapped_column(Integer)
    #: Minutes after local midnight; ``end_minute <= start_minute`` crosses midnight.
    start_minute: Mapped[int] = mapped_column(Integer)
    end_minute: Mapped[int] = mapped_column(Integer)


class RateDeck(Base):
    """A rate deck: the global one (``tenant_id`` NULL, name ``global``) or a tenant's own."""

    __tablename__ = "rate_decks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True, unique=True
    )
    #: A fresh random token written with every change of the deck's rows (``import_rates``):
    #: a snapshot rebuild reuses its previous copy of a deck whose stamp is unchanged. NULL:
    #: unknown (a deck written before migration 0005), read again at every rebuild.
    stamp: Mapped[str | None] = mapped_column(String(32), nullable=True)


class RateRow(Base):
    __tablename__ = "rates"
    __table_args__ = (UniqueConstraint("deck_id", "prefix"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deck_id: Mapped[int] = mapped_column(ForeignKey("rate_decks.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128))
    dest_class: Mapped[str] = mapped_column(String(16))
    rate_per_minute: Mapped[int] = mapped_column(BigInteger)
    connect_fee: Mapped[int] = mapped_column(BigInteger, default=0)
    initial_increment: Mapped[int] = mapped_column(Integer, default=1)
    subsequent_increment: Mapped[int] = mapped_column(Integer, default=1)


class DestinationRuleRow(Base):
    """Blocked prefix/class (``max_rate`` NULL) or a rate cap; global when ``tenant_id`` NULL."""

    __tablename__ = "destination_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True
    )
    prefix: Mapped[str | None] = mapped_column(String(32), nullable=True)
    dest_class: Mapped[str | None] = mapped_column(String(16), nullable=True)
    max_rate: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    note: Mapped[str] = mapped_column(String(255), default="")


class EmergencyNumber(Base):
    """An extra emergency number (the built-in defaults always apply); global when tenant NULL."""

    __tablename__ = "emergency_numbers"
    __table_args__ = (UniqueConstraint("tenant_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True
    )
    number: Mapped[str] = mapped_column(String(16))


class ScannerPattern(Base):
    """An extra SIP-scanner User-Agent fragment (case-insensitive substring)."""

    __tablename__ = "scanner_patterns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pattern: Mapped[str] = mapped_column(String(128), unique=True)


class AuditEvent(Base):
    """Every refusal, lock, block, alert and admin change, as written by the event writer."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"), Index("ix_audit_events_tenant", "tenant"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(48), default="")
    tenant: Mapped[str] = mapped_column(String(64), default="")
    extension: Mapped[str] = mapped_column(String(80), default="")
    source_ip: Mapped[str] = mapped_column(String(64), default="")
    call_id: Mapped[str] = mapped_column(String(64), default="")
    actor: Mapped[str] = mapped_column(String(64), default="")
    #: JSON object with the event's other fields.
    detail: Mapped[str] = mapped_column(Text, default="{}")


class ConfigMeta(Base):
    """Key/value metadata; ``version`` is bumped by every configuration write."""

    __tablename__ = "config_meta"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class IpAllow(Base):
    """A source network never blocked: for every tenant (``tenant_id`` NULL) or for one."""

    __tablename__ = "ip_allow"
    __table_args__ = (UniqueConstraint("tenant_id", "cidr"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True
    )
    cidr: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LimitRaise(Base):
    """A temporary daily limit of a tenant (or of one extension) until ``expires_at``.

    The snapshot applies the raises active when it is built, and is rebuilt when the earliest
    one ends, so a raise lapses by itself.
    """

    __tablename__ = "limit_raises"
    __table_args__ = (Index("ix_limit_raises_expires_at", "expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    extension_id: Mapped[int | None] = mapped_column(
        ForeignKey("extensions.id", ondelete="CASCADE"), nullable=True
    )
    daily_limit: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(String(255), default="")
    actor: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
