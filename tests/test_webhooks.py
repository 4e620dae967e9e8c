"""Study-arrived webhooks against a real receiver on loopback: signing, retries, the admin API.

One receiver and one intake per backend serve the whole module; each test has a site of
its own, and looks only at that site's requests and deliveries (and fails only those)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.uid import generate_uid

from app.settings import Settings
from tests.conftest import ModuleIntakes
from tests.support.intake import Admin, IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

SECRET = "a webhook secret of some length"


@dataclass
class Delivered:
    site: str  # the body's "site": whose test this request belongs to
    headers: dict[str, str]
    body: bytes


def _site_of(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    return str(payload.get("site", "")) if isinstance(payload, dict) else ""


@dataclass
class Receiver:
    """A tiny HTTP server that records every POST and, per site, fails the first
    ``fail_first[site]`` of that site's requests."""

    url: str = ""
    fail_first: dict[str, int] = field(default_factory=dict)
    requests: list[Delivered] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, delivered: Delivered) -> int:
        with self.lock:
            self.requests.append(delivered)
            seen = sum(1 for r in self.requests if r.site == delivered.site)
            return 500 if seen <= self.fail_first.get(delivered.site, 0) else 204

    def fail(self, site: str, first: int) -> None:
        with self.lock:
            self.fail_first[site] = first

    def received(self, site: str) -> list[Delivered]:
        with self.lock:
            return [r for r in self.requests if r.site == site]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            delivered = Delivered(_site_of(body), dict(self.headers.items()), body)
            status = state.answer(delivered)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/intake"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def webhook_intake(module_intakes: ModuleIntakes, receiver: Receiver) -> IntakeProcess:
    """The module's intake on one backend, sending its webhooks to the receiver."""
    return module_intakes(
        study_quiet_seconds="1",
        webhook_urls=receiver.url,
        webhook_secret=SECRET,
        webhook_poll_seconds="0.2",
        webhook_retry_base_seconds="0.2",
        webhook_retry_max_seconds="0.5",
        webhook_max_attempts="3",
    )


@pytest.fixture(scope="module")
def webhook_admin(webhook_intake: IntakeProcess) -> Admin:
    return webhook_intake.add_admin()


@dataclass
class Setup:
    intake: IntakeProcess
    site: Site
    admin: Admin
    receiver: Receiver

    def deliveries(self, **params: str) -> list[dict[str, Any]]:
        """This site's deliveries (another ``site=`` may be asked for)."""
        params.setdefault("site", self.site.name)
        with self.intake.admin_client(self.admin) as client:
            response = client.get("/api/webhooks/deliveries", params=params)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()
        return rows

    def received(self) -> list[Delivered]:
        """The requests the receiver got for this site's events."""
        return self.receiver.received(self.site.name)

    def fail_first(self, count: int) -> None:
        """The receiver answers 500 to the first ``count`` of this site's requests."""
        self.receiver.fail(self.site.name, count)


@pytest.fixture
def setup(webhook_intake: IntakeProcess, webhook_admin: Admin, receiver: Receiver) -> Setup:
    site = webhook_intake.add_site(f"hospital-{uuid.uuid4().hex[:12]}")
    return Setup(webhook_intake, site, webhook_admin, receiver)


def _upload_study(setup: Setup, n_series: int = 2, per_series: int = 2) -> list[bytes]:
    files = make_study(n_series=n_series, per_series=per_series)
    for data in files:
        assert setup.intake.upload(setup.site, data).status_code == 200
    return files


def test_a_quiet_forwarded_study_sends_one_signed_event(
    setup: Setup, private_orthanc: OrthancProcess
) -> None:
    _upload_study(setup)
    [event] = wait_until(setup.received, timeout=30)
    expected = "sha256=" + hmac.new(SECRET.encode(), event.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(event.headers["X-Intake-Signature"], expected)
    assert event.headers["X-Intake-Event"] == "study.arrived"
    assert event.headers["Content-Type"] == "application/json"
    payload = json.loads(event.body)
    assert payload["event"] == "study.arrived"
    assert payload["site"] == setup.site.name
    assert (payload["instances"], payload["series"]) == (4, 2)
    assert (payload["forwarded"], payload["quarantined"], payload["rejected"]) == (4, 0, 0)
    assert payload["first_received_at"] <= payload["last_received_at"]
    with private_orthanc.client() as orthanc:
        study = orthanc.get(f"/studies/{payload['orthanc_study_id']}").json()
    assert study["MainDicomTags"]["StudyInstanceUID"] == payload["study_instance_uid"]
    [row] = wait_until(lambda: setup.deliveries(state="delivered"), timeout=10)
    assert event.headers["X-Intake-Delivery"] == str(row["id"])
    assert (row["attempts"], row["last_status"], row["payload"]) == (1, 204, payload)
    # Several scans later, the settled study has made no second event. The scans are
    # proved by a second study of the same site: its event is queued by a scan at least
    # STUDY_QUIET_SECONDS (1 s) after its upload, scans running every 0.2 s, and each of
    # them went over the first study too. The deliveries table holds every event those
    # scans queued for this site.
    first = payload["study_instance_uid"]
    second = dcmread(io.BytesIO(_upload_study(setup, n_series=1, per_series=1)[0]))
    wait_until(lambda: setup.deliveries(state="delivered")[0]["id"] != row["id"], timeout=30)
    queued = [r["payload"]["study_instance_uid"] for r in reversed(setup.deliveries())]
    assert queued == [first, second.StudyInstanceUID]
    assert [json.loads(r.body)["study_instance_uid"] for r in setup.received()] == queued


def test_a_study_that_grows_after_its_event_makes_a_new_one(setup: Setup) -> None:
    files = _upload_study(setup, n_series=1, per_series=1)
    wait_until(setup.received, timeout=30)
    extra = dcmread(io.BytesIO(files[0]))
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = io.BytesIO()
    extra.save_as(out, enforce_file_format=True)
    assert setup.intake.upload(setup.site, out.getvalue()).status_code == 200
    wait_until(lambda: len(setup.received()) == 2, timeout=30)
    counts = [json.loads(r.body)["instances"] for r in setup.received()]
    assert counts == [1, 2]


def test_a_failing_receiver_is_retried_until_it_answers(setup: Setup) -> None:
    setup.fail_first(2)
    _upload_study(setup, n_series=1, per_series=2)
    [row] = wait_until(lambda: setup.deliveries(state="delivered"), timeout=30)
    assert (row["attempts"], row["last_status"], row["last_error"]) == (3, 204, None)
    sent = setup.received()
    assert len(sent) == 3
    assert len({r.body for r in sent}) == 1
    assert {r.headers["X-Intake-Delivery"] for r in sent} == {str(row["id"])}


def test_a_receiver_that_keeps_failing_ends_failed_and_can_be_retried(setup: Setup) -> None:
    setup.fail_first(1000)
    _upload_study(setup, n_series=1, per_series=1)
    [row] = wait_until(lambda: setup.deliveries(state="failed"), timeout=30)
    assert (row["attempts"], row["last_status"]) == (3, 500)
    assert "500" in row["last_error"]
    assert setup.deliveries(site=setup.site.name) == [row]
    assert setup.deliveries(site="no-such-site") == []

    setup.fail_first(0)
    with setup.intake.admin_client(setup.admin) as client:
        retried = client.post(f"/api/webhooks/deliveries/{row['id']}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["state"] == "pending"
        wait_until(lambda: setup.deliveries(state="delivered"), timeout=30)
        again = client.post(f"/api/webhooks/deliveries/{row['id']}/retry")
        assert again.status_code == 409
        assert again.json()["error"] == "delivery_not_failed"
        missing = client.post("/api/webhooks/deliveries/999999/retry")
        assert missing.status_code == 404


def test_delivery_routes_need_an_admin(webhook_intake: IntakeProcess) -> None:
    response = httpx.get(f"{webhook_intake.admin_url}/api/webhooks/deliveries")
    assert response.status_code == 401


def test_webhook_urls_without_a_secret_are_refused() -> None:
    with pytest.raises(ValidationError, match="WEBHOOK_SECRET"):
        Settings(webhook_urls=["https://example.org/hook"])
