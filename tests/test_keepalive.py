"""Kept-alive connections to the private Orthanc that Orthanc closes under the intake.

Orthanc closes a connection left idle for 1 s; a request that leaves on it as it closes
gets no answer. The intake sends such a request again at once on a new connection: no
failure counted, no back-off. Proved against the real Orthanc behind
``IdleClosingProxy`` (tests/support/keepalive.py), which makes every reuse of a
connection idle for 1 s meet the close, as a request crossing Orthanc's close does.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from app.db.models import State, Upload, utcnow
from app.forwarding.orthanc import OrthancClient
from app.settings import Settings
from tests.conftest import SQLITE_ONLY
from tests.support.intake import IntakeProcess, wait_until
from tests.support.keepalive import Close, IdleClosingProxy
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

pytestmark = pytest.mark.orthanc

# The first back-off is 15 to 30 s (half to all of the base, jittered): a forward
# delivered within DELIVERED_WITHIN of its upload was never backed off.
RETRY_BASE_SECONDS = "30"
DELIVERED_WITHIN = 5.0
# Far longer than the proxy's 1 s, so the intake keeps connections Orthanc has closed.
KEEPALIVE_PAST_THE_CLOSE = "30"
RESENT = "again on a new one"  # what the intake logs when it resends


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The test's database, to read the intake's rows (the intake writes them)."""
    made = create_engine(database_url)
    yield made
    made.dispose()


def _row(engine: Engine, receipt: str) -> Upload | None:
    with Session(engine) as session:
        return session.scalars(select(Upload).where(Upload.receipt == receipt)).first()


def _forwarded(engine: Engine, receipt: str) -> Upload:
    """The upload's row once forwarded; well before the first back-off would end."""

    def done() -> Upload | None:
        row = _row(engine, receipt)
        return row if row is not None and row.state == State.FORWARDED else None

    found: Upload = wait_until(done, timeout=10)
    return found


def _retries(intake: IntakeProcess) -> dict[str, float]:
    """The intake's ``intake_forwards_total{result="retry"}`` samples, by reason."""
    response = httpx.get(f"{intake.admin_url}/metrics", timeout=30)
    response.raise_for_status()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "intake_forwards_total" and sample.labels.get("result") == "retry"
    }


def _closed_idle(proxy: IdleClosingProxy) -> None:
    """Until every connection the intake opened has been idle past the proxy's close: the
    next request on a kept connection meets the close."""
    wait_until(lambda: (c := proxy.counts()).connections and not c.live, timeout=10, interval=0.05)


async def _until_closed_idle(proxy: IdleClosingProxy) -> None:
    """``_closed_idle`` for a test that runs the client in its own event loop."""
    deadline = time.monotonic() + 10
    while (c := proxy.counts()).live or not c.connections:
        assert time.monotonic() < deadline, f"not closed idle: {c}"
        await asyncio.sleep(0.05)


def _behind(
    make_intake: Callable[..., IntakeProcess], orthanc: OrthancProcess, proxy: IdleClosingProxy
) -> IntakeProcess:
    """An intake whose Orthanc is behind ``proxy``, keeping connections past its idle
    close, with a first back-off long enough to tell a resend from a retry."""
    intake: IntakeProcess = make_intake(
        orthanc,
        orthanc_url=proxy.url,
        orthanc_keepalive_seconds=KEEPALIVE_PAST_THE_CLOSE,
        forward_retry_base_seconds=RETRY_BASE_SECONDS,
        forward_retry_max_seconds="60",
    )
    return intake


@pytest.mark.parametrize("close", ["fin", "reset"])
def test_a_forward_that_meets_a_closed_connection_is_sent_again_at_once(
    make_intake: Callable[..., IntakeProcess],
    private_orthanc: OrthancProcess,
    engine: Engine,
    close: Close,
) -> None:
    """Every instance, sent after the intake's connection was closed idle, arrives at once,
    with one attempt and no error, back-off or retry counted."""
    files = make_study(n_series=1, per_series=5)
    with IdleClosingProxy(private_orthanc.port, close=close) as proxy:
        intake = _behind(make_intake, private_orthanc, proxy)
        site = intake.add_site("hospital-keepalive")
        ids, rows = [], []
        for data in files:
            _closed_idle(proxy)
            answer = intake.upload(site, data)
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["ID"])
            receipt = answer.json()["IntakeReceipt"]
            rows.append(_forwarded(engine, receipt))
        counts = proxy.counts()
    assert set(ids) <= set(private_orthanc.instances())
    for row in rows:
        assert (row.attempts, row.failed_answers, row.reason, row.detail) == (1, 0, None, None)
        assert row.next_attempt_at is None
        assert row.orthanc_status == "Success"  # sent to Orthanc once: the closed one never got it
        assert row.forwarded_at is not None
        assert row.forwarded_at - row.received_at < timedelta(seconds=DELIVERED_WITHIN)
    assert _retries(intake) == {}
    # Exercised: a resend's connection is not kept, so the forward after it opens a new
    # one; the second and the fourth forwards found a kept connection, closed idle.
    assert counts.reused_after_close >= 2
    assert intake.log_text().count(RESENT) == counts.reused_after_close


@SQLITE_ONLY
def test_a_new_connection_that_fails_is_a_real_failure(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, engine: Engine
) -> None:
    """Resent once on a new connection, which fails too: one failed attempt, backed off."""
    first, second = make_study(n_series=1, per_series=2)
    with IdleClosingProxy(private_orthanc.port) as proxy:
        intake = _behind(make_intake, private_orthanc, proxy)
        site = intake.add_site("hospital-keepalive")
        receipt = intake.upload(site, first).json()["IntakeReceipt"]
        _forwarded(engine, receipt)
        _closed_idle(proxy)
        proxy.drop = True  # the resend's new connection ends without an answer too
        receipt = intake.upload(site, second).json()["IntakeReceipt"]
        row = wait_until(lambda: (r := _row(engine, receipt)) and r.attempts and r, timeout=10)
        counts = proxy.counts()
    assert row.state == State.QUEUED
    assert (row.attempts, row.failed_answers, row.reason) == (1, 0, "orthanc_unavailable")
    assert row.next_attempt_at is not None
    assert row.next_attempt_at > utcnow() + timedelta(seconds=10)
    assert (counts.reused_after_close, counts.dropped) == (1, 1)  # resent once, not again
    assert _retries(intake) == {"unreachable": 1.0}


@SQLITE_ONLY
def test_the_intake_lets_idle_connections_go_before_orthanc_closes_them(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, engine: Engine
) -> None:
    """With the default keep-alive (0.5 s), no request ever meets Orthanc's 1 s close."""
    files = make_study(n_series=1, per_series=3)
    with IdleClosingProxy(private_orthanc.port) as proxy:
        intake = make_intake(private_orthanc, orthanc_url=proxy.url)
        site = intake.add_site("hospital-keepalive")
        for data in files:
            _closed_idle(proxy)
            receipt = intake.upload(site, data).json()["IntakeReceipt"]
            _forwarded(engine, receipt)
        counts = proxy.counts()
    assert counts.closed_idle >= len(files)
    assert counts.reused_after_close == 0
    assert RESENT not in intake.log_text()


@SQLITE_ONLY
def test_a_readiness_check_on_a_closed_connection_is_sent_again(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    """Not only forwards: the service's own ``GET /system`` (``/readyz``) is resent too."""
    with IdleClosingProxy(private_orthanc.port) as proxy:
        intake = make_intake(
            private_orthanc,
            orthanc_url=proxy.url,
            orthanc_keepalive_seconds=KEEPALIVE_PAST_THE_CLOSE,
        )
        _closed_idle(proxy)  # the start-up check's connection, kept by the service
        ready = httpx.get(f"{intake.admin_url}/readyz", timeout=30)
        counts = proxy.counts()
    assert ready.status_code == 200, ready.text
    assert counts.reused_after_close == 1


@pytest.mark.parametrize("close", ["fin", "reset"])
def test_every_request_to_orthanc_is_sent_again_after_a_close(
    private_orthanc: OrthancProcess, tmp_path: Path, close: Close
) -> None:
    """In the client, so for every caller: a POST whose body is streamed from disk (over
    8 MiB) is made again for its resend; a GET is resent as well."""
    data = make_study(n_series=1, per_series=1, rows=2048, cols=2048)[0]
    path = tmp_path / "large.dcm"
    path.write_bytes(data)

    async def scenario(proxy: IdleClosingProxy) -> tuple[str, str | None]:
        client = OrthancClient(
            Settings(
                orthanc_url=proxy.url,
                orthanc_username=private_orthanc.username,
                orthanc_password=private_orthanc.password,
                orthanc_keepalive_seconds=float(KEEPALIVE_PAST_THE_CLOSE),
            )
        )
        try:
            await client.system()  # a connection, kept
            await _until_closed_idle(proxy)
            stored = await client.store_instance(path)  # on it, closed: resent
            await client.system()  # a new connection (a resend's is not kept), kept
            await _until_closed_idle(proxy)
            return stored.status, await client.stored_md5(stored.id)  # closed: resent
        finally:
            await client.aclose()

    with IdleClosingProxy(private_orthanc.port, close=close) as proxy:
        status, md5 = asyncio.run(scenario(proxy))
        counts = proxy.counts()
    assert status == "Success"
    assert md5 == hashlib.md5(data, usedforsecurity=False).hexdigest()
    assert counts.reused_after_close == 2
