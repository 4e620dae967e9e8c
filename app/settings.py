"""The service's configuration: one pydantic-settings class, prefix ``INTAKE_``."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob, with units in its name. Read from ``INTAKE_*`` variables."""

    # hide_input_in_errors: a bad value (say, a URL with a password) never reaches a log.
    model_config = SettingsConfigDict(
        env_prefix="INTAKE_", extra="ignore", hide_input_in_errors=True
    )

    # The private Orthanc. Its credentials live in this object and in orthanc.py only.
    orthanc_url: str = "http://127.0.0.1:8042"
    orthanc_username: str | None = None
    orthanc_password: SecretStr | None = None
    orthanc_timeout_seconds: float = Field(default=60.0, gt=0)

    database_url: str = "sqlite:///./var/intake.db"
    spool_dir: Path = Path("./var/spool")
    # Refuse new uploads (507) before the spool's disk is actually full.
    spool_min_free_bytes: int = Field(default=512 * MiB, ge=0)
    auto_migrate: bool = True  # `serve` brings the schema up to date first

    public_host: str = "0.0.0.0"  # noqa: S104 - the public listener is meant to be reachable
    public_port: int = Field(default=8000, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8001, ge=0, le=65535)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # What sites put in their OrthancPeers "Url"; derived from host/port when unset.
    public_url: str | None = None

    # Upload bounds.
    max_instance_bytes: int = Field(default=2048 * MiB, gt=0)
    # A ZIP archive or multipart/STOW-RS body holds many instances (app/archive.py, parts.py).
    max_request_bytes: int = Field(default=4096 * MiB, gt=0)
    max_files_per_request: int = Field(default=10_000, ge=1)  # ZIP entries, multipart parts
    max_archive_inflated_bytes: int = Field(default=16384 * MiB, gt=0)  # all entries together
    max_archive_ratio: float = Field(default=250.0, gt=1)  # inflated/compressed, per entry
    max_sequence_depth: int = Field(default=16, ge=1)
    max_elements: int = Field(default=200_000, ge=1)
    max_inflated_bytes: int = Field(default=256 * MiB, gt=0)
    body_idle_timeout_seconds: float = Field(default=30.0, gt=0)
    validation_workers: int = Field(default=2, ge=0)  # 0 validates in a thread (tests, tiny hosts)

    # Forwarding.
    forward_concurrency: int = Field(default=4, ge=1)
    forward_retry_base_seconds: float = Field(default=1.0, gt=0)
    forward_retry_max_seconds: float = Field(default=300.0, gt=0)
    forward_max_attempts: int = Field(default=20, ge=1)  # answers from Orthanc that were errors
    forward_lease_seconds: float = Field(default=300.0, gt=0)
    forward_poll_seconds: float = Field(default=2.0, gt=0)
    orphan_grace_seconds: float = Field(default=600.0, ge=0)

    # Access (app/access.py, app/sites.py).
    # CIDRs whose X-Forwarded-For is believed: comma-separated, e.g. "10.0.0.5,fd00::/64".
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    auth_cache_seconds: float = Field(default=5.0, ge=0)  # revocation takes effect within this
    auth_max_failures: int = Field(default=10, ge=1)  # per address per minute, then blocked
    auth_block_seconds: float = Field(default=300.0, gt=0)
    token_touch_seconds: float = Field(
        default=300.0, ge=0
    )  # last_used_at written at most this often
    token_lifetime_days: float = Field(default=365.0, gt=0)
    token_rotation_grace_days: float = Field(default=30.0, ge=0)
    upload_slot_ttl_seconds: float = Field(default=120.0, gt=0)  # renewed while an upload runs

    # Admin listener (app/admins.py).
    admin_allowed_cidrs: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_password_cache_seconds: float = Field(default=60.0, ge=0)

    # Study-arrived webhooks (app/webhooks.py).
    # A study is "quiet" when no instance of it arrived for this long.
    study_quiet_seconds: float = Field(default=300.0, gt=0)
    # Comma-separated http(s) URLs that get a signed POST per quiet, settled study.
    webhook_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_secret: SecretStr | None = None  # HMAC-SHA256 key; required with webhook_urls
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=10, ge=1)
    webhook_retry_base_seconds: float = Field(default=5.0, gt=0)
    webhook_retry_max_seconds: float = Field(default=3600.0, gt=0)
    webhook_poll_seconds: float = Field(default=5.0, gt=0)

    log_level: str = "INFO"

    @field_validator("trusted_proxies", "admin_allowed_cidrs", "webhook_urls", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError("webhook URLs must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _webhooks_are_signed(self) -> Settings:
        if self.webhook_urls and not (
            self.webhook_secret and len(self.webhook_secret.get_secret_value()) >= 16
        ):
            raise ValueError(
                "INTAKE_WEBHOOK_URLS needs INTAKE_WEBHOOK_SECRET (16 characters or more): "
                "receivers check the signature"
            )
        return self

    @field_validator("trusted_proxies", "admin_allowed_cidrs")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(v, strict=False)) for v in value]

    @field_validator("orthanc_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        if "@" in value.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError(
                "put the Orthanc credentials in INTAKE_ORTHANC_USERNAME / "
                "INTAKE_ORTHANC_PASSWORD, not in the URL"
            )
        return value.rstrip("/")

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certfile is not None and self.tls_keyfile is not None

    @property
    def peer_url(self) -> str:
        """The URL a site's Orthanc peer points at (always with a trailing slash)."""
        if self.public_url:
            return self.public_url.rstrip("/") + "/"
        scheme = "https" if self.tls_enabled else "http"
        host = "127.0.0.1" if self.public_host in ("0.0.0.0", "::") else self.public_host  # noqa: S104
        return f"{scheme}://{host}:{self.public_port}/"
