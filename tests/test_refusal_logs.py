"""The refusal log (app/access/refusals.py): a line for each request refused before anything of
it was stored, at a bounded rate; the buckets with a hand-driven clock, then end to end."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.access import sites
from app.access.refusals import EVENT, SUMMARY_EVENT, Rates, Refusal, RefusalLog
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refusal(
    reason: str = "unauthenticated", remote: str = "192.0.2.1", site: str | None = None
) -> Refusal:
    return Refusal(401, reason, "no credentials", "POST", "/instances", site, remote, 12)


def _lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="app.access.refusals")
    return caplog


def test_a_source_writes_its_burst_then_the_rest_is_counted(
    clock: Clock, caplog_info: pytest.LogCaptureFixture
) -> None:
    refusals = RefusalLog(Rates(burst=3, per_second=0.0, summary_seconds=10), clock)
    written = [refusals.write(_refusal()) for _ in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert len(_lines(caplog_info, EVENT)) == 3
    assert not _lines(caplog_info, SUMMARY_EVENT)  # not before its period ends
    clock.now += 10
    refusals.write(_refusal("too_many_failed_logins"))
    (summary,) = _lines(caplog_info, SUMMARY_EVENT)
    assert summary.levelno == logging.WARNING
    assert summary.suppressed == 7  # type: ignore[attr-defined]
    assert summary.reasons == {"unauthenticated": 7}  # type: ignore[attr-defined]
    assert summary.sources == {"192.0.2.1": 7}  # type: ignore[attr-defined]


def test_flush_writes_the_summary_once_and_only_when_something_was_held(
    clock: Clock, caplog_info: pytest.LogCaptureFixture
) -> None:
    refusals = RefusalLog(Rates(burst=1, per_second=0.0), clock)
    refusals.flush()
    refusals.write(_refusal())
    refusals.write(_refusal())
    refusals.flush()
    refusals.flush()
    assert len(_lines(caplog_info, SUMMARY_EVENT)) == 1


def test_a_source_bucket_refills_at_its_rate(
    clock: Clock, caplog_info: pytest.LogCaptureFixture
) -> None:
    refusals = RefusalLog(Rates(burst=2, per_second=1 / 60), clock)
    assert [refusals.write(_refusal()) for _ in range(3)] == [True, True, False]
    clock.now += 59
    assert not refusals.write(_refusal())
    clock.now += 1
    assert refusals.write(_refusal())


def test_a_flooding_source_spends_no_other_source_or_reason(clock: Clock) -> None:
    refusals = RefusalLog(Rates(burst=2, per_second=0.0), clock)
    for _ in range(100):
        refusals.write(_refusal(remote="192.0.2.66"))
    assert refusals.write(_refusal(remote="192.0.2.7"))
    assert refusals.write(_refusal("rate_limited", remote="192.0.2.66"))


def test_the_site_is_the_source_when_known(clock: Clock) -> None:
    """A site's refusals share one bucket from whatever addresses they come."""
    refusals = RefusalLog(Rates(burst=2, per_second=0.0), clock)
    assert refusals.write(_refusal(site="a", remote="192.0.2.1"))
    assert refusals.write(_refusal(site="a", remote="192.0.2.2"))
    assert not refusals.write(_refusal(site="a", remote="192.0.2.3"))
    assert refusals.write(_refusal(site="b", remote="192.0.2.3"))


def test_an_ipv6_client_is_one_source_per_64(clock: Clock) -> None:
    refusals = RefusalLog(Rates(burst=1, per_second=0.0), clock)
    assert refusals.write(_refusal(remote="2001:db8::1"))
    assert not refusals.write(_refusal(remote="2001:db8::ffff"))
    assert refusals.write(_refusal(remote="2001:db8:0:1::1"))


def test_all_sources_together_are_capped(clock: Clock) -> None:
    """Many addresses, each with a full bucket, still write no more than the total's."""
    refusals = RefusalLog(Rates(burst=5, total_burst=20, total_per_second=0.5), clock)
    first = [f"10.0.{i // 250}.{i % 250}" for i in range(5000)]
    assert sum(refusals.write(_refusal(remote=address)) for address in first) == 20
    clock.now += 10
    later = [f"10.1.{i // 250}.{i % 250}" for i in range(500)]
    assert sum(refusals.write(_refusal(remote=address)) for address in later) == 5


def test_the_buckets_kept_are_bounded(clock: Clock) -> None:
    refusals = RefusalLog(Rates(max_sources=100, total_burst=1e9), clock)
    for i in range(1000):
        refusals.write(_refusal(remote=f"10.0.{i // 250}.{i % 250}"))
    assert len(refusals._sources) == 100


def test_a_line_holds_the_fields_escaped_and_cut(
    clock: Clock, caplog_info: pytest.LogCaptureFixture
) -> None:
    refusals = RefusalLog(clock=clock)
    path = "/instances/\x1b[31mred\n2000-01-01 forged" + "x" * 1000
    refusals.write(Refusal(415, "unsupported_encoding", "br\r\n", "POST", path, "a", "::1", 5))
    (line,) = _lines(caplog_info, EVENT)
    fields = vars(line)
    assert fields["status"] == 415
    assert fields["reason"] == "unsupported_encoding"
    assert fields["site"] == "a"
    assert fields["remote_addr"] == "::1"
    assert fields["declared_bytes"] == 5
    assert fields["outcome"] == "refused"
    for value in (fields["path"], fields["detail"], line.getMessage()):
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)
    assert len(fields["path"]) <= 300


def test_a_token_in_the_path_or_detail_is_masked(
    clock: Clock, caplog_info: pytest.LogCaptureFixture
) -> None:
    """A site that pasted its token into the URL gets a 404; the line must not keep it."""
    token = "oit_" + "Ab1" * 16
    refusals = RefusalLog(clock=clock)
    path = f"/{token}/instances"
    detail = f"no resource at {path}"
    refusals.write(Refusal(404, "not_found", detail, "POST", path, None, "::1", 1))
    (line,) = _lines(caplog_info, EVENT)
    assert token not in line.getMessage()
    assert token[:12] not in repr(vars(line))
    assert vars(line)["path"] == "/oit_…/instances"


# --- end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_intake(
    tmp_path_factory: pytest.TempPathFactory, private_orthanc: OrthancProcess
) -> Iterator[IntakeProcess]:
    """One intake on SQLite with JSON logs; each test sends from its own loopback
    address, so its refusals meet buckets (and throttle blocks) of its own."""
    workdir = tmp_path_factory.mktemp("refusal-intake")
    process = IntakeProcess(
        workdir / "intake",
        f"sqlite:///{workdir / 'intake.db'}",
        orthanc=private_orthanc,
        env_extra={
            "INTAKE_LOG_FORMAT": "json",
            "INTAKE_PUBLIC_ALLOWED_HOSTS": "127.0.0.1",
            "INTAKE_AUTH_MAX_FAILURES": "3",
        },
    )
    process.start()
    yield process
    process.kill()


_SOURCES = iter(f"127.0.{i // 250 + 10}.{i % 250 + 2}" for i in range(10_000))


@pytest.fixture
def source() -> str:
    """A loopback address no other test here sends from."""
    return next(_SOURCES)


def _client(intake: IntakeProcess, source: str, site: Site | None = None) -> httpx.Client:
    return intake.client(site, transport=httpx.HTTPTransport(local_address=source))


def _events(intake: IntakeProcess, event: str, **match: Any) -> list[dict[str, Any]]:
    found = []
    for line in intake.log_text().splitlines():
        if line.strip():
            record = json.loads(line)  # every line is JSON
            if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                found.append(record)
    return found


def _one(intake: IntakeProcess, event: str, **match: Any) -> dict[str, Any]:
    (found,) = wait_until(lambda: _events(intake, event, **match), timeout=10)
    return dict(found)


def _site(intake: IntakeProcess, **policy: Any) -> Site:
    site = intake.add_site(f"refused-{uuid.uuid4().hex[:10]}")
    if policy:
        with intake.session() as session:
            sites.set_policy(session, site.name, **policy)
    return site


def test_a_request_without_credentials_is_one_line_with_the_upload_fields(
    json_intake: IntakeProcess, source: str
) -> None:
    with _client(json_intake, source) as client:
        answer = client.post("/instances", content=b"x" * 10, headers={"X-Request-ID": "lost-1"})
    assert answer.status_code == 401
    line = _one(json_intake, EVENT, remote_addr=source)
    assert line["request_id"] == "lost-1"
    assert (line["status"], line["reason"], line["outcome"]) == (401, "unauthenticated", "refused")
    assert (line["method"], line["path"], line["declared_bytes"]) == ("POST", "/instances", 10)
    assert "site" not in line  # not known: none is guessed from the request
    assert line["level"] == "INFO"


def test_a_wrong_token_is_logged_without_the_token_or_the_header(
    json_intake: IntakeProcess, source: str
) -> None:
    site = _site(json_intake)
    wrong = site.token[:-4] + "AAAA"
    header = "Basic " + base64.b64encode(f"{site.name}:{wrong}".encode()).decode()
    with _client(json_intake, source) as client:
        answer = client.post("/instances", content=b"x", headers={"Authorization": header})
    assert answer.status_code == 401
    line = _one(json_intake, EVENT, remote_addr=source)
    assert line["reason"] == "unauthenticated"
    text = json_intake.log_text()
    assert wrong not in text
    assert header.split()[1] not in text


def test_an_expired_token_names_its_site(json_intake: IntakeProcess, source: str) -> None:
    site = _site(json_intake)
    with json_intake.session() as session:
        sites.revoke(session, site.name)
    with _client(json_intake, source, site) as client:
        assert client.post("/instances", content=b"x").status_code == 401
    assert _one(json_intake, EVENT, remote_addr=source)["site"] == site.name


def test_an_address_outside_the_allow_list_names_the_site(
    json_intake: IntakeProcess, source: str
) -> None:
    site = _site(json_intake, allowed_cidrs=["192.0.2.0/24"])
    with _client(json_intake, source, site) as client:
        assert client.post("/instances", content=b"x").status_code == 403
    line = _one(json_intake, EVENT, remote_addr=source)
    assert (line["site"], line["status"], line["reason"]) == (
        site.name,
        403,
        "address_not_allowed",
    )


def test_a_body_over_the_sites_cap_is_refused_from_its_declared_length(
    json_intake: IntakeProcess, source: str
) -> None:
    site = _site(json_intake, max_instance_bytes=1000)
    with _client(json_intake, source, site) as client:
        answer = client.post("/instances", content=b"x" * 5000)
    assert answer.status_code == 413
    line = _one(json_intake, EVENT, remote_addr=source)
    assert (line["site"], line["status"], line["declared_bytes"]) == (site.name, 413, 5000)


def test_an_unsupported_encoding_is_logged(json_intake: IntakeProcess, source: str) -> None:
    site = _site(json_intake)
    with _client(json_intake, source, site) as client:
        answer = client.post("/instances", content=b"x", headers={"Content-Encoding": "br"})
    assert answer.status_code == 415
    line = _one(json_intake, EVENT, remote_addr=source)
    assert (line["site"], line["status"]) == (site.name, 415)


def test_a_blocked_address_is_logged_as_such(json_intake: IntakeProcess, source: str) -> None:
    with _client(json_intake, source) as client:
        auth = {"Authorization": "Bearer oit_not-a-token"}
        answers = [client.post("/instances", content=b"x", headers=auth) for _ in range(4)]
    statuses = [answer.status_code for answer in answers]
    assert statuses == [401, 401, 401, 429]
    line = _one(json_intake, EVENT, remote_addr=source, status=429)
    assert line["reason"] == "too_many_failed_logins"


def test_a_host_outside_the_allow_list_is_logged(json_intake: IntakeProcess, source: str) -> None:
    with _client(json_intake, source) as client:
        answer = client.post("/instances", content=b"x", headers={"Host": "evil.example"})
    assert answer.status_code == 400
    line = _one(json_intake, EVENT, remote_addr=source)
    assert line["reason"] == "host_not_allowed"
    assert line["request_id"] == answer.headers["x-request-id"]


def test_a_stored_then_refused_upload_is_its_upload_event_only(
    json_intake: IntakeProcess, source: str
) -> None:
    site = _site(json_intake)
    with _client(json_intake, source, site) as client:
        assert client.post("/instances", content=b"not dicom").status_code == 400
        good = make_study(n_series=1, per_series=1)[0]
        assert client.post("/instances", content=good).status_code == 200
    assert len(wait_until(lambda: _events(json_intake, "upload", site=site.name), timeout=10)) == 2
    assert not _events(json_intake, EVENT, remote_addr=source)


def test_a_flood_of_unauthenticated_requests_writes_a_bounded_log(
    json_intake: IntakeProcess, source: str
) -> None:
    """5,000 refusals: the source's burst one by one, the rest counted in summaries."""
    before = json_intake.log_path.stat().st_size
    flood = 5000
    with _client(json_intake, source) as client:
        for _ in range(flood):
            assert client.post("/instances", content=b"x").status_code == 401

    def accounted() -> tuple[int, int]:
        summaries = _events(json_intake, SUMMARY_EVENT)
        held = sum(s["sources"].get(source, 0) for s in summaries)
        return len(_events(json_intake, EVENT, remote_addr=source)), held

    wait_until(lambda: sum(accounted()) == flood, timeout=Rates().summary_seconds + 10)
    lines, _held = accounted()
    # The burst, and what the bucket refilled while the flood ran (1 a minute).
    assert Rates().burst <= lines <= Rates().burst + 1
    written = json_intake.log_path.stat().st_size - before
    assert written < 20_000, f"{written} bytes of log for {flood} refusals"


def test_the_json_log_carries_no_colour_codes(json_intake: IntakeProcess) -> None:
    text = json_intake.log_text()
    assert "Uvicorn running" in text or "Started server process" in text
    assert "color_message" not in text
    assert "\x1b" not in text
    assert "\\u001b" not in text
