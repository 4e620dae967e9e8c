"""Sites and access end to end: token lifecycle, address policy, limits and throttling.

Every test runs against a real intake process and talks real HTTP over loopback; a
client picks its source address inside 127.0.0.0/8 (all loopback) to play several sites.

The intakes are shared by the module's tests (one per backend for each set of settings),
so every test makes its own sites and takes its own client addresses (``_new_address``):
the failed-authentication throttle counts per address in the intake's memory, and no
test may meet another's counts or blocks.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.access import tokens
from app.db.models import Site as SiteRow
from app.db.models import Upload, UploadSlot
from tests.conftest import ModuleIntakes
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

MakeIntake = Callable[..., IntakeProcess]

# app/access/gate.py documents that revocation, expiry and policy changes take effect
# within auth_cache_seconds (default 5); MARGIN covers a poll interval and scheduling.
DOCUMENTED_CACHE_SECONDS = 5.0
MARGIN_SECONDS = 1.5
ORTHANC_ERROR_KEYS = {
    "HttpError",
    "HttpStatus",
    "Message",
    "Method",
    "OrthancError",
    "OrthancStatus",
    "Uri",
}
# The peer the proxy intake trusts; no test takes it as a client address of its own.
TRUSTED_PROXY = "127.0.0.4"
FAST_CACHE_SECONDS = "1"

# Client addresses from 127.1.0.1 on: never 127.0.0.1, which a site Orthanc's push and
# any connection without a chosen source come from, nor the trusted proxy.
_ADDRESS_NUMBERS = itertools.count(1)


def _new_address() -> str:
    """A loopback address no other test of this module uses."""
    n = next(_ADDRESS_NUMBERS)
    assert n < 250 * 250, "out of test addresses"
    return f"127.1.{n // 250}.{n % 250 + 1}"


# --- intakes -----------------------------------------------------------------------


@pytest.fixture
def fast_cache_intake(module_intakes: ModuleIntakes) -> IntakeProcess:
    """The module's intake with a 1 s auth cache, for the tests that change a site and
    wait for the change to take effect."""
    return module_intakes(auth_cache_seconds=FAST_CACHE_SECONDS)


@pytest.fixture
def proxy_intake(module_intakes: ModuleIntakes) -> IntakeProcess:
    """The module's intake that trusts TRUSTED_PROXY's X-Forwarded-For."""
    return module_intakes(trusted_proxies=f"{TRUSTED_PROXY}/32")


@pytest.fixture
def source() -> str:
    """This test's own client address (its default source for requests)."""
    return _new_address()


def _new_site(intake: IntakeProcess, name: str) -> Site:
    """A site of this test's own on a shared intake: ``name`` plus a unique suffix."""
    return intake.add_site(f"{name}-{uuid.uuid4().hex[:8]}")


# --- helpers -----------------------------------------------------------------------


def _client(intake: IntakeProcess, site: Site | None, source: str) -> httpx.Client:
    return intake.client(site, transport=httpx.HTTPTransport(local_address=source))


def _upload(
    intake: IntakeProcess,
    site: Site,
    data: bytes | Iterator[bytes],
    source: str,
    **kw: Any,
) -> httpx.Response:
    """POST /instances; an iterator body goes chunked, without Content-Length."""
    with _client(intake, site, source) as client:
        return client.post("/instances", content=data, **kw)


def _post(intake: IntakeProcess, headers: dict[str, str], source: str) -> httpx.Response:
    """A small upload with hand-made headers (the body is never read when auth fails)."""
    with _client(intake, None, source) as client:
        return client.post("/instances", content=b"x", headers=headers)


def _system_status(intake: IntakeProcess, site: Site, source: str) -> int:
    """Authenticate without uploading: GET /system answers 200 only for a usable token."""
    with _client(intake, site, source) as client:
        return client.get("/system").status_code


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _one_instance(rows: int = 64) -> bytes:
    return make_study(n_series=1, per_series=1, rows=rows, cols=rows)[0]


def _sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def _cli_json(intake: IntakeProcess, *args: str) -> Any:
    done = intake.cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _rotate(intake: IntakeProcess, name: str, *options: str) -> Site:
    data = _cli_json(intake, "sites", "rotate", name, *options)
    return Site(data["site"], data["token"], data["orthanc_peer"], data["orthanc_peer_bearer"])


def _policy(intake: IntakeProcess, name: str, *options: str) -> dict[str, Any]:
    policy: dict[str, Any] = _cli_json(intake, "sites", "policy", name, *options)["policy"]
    return policy


def _orthanc_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The body of an error answered in Orthanc's shape with ``status``."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body.keys() >= ORTHANC_ERROR_KEYS
    assert body["HttpStatus"] == status
    return body


def _retry_after(headers: Mapping[str, str]) -> int:
    """Retry-After as the whole number of seconds it must be."""
    value = headers["retry-after"]
    assert value.isdigit(), value
    assert int(value) >= 1
    return int(value)


def _spool_files(intake: IntakeProcess) -> set[Path]:
    return {p for p in intake.spool.rglob("*") if p.is_file()}


@contextlib.contextmanager
def _db(intake: IntakeProcess) -> Iterator[Session]:
    engine = create_engine(intake.database_url)
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


def _rows_with_sop(intake: IntakeProcess, sop_uid: str) -> int:
    with _db(intake) as session:
        count = session.scalar(
            select(func.count(Upload.id)).where(Upload.sop_instance_uid == sop_uid)
        )
    return int(count or 0)


def _upload_slots(intake: IntakeProcess, site: Site) -> int:
    """The site's uploads in progress, as the concurrency limit counts them
    (app/access/quotas.py)."""
    with _db(intake) as session:
        count = session.scalar(
            select(func.count(UploadSlot.id))
            .join(SiteRow, SiteRow.id == UploadSlot.site_id)
            .where(SiteRow.name == site.name)
        )
    return int(count or 0)


def _assert_nothing_stored(intake: IntakeProcess, before: set[Path], data: bytes) -> None:
    """No new file anywhere in the spool and no upload row naming the instance."""
    assert _spool_files(intake) <= before
    assert _rows_with_sop(intake, _sop_uid(data)) == 0


def _away_from_minute_boundary() -> None:
    """Per-minute windows are fixed UTC minutes; start a short burst well inside one."""
    wait_until(lambda: datetime.now(UTC).second < 50, timeout=15)


def _open_upload(
    intake: IntakeProcess,
    site: Site,
    content_length: int,
    first_bytes: bytes = b"",
    *,
    source: str,
) -> socket.socket:
    """A raw upload from ``source`` that sends its headers (and maybe part of the body),
    then stalls."""
    sock = socket.create_connection(
        ("127.0.0.1", intake.public_port), timeout=10, source_address=(source, 0)
    )
    credentials = base64.b64encode(f"{site.name}:{site.token}".encode()).decode()
    head = (
        "POST /instances HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{intake.public_port}\r\n"
        f"Authorization: Basic {credentials}\r\n"
        "Content-Type: application/dicom\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    )
    sock.sendall(head.encode("ascii") + first_bytes)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of the answer on a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-answer"
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


# --- token lifecycle ---------------------------------------------------------------


def test_rotation_keeps_old_token_only_for_the_grace_period(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """After `sites rotate`, old and new tokens both work during the grace, then only the new."""
    intake, old = shared_intake, fresh_site
    assert _upload(intake, old, _one_instance(), source).status_code == 200
    grace_seconds = 5.0
    new = _rotate(intake, old.name, "--grace-days", repr(grace_seconds / 86400))
    rotated = time.monotonic()

    assert _upload(intake, old, _one_instance(), source).status_code == 200
    assert _upload(intake, new, _one_instance(), source).status_code == 200
    assert time.monotonic() - rotated < grace_seconds  # both answers came inside the grace

    wait_until(
        lambda: _system_status(intake, old, source) == 401,
        timeout=grace_seconds + DOCUMENTED_CACHE_SECONDS + MARGIN_SECONDS,
    )
    assert _upload(intake, old, _one_instance(), source).status_code == 401
    assert _upload(intake, new, _one_instance(), source).status_code == 200


def test_revoked_token_is_refused_within_the_cache_time(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """`sites revoke --token PREFIX` refuses that token within 5 s; the other one still works."""
    intake, first = shared_intake, fresh_site  # the default auth cache: the documented worst case
    second = _rotate(intake, first.name)  # the default grace keeps both tokens live
    # Both lookups are now cached, so the revocation has the cache to get past.
    assert _upload(intake, first, _one_instance(), source).status_code == 200
    assert _upload(intake, second, _one_instance(), source).status_code == 200
    prefix = _cli_json(intake, "sites", "show", first.name)["tokens"][0]["prefix"]
    assert first.token.startswith(prefix)

    revoked = _cli_json(intake, "sites", "revoke", first.name, "--token", prefix)
    assert revoked == {"site": first.name, "revoked": 1}
    wait_until(
        lambda: _system_status(intake, first, source) == 401,
        timeout=DOCUMENTED_CACHE_SECONDS + MARGIN_SECONDS,
        interval=0.1,
    )
    assert _upload(intake, first, _one_instance(), source).status_code == 401
    assert _upload(intake, second, _one_instance(), source).status_code == 200


def test_revoke_all_refuses_every_token_of_the_site(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """`sites revoke --all` refuses all of the site's tokens within 5 s."""
    intake, first = shared_intake, fresh_site
    second = _rotate(intake, first.name)
    assert _system_status(intake, first, source) == 200
    assert _system_status(intake, second, source) == 200

    revoked = _cli_json(intake, "sites", "revoke", first.name, "--all")
    assert revoked == {"site": first.name, "revoked": 2}
    wait_until(
        lambda: (
            _system_status(intake, first, source) == _system_status(intake, second, source) == 401
        ),
        timeout=DOCUMENTED_CACHE_SECONDS + MARGIN_SECONDS,
        interval=0.1,
    )


def test_token_expired_by_a_zero_grace_is_refused_at_once(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """`sites rotate --grace-days 0` ends the old token immediately; the new one works."""
    intake, old = shared_intake, fresh_site
    new = _rotate(intake, old.name, "--grace-days", "0")
    assert _upload(intake, old, _one_instance(), source).status_code == 401
    assert _upload(intake, new, _one_instance(), source).status_code == 200


def test_disabled_site_is_refused_until_enabled(
    fast_cache_intake: IntakeProcess, source: str
) -> None:
    """`sites disable` refuses the site's token; `sites enable` accepts it again."""
    intake = fast_cache_intake
    site = _new_site(intake, "pausing")
    assert _upload(intake, site, _one_instance(), source).status_code == 200

    assert _cli_json(intake, "sites", "disable", site.name)["status"] == "disabled"
    wait_until(lambda: _system_status(intake, site, source) == 401, timeout=1 + MARGIN_SECONDS + 1)
    assert _upload(intake, site, _one_instance(), source).status_code == 401

    assert _cli_json(intake, "sites", "enable", site.name)["status"] == "active"
    wait_until(lambda: _system_status(intake, site, source) == 200, timeout=1 + MARGIN_SECONDS + 1)
    assert _upload(intake, site, _one_instance(), source).status_code == 200


def test_deleted_site_is_refused_and_its_uploads_stay_attributed(
    fast_cache_intake: IntakeProcess, source: str
) -> None:
    """`sites delete` refuses the site; its earlier upload rows still name it."""
    intake = fast_cache_intake
    site = _new_site(intake, "retiring")
    answer = _upload(intake, site, _one_instance(), source)
    assert answer.status_code == 200, answer.text
    receipt = answer.json()["IntakeReceipt"]

    assert _cli_json(intake, "sites", "delete", site.name)["status"] == "deleted"
    wait_until(lambda: _system_status(intake, site, source) == 401, timeout=1 + MARGIN_SECONDS + 1)
    assert _upload(intake, site, _one_instance(), source).status_code == 401

    with _db(intake) as session:
        row = session.execute(
            select(SiteRow.name, SiteRow.deleted_at)
            .join(Upload, Upload.site_id == SiteRow.id)
            .where(Upload.receipt == receipt)
        ).one()
        assert row.name == site.name
        assert row.deleted_at is not None


def test_last_use_is_recorded_per_token(shared_intake: IntakeProcess, fresh_site: Site) -> None:
    """After an upload from an address of its own, `sites show` gives the token's
    last_used_at and that IP."""
    intake, site = shared_intake, fresh_site
    elsewhere = _new_address()
    before = datetime.now(UTC).replace(microsecond=0)
    assert _upload(intake, site, _one_instance(), elsewhere).status_code == 200

    def last_use() -> dict[str, Any] | None:
        token: dict[str, Any] = _cli_json(intake, "sites", "show", site.name)["tokens"][0]
        return token if token["last_used_ip"] else None

    token = wait_until(last_use, timeout=15, interval=0.3)
    assert token["last_used_ip"] == elsewhere
    assert datetime.fromisoformat(token["last_used_at"]) >= before


def test_rotated_token_in_a_real_orthanc_peer_pushes(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    private_orthanc: OrthancProcess,
    tmp_path: Path,
) -> None:
    """A site Orthanc configured with the `sites rotate` snippet pushes a study through."""
    intake, site = shared_intake, fresh_site
    assert intake.orthanc is private_orthanc  # what the intake forwards to is checked below
    rotated = _rotate(intake, site.name)
    site_orthanc = OrthancProcess(
        tmp_path / "site-orthanc", name="site", peers={"intake": rotated.peer}
    )
    site_orthanc.start()
    try:
        ids = []
        for data in make_study(n_series=1, per_series=3):
            answer = site_orthanc.upload(data)
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["ID"])
        pushed = site_orthanc.push_to_peer("intake", ids)
    finally:
        site_orthanc.stop()
    assert pushed.status_code == 200, pushed.text
    assert pushed.json().get("FailedInstancesCount", 0) == 0
    wait_until(lambda: set(ids) <= set(private_orthanc.instances()), timeout=60)


# --- address policy ----------------------------------------------------------------


def test_allow_list_refuses_other_addresses_with_403_and_logs_it(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """A valid token from outside the site's CIDRs gets Orthanc's 403 and a security log line."""
    intake, site = shared_intake, fresh_site
    allowed, outside = _new_address(), _new_address()
    assert _policy(intake, site.name, "--allow-cidr", f"{allowed}/32")["allowed_cidrs"] == [
        f"{allowed}/32"
    ]
    assert _upload(intake, site, _one_instance(), allowed).status_code == 200

    refused = _upload(intake, site, _one_instance(), outside)
    body = _orthanc_error(refused, 403)
    assert outside in body["Details"]
    wait_until(
        lambda: any(
            "security:" in line and site.name in line and outside in line
            for line in intake.log_text().splitlines()
        ),
        timeout=5,
    )


def test_cli_accepts_ipv6_cidrs_and_refuses_invalid_ones(make_intake: MakeIntake) -> None:
    """`sites policy --allow-cidr` takes IPv4 and IPv6 networks; a bad one exits 2, unchanged."""
    intake = make_intake(None, start=False)  # the CLI alone: it migrates the database itself
    site = intake.add_site("dual-stack")
    policy = _policy(intake, site.name, "--allow-cidr", "::1/128", "--allow-cidr", "10.1.0.0/16")
    assert policy["allowed_cidrs"] == ["::1/128", "10.1.0.0/16"]

    done = intake.cli("sites", "policy", site.name, "--allow-cidr", "10.0.0.300/8", "--json")
    assert done.returncode == 2
    assert "10.0.0.300/8" in done.stderr
    shown = _cli_json(intake, "sites", "show", site.name)
    assert shown["policy"]["allowed_cidrs"] == ["::1/128", "10.1.0.0/16"]


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(proxy_intake: IntakeProcess) -> None:
    """X-Forwarded-For names the client when the peer is a trusted proxy, and is ignored if not."""
    intake = proxy_intake
    site = _new_site(intake, "proxied")
    allowed, untrusted = _new_address(), _new_address()
    _policy(intake, site.name, "--allow-cidr", f"{allowed}/32")
    forwarded = {"X-Forwarded-For": allowed}

    via_proxy = _upload(intake, site, _one_instance(), TRUSTED_PROXY, headers=forwarded)
    assert via_proxy.status_code == 200, via_proxy.text
    spoofed = _upload(intake, site, _one_instance(), untrusted, headers=forwarded)
    assert untrusted in _orthanc_error(spoofed, 403)["Details"]


def test_forwarded_for_lines_from_a_proxy_are_read_as_one_list(
    proxy_intake: IntakeProcess,
) -> None:
    """A spoofed X-Forwarded-For line ahead of the one a trusted proxy appended is not believed."""
    intake = proxy_intake
    site = _new_site(intake, "proxied-twice")
    allowed, real = _new_address(), _new_address()
    _policy(intake, site.name, "--allow-cidr", f"{allowed}/32")
    # RFC 9110 §5.3: repeated field lines mean the comma-joined list, in order; the
    # client sent the first line, the proxy appended the second naming the real peer.
    spoofed_then_real = [("X-Forwarded-For", allowed), ("X-Forwarded-For", real)]

    answer = _upload(intake, site, _one_instance(), TRUSTED_PROXY, headers=spoofed_then_real)
    assert real in _orthanc_error(answer, 403)["Details"]


# --- limits ------------------------------------------------------------------------


def test_instances_per_minute_refuses_the_next_with_429(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """With --instances-per-minute 2, two uploads pass and the third gets 429, stored nowhere."""
    intake, site = shared_intake, fresh_site
    _policy(intake, site.name, "--instances-per-minute", "2")
    _away_from_minute_boundary()
    assert _upload(intake, site, _one_instance(), source).status_code == 200
    assert _upload(intake, site, _one_instance(), source).status_code == 200
    before = _spool_files(intake)

    third = _one_instance()
    refused = _upload(intake, site, third, source)
    assert "per minute" in _orthanc_error(refused, 429)["Details"]
    assert _retry_after(refused.headers) <= 61
    _assert_nothing_stored(intake, before, third)


def test_bytes_per_day_passes_up_to_the_quota_then_429(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """Uploads filling --bytes-per-day exactly pass; a streamed one past it gets 429, unstored."""
    intake, site = shared_intake, fresh_site
    first, second, third = make_study(n_series=1, per_series=3)
    _policy(intake, site.name, "--bytes-per-day", str(len(first) + len(second)))
    assert _upload(intake, site, first, source).status_code == 200
    assert _upload(intake, site, second, source).status_code == 200  # now exactly at the quota
    before = _spool_files(intake)

    # Chunked, so no Content-Length: the quota is applied once the bytes are in.
    refused = _upload(intake, site, iter([third]), source)
    assert "bytes per day" in _orthanc_error(refused, 429)["Details"]
    _retry_after(refused.headers)
    _assert_nothing_stored(intake, before, third)


def test_declared_length_over_the_day_quota_is_refused_before_the_body(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """A Content-Length over what is left of --bytes-per-day gets 429 without sending a byte."""
    intake, site = shared_intake, fresh_site
    first = _one_instance()
    _policy(intake, site.name, "--bytes-per-day", str(len(first) + 100))
    assert _upload(intake, site, first, source).status_code == 200

    with _open_upload(intake, site, content_length=len(first), source=source) as sock:
        status, headers, body = _read_response(sock)
    assert status == 429
    assert body["HttpStatus"] == 429
    assert "bytes per day" in body["Details"]
    _retry_after(headers)


def test_max_instance_bytes_refuses_larger_instances_with_413(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """--max-instance-bytes admits an instance of exactly that size and refuses bigger with 413."""
    intake, site = shared_intake, fresh_site
    small, large = _one_instance(rows=32), _one_instance(rows=64)
    _policy(intake, site.name, "--max-instance-bytes", str(len(small)))
    assert _upload(intake, site, small, source).status_code == 200
    before = _spool_files(intake)

    _orthanc_error(_upload(intake, site, large, source), 413)  # declared Content-Length
    _orthanc_error(_upload(intake, site, iter([large]), source), 413)
    _assert_nothing_stored(intake, before, large)


def test_concurrent_upload_limit_refuses_a_second_upload(
    shared_intake: IntakeProcess, fresh_site: Site, source: str
) -> None:
    """With --max-concurrent-uploads 1, an upload during another gets 429; afterwards one passes."""
    intake, site = shared_intake, fresh_site
    _policy(intake, site.name, "--max-concurrent-uploads", "1")
    stalled = _one_instance()

    with _open_upload(
        intake, site, content_length=10_000_000, first_bytes=stalled[:4096], source=source
    ):
        # Only once the stalled upload holds its slot is the second one surely the extra.
        wait_until(lambda: _upload_slots(intake, site) == 1, timeout=10)
        refused = _upload(intake, site, _one_instance(), source)
    assert "in progress" in _orthanc_error(refused, 429)["Details"]
    _retry_after(refused.headers)
    wait_until(lambda: _upload_slots(intake, site) == 0, timeout=10)
    assert _upload(intake, site, _one_instance(), source).status_code == 200


# --- content policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "refused_value", "allowed_value", "named"),
    [
        ("--allow-modality", "MR", "CT", "modality CT"),
        ("--allow-sop-class", MRImageStorage, CTImageStorage, CTImageStorage),
    ],
    ids=["modality", "sop-class"],
)
def test_content_allow_list_refuses_other_instances_with_403(
    fast_cache_intake: IntakeProcess,
    source: str,
    option: str,
    refused_value: str,
    allowed_value: str,
    named: str,
) -> None:
    """A CT instance is refused with 403 naming it when only MR is allowed, accepted for CT."""
    intake = fast_cache_intake
    site = _new_site(intake, "ct-only")
    _policy(intake, site.name, option, refused_value)
    body = _orthanc_error(_upload(intake, site, _one_instance(), source), 403)
    assert named in body["Details"]

    _policy(intake, site.name, option, allowed_value)
    wait_until(
        lambda: _upload(intake, site, _one_instance(), source).status_code == 200,
        timeout=1 + MARGIN_SECONDS + 2,
    )


# --- failed-authentication throttling ----------------------------------------------


def _fail_ten_times(intake: IntakeProcess, source: str) -> None:
    for _ in range(10):
        assert _post(intake, _bearer(tokens.new_token()), source).status_code == 401


def test_wrong_tokens_block_the_address_even_for_a_correct_new_token(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """After 10 wrong tokens from one address, its next requests get 429, correct or not."""
    intake, fresh = shared_intake, fresh_site  # it never authenticated from the noisy address
    noisy = _new_address()
    _fail_ten_times(intake, noisy)

    blocked = _post(intake, _bearer(tokens.new_token()), noisy)
    assert "failed authentications" in _orthanc_error(blocked, 429)["Details"]
    _retry_after(blocked.headers)
    correct = _upload(intake, fresh, _one_instance(), noisy)
    _orthanc_error(correct, 429)
    _retry_after(correct.headers)


def test_blocked_address_does_not_lock_out_other_addresses_or_known_tokens(
    shared_intake: IntakeProcess,
) -> None:
    """A site elsewhere, and one that authenticated from the noisy address before, keep working."""
    intake = shared_intake
    elsewhere = _new_site(intake, "elsewhere")
    neighbour = _new_site(intake, "same-nat")
    noisy, other = _new_address(), _new_address()
    assert _upload(intake, neighbour, _one_instance(), noisy).status_code == 200
    _fail_ten_times(intake, noisy)
    assert _post(intake, _bearer(tokens.new_token()), noisy).status_code == 429

    assert _upload(intake, elsewhere, _one_instance(), other).status_code == 200
    assert _upload(intake, neighbour, _one_instance(), noisy).status_code == 200


def test_missing_credentials_do_not_count_as_failures(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """Requests without Authorization get 401 but never block the address."""
    intake, site = shared_intake, fresh_site
    anonymous = _new_address()
    for _ in range(15):
        assert _post(intake, {}, anonymous).status_code == 401
    assert _upload(intake, site, _one_instance(), anonymous).status_code == 200
