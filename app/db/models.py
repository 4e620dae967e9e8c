"""Database tables: sites, their token digests, and one intake record per upload."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC-aware values")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_EMPTY_LIST = text("'[]'")

# SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class State(enum.StrEnum):
    """Where an upload stands (ARCHITECTURE.md, "Honest states")."""

    RECEIVED = "received"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    QUEUED = "queued"
    FORWARDED = "forwarded"
    QUARANTINED = "quarantined"
    DISCARDED = "discarded"  # an admin gave up on it, with a reason; its file is gone


# The quarantine reason of an instance held because another site opened its study.
FOREIGN_STUDY = "foreign_study"


class Site(Base):
    """A sender. Deleting one keeps its row (and name) so the intake log stays attributed."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    # Policy (see app/access/policy.py). Empty lists and NULL limits mean "no restriction".
    allowed_cidrs: Mapped[list[str]] = mapped_column(JSON, default=list, server_default=_EMPTY_LIST)
    allowed_modalities: Mapped[list[str]] = mapped_column(
        JSON, default=list, server_default=_EMPTY_LIST
    )
    allowed_sop_classes: Mapped[list[str]] = mapped_column(
        JSON, default=list, server_default=_EMPTY_LIST
    )
    max_instance_bytes: Mapped[int | None] = mapped_column(BigInteger)
    instances_per_minute: Mapped[int | None] = mapped_column(Integer)
    bytes_per_day: Mapped[int | None] = mapped_column(BigInteger)
    max_concurrent_uploads: Mapped[int | None] = mapped_column(Integer)
    # Mutual TLS: SHA-256 of the DER client certificate this site must present (lowercase hex).
    client_cert_sha256: Mapped[str | None] = mapped_column(String(64))

    tokens: Mapped[list[SiteToken]] = relationship(back_populates="site")


class SiteToken(Base):
    """A site credential. Only a SHA-256 digest of the token is kept."""

    __tablename__ = "site_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the token, to recognise it in lists and leak reports.
    display_prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_ip: Mapped[str | None] = mapped_column(String(64))

    site: Mapped[Site] = relationship(back_populates="tokens")


class SiteUsage(Base):
    """Fixed-window counters shared by every intake process (instances/minute, bytes/day)."""

    __tablename__ = "site_usage"

    site_id: Mapped[int] = mapped_column(
        ForeignKey("sites.id", ondelete="CASCADE"), primary_key=True
    )
    window: Mapped[str] = mapped_column(String(8), primary_key=True)  # "minute" | "day"
    window_start: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class UploadSlot(Base):
    """One upload in progress for a site with a concurrency limit; expires if its holder dies."""

    __tablename__ = "upload_slots"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Admin(Base):
    """A person or app allowed on the admin listener; the password is an argon2 hash."""

    __tablename__ = "admins"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class AdminToken(Base):
    """A machine credential for the admin API (e.g. the PHP app); only a digest is kept."""

    __tablename__ = "admin_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("admins.id", ondelete="CASCADE"), index=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WebhookDelivery(Base):
    """One study-arrived event for one webhook URL: pending until delivered or failed."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'failed')", name="state_known"),
        # One event per study state: more instances later make a new event.
        Index(
            "uq_webhook_deliveries_event",
            "site_id",
            "study_instance_uid",
            "instance_count",
            "url",
            unique=True,
        ),
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    study_instance_uid: Mapped[str] = mapped_column(String(256))
    orthanc_study_id: Mapped[str | None] = mapped_column(String(44))
    instance_count: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Upload(Base):
    """One intake record per upload, whatever became of it."""

    __tablename__ = "uploads"
    __table_args__ = (
        CheckConstraint(
            "state IN ('received', 'rejected', 'duplicate', 'queued', 'forwarded', "
            "'quarantined', 'discarded')",
            name="state_known",
        ),
        Index("ix_uploads_due", "state", "next_attempt_at"),
        Index("ix_uploads_site_received", "site_id", "received_at"),
        # The admin API's common queries (app/admin/intake_log.py): newest first with a keyset
        # cursor, by state, by patient, and a site's studies.
        Index("ix_uploads_received", "received_at", "id"),
        Index("ix_uploads_state_received", "state", "received_at"),
        Index("ix_uploads_patient_id", "patient_id"),
        Index("ix_uploads_site_study", "site_id", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    receipt: Mapped[str] = mapped_column(String(32), unique=True)
    # The request that brought the file (app/logs.py): its log lines and the forwarder's.
    request_id: Mapped[str | None] = mapped_column(String(64))
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    byte_size: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))

    sop_class_uid: Mapped[str | None] = mapped_column(String(256))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(256), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(256), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(256), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(256))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    # What the file does that Orthanc takes but the standard does not (docs/VALIDATION.md).
    warnings: Mapped[list[str] | None] = mapped_column(JSON)

    orthanc_instance_id: Mapped[str | None] = mapped_column(String(44), index=True)
    orthanc_series_id: Mapped[str | None] = mapped_column(String(44), index=True)
    orthanc_study_id: Mapped[str | None] = mapped_column(String(44), index=True)
    orthanc_patient_id: Mapped[str | None] = mapped_column(String(44), index=True)

    state: Mapped[State] = mapped_column(String(16), default=State.RECEIVED)
    reason: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    orthanc_status: Mapped[str | None] = mapped_column(String(32))
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("uploads.id"))

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Error answers from Orthanc (5xx); unreachable-Orthanc tries never count here.
    failed_answers: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    forwarded_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    discarded_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    spool_name: Mapped[str | None] = mapped_column(String(64))
    # The node whose spool holds the file (INTAKE_NODE_NAME): only its processes forward it.
    # NULL (rows from before 0005): any node may.
    node: Mapped[str | None] = mapped_column(String(64))

    site: Mapped[Site] = relationship()
