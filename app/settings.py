"""The service's configuration: one pydantic-settings class, prefix ``INTAKE_``.

Every field carries a ``description`` and a documentation group (``_group``);
scripts/config_docs.py turns them into docs/CONFIGURATION.md, and
tests/test_configuration.py keeps the two in step. A new setting needs only those two.
Every ``SecretStr`` field can also be read from the file its ``INTAKE_…_FILE`` names
(Docker and Kubernetes secrets), see app/secret_files.py.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app.secret_files import SecretFiles

MiB = 1024 * 1024

# The folder holding app/ and alembic/: the service always runs from its source tree
# (app/db/migrations.py). Its var/ is where `make run` has always kept its state.
DEFAULT_HOME = Path(__file__).resolve().parent.parent / "var"
ENV_FILE_NAME = "intake.env"
_SQLITE_URL = re.compile(r"(?P<scheme>sqlite(?:\+\w+)?:///)(?P<path>[^?]*)(?P<query>\?.*)?", re.S)


def _variable(environ: Mapping[str, str], name: str) -> str | None:
    """``name`` in ``environ``, in any case, as pydantic-settings reads variables."""
    if name in environ:
        return environ[name]
    return next((v for k, v in environ.items() if k.upper() == name), None)


def home_of(environ: Mapping[str, str]) -> Path:
    """The home folder that ``environ`` names (``INTAKE_HOME``), absolute."""
    named = _variable(environ, "INTAKE_HOME")
    return Path(named).resolve() if named else DEFAULT_HOME


def env_file_of(environ: Mapping[str, str]) -> Path | None:
    """The env file the service and the commands read: ``INTAKE_ENV_FILE`` (which must
    exist; empty for none), else ``intake.env`` in the home folder when it is there."""
    named = _variable(environ, "INTAKE_ENV_FILE")
    if named is not None:
        if not named:
            return None
        path = Path(named).resolve()
        if not path.is_file():
            raise SettingsError(f"INTAKE_ENV_FILE names {str(path)!r}, which is not a file")
        return path
    path = home_of(environ) / ENV_FILE_NAME
    return path if path.is_file() else None


def _anchored_sqlite(url: str, home: Path) -> str:
    """``url`` with a relative SQLite path made absolute under ``home``."""
    match = _SQLITE_URL.fullmatch(url)
    if match is None:
        return url
    path = match["path"]
    if not path or path.startswith(("/", "file:")) or path == ":memory:":
        return url
    return f"{match['scheme']}{home / path}{match['query'] or ''}"


class Group(enum.StrEnum):
    """The sections of docs/CONFIGURATION.md, in the order they appear there."""

    ORTHANC = "Private Orthanc"
    STORAGE = "Database and spool"
    LISTENERS = "Listeners and TLS"
    UPLOADS = "Upload limits"
    FORWARDING = "Forwarding"
    ACCESS = "Site access and tokens"
    ADMIN = "Admin API"
    WEBHOOKS = "Study-arrived webhooks"
    LOGGING = "Logging"


def _group(group: Group) -> JsonDict:
    """The ``json_schema_extra`` that files a field under ``group`` in the documentation."""
    return {"group": group.value}


def group_of(field: FieldInfo) -> Group:
    """The documentation group of a settings field (``LookupError`` when it has none)."""
    extra = field.json_schema_extra
    group = extra.get("group") if isinstance(extra, dict) else None
    if not isinstance(group, str):
        raise LookupError("a settings field needs json_schema_extra=_group(Group.…)")
    return Group(group)


class Settings(BaseSettings):
    """Every knob, with units in its name. Read from ``INTAKE_*`` variables."""

    # hide_input_in_errors: a bad value (say, a URL with a password) never reaches a log.
    model_config = SettingsConfigDict(
        env_prefix="INTAKE_", extra="ignore", hide_input_in_errors=True
    )

    # The private Orthanc. Its credentials live in this object and in orthanc.py only.
    orthanc_url: str = Field(
        default="http://127.0.0.1:8042",
        description="Base URL of the private Orthanc that uploads are forwarded to; a URL "
        "with credentials in it is refused, so that they never reach a log (use "
        "`INTAKE_ORTHANC_USERNAME` and `INTAKE_ORTHANC_PASSWORD`).",
        json_schema_extra=_group(Group.ORTHANC),
    )
    orthanc_username: str | None = Field(
        default=None,
        description="HTTP Basic user name for the private Orthanc, sent only together with "
        "`INTAKE_ORTHANC_PASSWORD`.",
        json_schema_extra=_group(Group.ORTHANC),
    )
    orthanc_password: SecretStr | None = Field(
        default=None,
        description="HTTP Basic password for the private Orthanc; only the forwarder uses "
        "it, and it is never shown to sites or written to a log.",
        json_schema_extra=_group(Group.ORTHANC),
    )
    orthanc_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Seconds one request to the private Orthanc may take (connecting: at "
        "most 10); a request that times out counts as Orthanc being unreachable, and the "
        "delivery is retried later.",
        json_schema_extra=_group(Group.ORTHANC),
    )
    orthanc_keepalive_seconds: float = Field(
        default=0.5,
        ge=0,
        description="Seconds an idle connection to the private Orthanc is kept for the "
        "next request. Orthanc closes one idle for 1 s (measured on 1.10.1; "
        "`KeepAliveTimeout` from 1.11.3 sets it), so keep this below Orthanc's value; a "
        "request that meets a connection Orthanc has closed is sent again at once on a "
        "new one, never counted as a failure. "
        "0 opens a new connection for every request.",
        json_schema_extra=_group(Group.ORTHANC),
    )

    # Where the state and the env file are: env_file_of reads these before the rest.
    home: Path | None = Field(
        default=None,
        description="The service's home folder: a relative SQLite path in "
        "`INTAKE_DATABASE_URL` and a relative `INTAKE_SPOOL_DIR` are taken from it, never "
        "from the current folder, so the service and every command run from anywhere use "
        "the same database; `intake.env` there is read too (`INTAKE_ENV_FILE`). Unset: the "
        "`var` folder of the installation (beside `app/`; in a checkout, the `./var` that "
        "`make run` uses).",
        json_schema_extra=_group(Group.STORAGE),
    )
    env_file: Path | None = Field(
        default=None,
        description="A file of `INTAKE_…=value` lines that the service and every command "
        "read; a variable in the environment wins over the same one in the file, and "
        "`INTAKE_…_FILE` secrets work there too. Unset: `intake.env` in `INTAKE_HOME`, when "
        "it exists; empty: no file. Only the environment can set this (and the "
        "`INTAKE_HOME` that finds `intake.env`).",
        json_schema_extra=_group(Group.STORAGE),
    )
    database_url: str = Field(
        default="sqlite:///intake.db",
        description="SQLAlchemy URL of the database that holds sites, tokens, the intake "
        "log and the forwarding queue: SQLite (a relative path is under `INTAKE_HOME`), or "
        "PostgreSQL as `postgresql+psycopg://user:pass@host/db`. Only `orthanc-intake "
        "migrate` (and `serve`, with `INTAKE_AUTO_MIGRATE`) creates it; the other commands "
        "refuse a database that does not exist.",
        json_schema_extra=_group(Group.STORAGE),
    )
    spool_dir: Path = Field(
        default=Path("spool"),
        description="Directory where received files wait, fsynced, until the private "
        "Orthanc has them; quarantined files stay there for an admin. A relative path is "
        "under `INTAKE_HOME`.",
        json_schema_extra=_group(Group.STORAGE),
    )
    node_name: str = Field(
        default="",
        max_length=64,
        description="This host's name in the shared database (empty: the machine's host "
        "name). Each upload is forwarded from the spool that received it, by the processes "
        "of that node only: processes sharing one spool folder share one node name, hosts "
        "with their own spools have different ones.",
        json_schema_extra=_group(Group.STORAGE),
    )
    # Refuse new uploads (507) before the spool's disk is actually full.
    spool_min_free_bytes: int = Field(
        default=512 * MiB,
        ge=0,
        description="Free bytes the spool's disk must keep: below this, new uploads get "
        "507 with `Retry-After`, before the disk is actually full.",
        json_schema_extra=_group(Group.STORAGE),
    )
    auto_migrate: bool = Field(
        default=True,
        description="Whether `serve` first creates the database schema or brings it up to "
        "date; turn it off when `orthanc-intake migrate` is run separately (`serve` then "
        "refuses a database that is not up to date). The other commands never change the "
        "schema: they ask for `migrate`.",
        json_schema_extra=_group(Group.STORAGE),
    )

    public_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - the public listener is meant to be reachable
        description="Address the public (upload) listener binds to; the default is every "
        "IPv4 interface, since this is the listener sites reach.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    public_port: int = Field(
        default=8000,
        ge=0,
        le=65535,
        description="TCP port of the public listener (0 lets the system pick a free one).",
        json_schema_extra=_group(Group.LISTENERS),
    )
    admin_host: str = Field(
        default="127.0.0.1",
        description="Address the admin listener (admin API, `/healthz`, `/readyz`, "
        "`/metrics`) binds to; keep it on the loopback or a private network.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    admin_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="TCP port of the admin listener, never the public one.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    tls_certfile: Path | None = Field(
        default=None,
        description="PEM certificate (with its chain) for HTTPS on the public listener, "
        "which speaks HTTPS only when this and `INTAKE_TLS_KEYFILE` are both set.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    tls_keyfile: Path | None = Field(
        default=None,
        description="PEM private key of `INTAKE_TLS_CERTFILE`; keep the file readable by "
        "the service's user only.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    tls_client_cafile: Path | None = Field(
        default=None,
        description="PEM bundle of the CA(s) that sign sites' client certificates: turns on "
        "mutual TLS on the public listener (needs `INTAKE_TLS_CERTFILE`). A site bound to a "
        "certificate (`sites policy NAME --client-cert-sha256 …`) must present it as well "
        "as its token.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    tls_client_cert: Literal["required", "optional"] = Field(
        default="required",
        description="With `INTAKE_TLS_CLIENT_CAFILE`: `required` refuses, in the handshake, "
        "every connection without a certificate from that CA; `optional` lets sites that are "
        "not bound to a certificate connect without one.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="The event loop the service runs on: `uvloop` (installed with "
        "`uvicorn[standard]`, as uvicorn itself would choose) or Python's own `asyncio`.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    tls_reload_check_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How often the certificate and key files are checked for a renewal, "
        "which is loaded without a restart (so is one on SIGHUP); a broken pair is logged "
        "and the current certificate kept.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    # What sites put in their OrthancPeers "Url"; derived from host/port when unset.
    public_url: str | None = Field(
        default=None,
        description="The URL sites put in their `OrthancPeers` `Url` (`sites add` prints "
        "it); when unset, it is derived from TLS, `INTAKE_PUBLIC_HOST` (127.0.0.1 for a "
        "wildcard address) and `INTAKE_PUBLIC_PORT`, so set it behind a reverse proxy.",
        json_schema_extra=_group(Group.LISTENERS),
    )

    # Upload bounds.
    max_instance_bytes: int = Field(
        default=2048 * MiB,
        gt=0,
        description="Largest DICOM file, in bytes after gzip inflation, a site may upload; "
        "a larger one gets 413 and nothing is stored (a site's policy may set less).",
        json_schema_extra=_group(Group.UPLOADS),
    )
    # A ZIP archive or multipart/STOW-RS body holds many instances
    # (intake/archive.py, intake/multipart.py).
    max_request_bytes: int = Field(
        default=4096 * MiB,
        gt=0,
        description="Largest ZIP archive or multipart / STOW-RS body, in bytes, compressed "
        "and once inflated; such a request holds many instances.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_files_per_request: int = Field(
        default=10_000,
        ge=1,
        description="Most files in one request: its multipart parts and the entries of "
        "all its ZIP archives together; more gets 413 and nothing of the request is stored.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_archive_inflated_bytes: int = Field(
        default=16384 * MiB,
        gt=0,
        description="Most bytes the entries of a request's ZIP archives may inflate to, all "
        "together, checked before any entry is inflated; more gets 413 `archive_too_large`.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_archive_ratio: float = Field(
        default=250.0,
        gt=1,
        description="Largest inflated / compressed size ratio of one ZIP entry (entries "
        "over 1 MiB inflated); a higher one is a ZIP bomb and the archive gets 413.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_sequence_depth: int = Field(
        default=16,
        ge=1,
        description="Deepest nesting of sequences in a file; deeper gets 400 "
        "`nesting_too_deep`, well before the 48 levels at which Orthanc 1.10.1 crashes.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_elements: int = Field(
        default=200_000,
        ge=1,
        description="Most data elements (nested ones included) in one file, which bounds "
        "the validator's effort; more gets 400 `too_many_elements`.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_inflated_bytes: int = Field(
        default=256 * MiB,
        gt=0,
        description="Most bytes a data set in a Deflated transfer syntax may inflate to; "
        "more gets 400 `inflate_limit`.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    header_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        description="Seconds a client has, from connecting (and from each request's first "
        "byte), to send complete request headers; slower connections are closed (a "
        "slowloris defence uvicorn lacks).",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_header_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="Most bytes of a request's head (request line and header lines); a "
        "longer request target gets 414, a longer head 431, and the connection closes.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_header_count: int = Field(
        default=100,
        ge=8,
        description="Most header lines in one request; more gets 431.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    max_connections: int = Field(
        default=1000,
        ge=8,
        description="Open connections a listener holds at most; past it a new connection "
        "is closed at once, before anything is read. Keep it well under the process's "
        "file limit (`LimitNOFILE`, `ulimit -n`): the spool, the database and the workers "
        "need descriptors too, and the service warns at start-up when it is not.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    max_connections_per_client: int = Field(
        default=32,
        ge=1,
        description="Open connections from one client address at most (an Orthanc peer "
        "uses one, the upload command four, a browser six); past it a new one is closed at "
        "once. `TRUSTED_PROXIES` addresses are exempt: they carry many clients.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    keep_alive_timeout_seconds: float = Field(
        default=75.0,
        gt=0,
        description="Seconds an idle connection stays open between requests (longer than "
        "an Orthanc peer's gap between instances); bytes that start no request do not "
        "extend it.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    send_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Seconds an answer's unsent bytes may stay unread by the client "
        "before the connection is dropped (a client that sends requests but never reads "
        "the answers would otherwise hold the connection and its buffers for ever).",
        json_schema_extra=_group(Group.LISTENERS),
    )
    body_min_rate_bytes_per_second: int = Field(
        default=500,
        ge=0,
        description="After the first `INTAKE_BODY_IDLE_TIMEOUT_SECONDS` of a body, its "
        "average rate must stay at or above this, or it gets 408 (a body trickled just "
        "under the idle timeout is cut too); 0 turns the check off.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    body_idle_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request body may send nothing; a body that stalls longer "
        "gets 408 and nothing of it is stored.",
        json_schema_extra=_group(Group.UPLOADS),
    )
    validation_workers: int = Field(
        default=2,
        ge=0,
        description="Validator processes; 0 validates in a thread of the server instead "
        "(tests, tiny hosts).",
        json_schema_extra=_group(Group.UPLOADS),
    )

    # Forwarding.
    forward_concurrency: int = Field(
        default=4,
        ge=1,
        description="Deliveries to the private Orthanc in flight at once.",
        json_schema_extra=_group(Group.FORWARDING),
    )
    forward_retry_base_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Seconds before the first retry of a failed delivery; the delay "
        "doubles with each attempt, with jitter, up to `INTAKE_FORWARD_RETRY_MAX_SECONDS`.",
        json_schema_extra=_group(Group.FORWARDING),
    )
    forward_retry_max_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Longest delay, in seconds, between two attempts of a delivery.",
        json_schema_extra=_group(Group.FORWARDING),
    )
    forward_max_attempts: int = Field(
        default=20,
        ge=1,
        description="Error answers (5xx) from Orthanc after which an upload is quarantined "
        "for an admin; an unreachable Orthanc does not count and is waited for "
        "indefinitely.",
        json_schema_extra=_group(Group.FORWARDING),
    )
    forward_lease_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a claimed queue row stays claimed (renewed while its delivery "
        "runs), so that the row comes back after this if its process died.",
        json_schema_extra=_group(Group.FORWARDING),
    )
    forward_poll_seconds: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between looks at the queue for due deliveries; a new upload "
        "received by the same service wakes the forwarder at once.",
        json_schema_extra=_group(Group.FORWARDING),
    )
    forwarder_process: bool = Field(
        default=True,
        description="Run the forwarder in a child process of its own, so that receiving "
        "and forwarding each have an interpreter (and a core); the service restarts it if "
        "it dies. `false` runs it in the service's process.",
        json_schema_extra=_group(Group.FORWARDING),
    )
    orphan_grace_seconds: float = Field(
        default=600.0,
        ge=0,
        description="At start-up, a spool file with no database row, or a half-received "
        "one, is removed once older than this many seconds (a younger one may belong to "
        "another process that is still committing it).",
        json_schema_extra=_group(Group.STORAGE),
    )

    # Access (app/access/gate.py, app/access/sites.py).
    # CIDRs whose X-Forwarded-For is believed: comma-separated, e.g. "10.0.0.5,fd00::/64".
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses or CIDRs of reverse proxies whose "
        "`X-Forwarded-For` is believed, e.g. `10.0.0.5,fd00::/64`; from any other "
        "address the header is ignored.",
        json_schema_extra=_group(Group.ACCESS),
    )
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a token lookup is cached: revocation, expiry, disabling and "
        "policy changes take effect within this.",
        json_schema_extra=_group(Group.ACCESS),
    )
    auth_max_failures: int = Field(
        default=10,
        ge=1,
        description="Failed authentications from one address within a minute after which "
        "it is blocked (429), except for tokens that already authenticated from there.",
        json_schema_extra=_group(Group.ACCESS),
    )
    auth_block_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Seconds an address stays blocked after too many failed authentications.",
        json_schema_extra=_group(Group.ACCESS),
    )
    token_touch_seconds: float = Field(
        default=300.0,
        ge=0,
        description="A token's `last_used_at` and `last_used_ip` are written at most once "
        "in this many seconds, sparing the database a write per upload.",
        json_schema_extra=_group(Group.ACCESS),
    )
    shared_studies: bool = Field(
        default=False,
        description="Whether a site may add instances to a study that another site sent "
        "first (the same Orthanc study: PatientID and Study Instance UID). Off, such an "
        "instance is held in quarantine with reason `foreign_study`, for an admin to "
        "release or discard: no site can inject data into another site's study.",
        json_schema_extra=_group(Group.ACCESS),
    )
    token_lifetime_days: float = Field(
        default=365.0,
        gt=0,
        description="Days a new token is valid; after that it is refused.",
        json_schema_extra=_group(Group.ACCESS),
    )
    token_rotation_grace_days: float = Field(
        default=30.0,
        ge=0,
        description="Days a site's older tokens keep working after `sites rotate`, so that "
        "the site can switch its Orthanc configuration without downtime.",
        json_schema_extra=_group(Group.ACCESS),
    )
    upload_slot_ttl_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Seconds a concurrent-upload slot lives unless renewed, which it is "
        "while its upload runs, so the slots of a process that died are freed.",
        json_schema_extra=_group(Group.ACCESS),
    )

    public_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated names the public listener answers to in `Host` "
        "(e.g. `intake.example.org`; `*.example.org` for any subdomain); others get 400. "
        "Empty answers any name; set it in production, so a rebound DNS name cannot "
        "reach the listener.",
        json_schema_extra=_group(Group.LISTENERS),
    )
    admin_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "::1"],
        description="Comma-separated names the admin listener answers to in `Host`; others "
        "get 400, so a page whose DNS name is rebound to 127.0.0.1 cannot reach `/metrics` "
        "or the API. Add the name the PHP app uses if it is not one of the default "
        "loopback names; `*` answers any.",
        json_schema_extra=_group(Group.ADMIN),
    )

    # Admin listener (app/access/admins.py).
    admin_allowed_cidrs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated networks allowed to call the admin API (403 for "
        "others); empty allows any address that reaches the admin listener.",
        json_schema_extra=_group(Group.ADMIN),
    )
    admin_password_cache_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a correct admin password is remembered, so that the argon2 "
        "hash is paid once rather than on every request.",
        json_schema_extra=_group(Group.ADMIN),
    )

    # Study-arrived webhooks (app/webhooks/notifier.py).
    study_quiet_seconds: float = Field(
        default=300.0,
        gt=0,
        description='Seconds without a new instance after which a study is "quiet" '
        "(studies view); a quiet study with nothing of it still queued triggers the "
        "webhooks.",
        json_schema_extra=_group(Group.WEBHOOKS),
    )
    webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated http(s) URLs that each get a signed POST per quiet, "
        "settled study; they need `INTAKE_WEBHOOK_SECRET`.",
        json_schema_extra=_group(Group.WEBHOOKS),
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key, 16 characters or more, that signs every webhook body "
        "(`X-Intake-Signature`); required with `INTAKE_WEBHOOK_URLS`, since receivers "
        "check the signature.",
        json_schema_extra=_group(Group.WEBHOOKS),
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Seconds one webhook delivery attempt may take before it counts as failed.",
        json_schema_extra=_group(Group.WEBHOOKS),
    )
    webhook_max_attempts: int = Field(
        default=10,
        ge=1,
        description="Attempts per webhook delivery; after the last one it is `failed` "
        "(listed by `/api/webhooks/deliveries`).",
        json_schema_extra=_group(Group.WEBHOOKS),
    )
    webhook_retry_base_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Seconds before the first retry of a webhook delivery; the delay "
        "doubles with each attempt, with jitter, up to `INTAKE_WEBHOOK_RETRY_MAX_SECONDS`.",
        json_schema_extra=_group(Group.WEBHOOKS),
    )
    webhook_retry_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Longest delay, in seconds, between two attempts of a webhook delivery.",
        json_schema_extra=_group(Group.WEBHOOKS),
    )
    webhook_poll_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between looks for due webhook deliveries; quiet studies are "
        "looked for every tenth of `INTAKE_STUDY_QUIET_SECONDS`, or this if longer.",
        json_schema_extra=_group(Group.WEBHOOKS),
    )

    log_level: str = Field(
        default="INFO",
        description="Level of the service's log on standard error: `DEBUG`, `INFO`, "
        "`WARNING` or `ERROR` (any case).",
        json_schema_extra=_group(Group.LOGGING),
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`text` for people, `json` for log pipelines: one object per line, with "
        "the request ID on every line and one `upload` event per file (site, UIDs, size, "
        "outcome, latency; never patient names or secrets).",
        json_schema_extra=_group(Group.LOGGING),
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environments = [
            source
            for source in (env_settings, dotenv_settings)
            if isinstance(source, EnvSettingsSource)
        ]
        secret_files = SecretFiles(settings_cls, environments)
        return init_settings, env_settings, dotenv_settings, secret_files, file_secret_settings

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of the service and of every command: the environment, then the env
        file (``INTAKE_ENV_FILE``, or ``intake.env`` in ``INTAKE_HOME``), then defaults."""
        env_file = env_file_of(os.environ if environ is None else environ)
        return cls(_env_file=env_file, env_file=env_file)

    @field_validator("database_url")
    @classmethod
    def _a_database_url(cls, value: str) -> str:
        try:
            make_url(value)
        except ArgumentError:
            raise ValueError("not a SQLAlchemy URL, e.g. sqlite:///intake.db") from None
        return value

    @field_validator("home", "env_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _anchor_storage(self) -> Settings:
        """Relative storage paths are under the home folder, whatever the current folder:
        the processes the service starts get them absolute, already resolved."""
        home = self.home.resolve() if self.home is not None else DEFAULT_HOME
        self.home = home
        self.spool_dir = home / self.spool_dir
        self.database_url = _anchored_sqlite(self.database_url, home)
        return self

    @field_validator(
        "trusted_proxies",
        "admin_allowed_cidrs",
        "webhook_urls",
        "public_allowed_hosts",
        "admin_allowed_hosts",
        mode="before",
    )
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
                "INTAKE_WEBHOOK_URLS needs INTAKE_WEBHOOK_SECRET (or INTAKE_WEBHOOK_SECRET_FILE) "
                "of 16 characters or more: receivers check the signature"
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
                "INTAKE_ORTHANC_PASSWORD (or INTAKE_ORTHANC_PASSWORD_FILE), not in the URL"
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
