"""Health, readiness and Prometheus metrics on the admin listener.

Tests on default settings share one intake per backend (``shared_intake``), each with a
site of its own: the metrics they read are the site's own series."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SQLITE_ONLY
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def _ready(intake: IntakeProcess) -> httpx.Response:
    return httpx.get(f"{intake.admin_url}/readyz", timeout=30)


def _samples(intake: IntakeProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by name and labels."""
    response = httpx.get(f"{intake.admin_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_healthz_answers_without_credentials(shared_intake: IntakeProcess) -> None:
    response = httpx.get(f"{shared_intake.admin_url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_follows_the_private_orthanc(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess
) -> None:
    """Orthanc stopped → 503 naming the Orthanc check; Orthanc back → 200."""
    intake = make_intake(own_orthanc)
    assert _ready(intake).status_code == 200
    own_orthanc.stop()
    response = wait_until(lambda: (r := _ready(intake)).status_code == 503 and r, timeout=30)
    body = response.json()
    assert body["ready"] is False
    assert body["checks"] == {
        "database": True,
        "orthanc": False,
        "spool": True,
        "forwarder": True,
    }
    assert set(body["failing"]) == {"orthanc"}
    own_orthanc.start()
    wait_until(lambda: _ready(intake).status_code == 200, timeout=30)


@SQLITE_ONLY  # the spool's own check
def test_readyz_fails_when_the_spool_disk_is_below_its_floor(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    intake = make_intake(private_orthanc, spool_min_free_bytes=str(10**18))
    response = _ready(intake)
    assert response.status_code == 503
    assert response.json()["checks"]["spool"] is False
    assert "floor" in response.json()["failing"]["spool"]


def test_metrics_count_uploads_per_site(shared_intake: IntakeProcess, fresh_site: Site) -> None:
    """Accepted, duplicate and rejected uploads, bytes, forwards and latency, by site name."""
    intake, site = shared_intake, fresh_site
    files = make_study(n_series=1, per_series=2)
    for data in files:
        assert intake.upload(site, data).status_code == 200
    assert intake.upload(site, files[0]).status_code == 200  # the same bytes again
    assert intake.upload(site, b"not a DICOM file at all").status_code == 400

    def forwarded() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        samples = _samples(intake)
        done = _value(
            samples, "intake_forwards_total", site=site.name, result="forwarded", reason=""
        )
        return samples if done == 2 else None

    samples = wait_until(forwarded, timeout=30)
    uploads = "intake_uploads_total"
    assert _value(samples, uploads, site=site.name, outcome="accepted", reason="") == 2
    assert _value(samples, uploads, site=site.name, outcome="duplicate", reason="") == 1
    assert _value(samples, uploads, site=site.name, outcome="rejected", reason="not_dicom") == 1
    received = _value(samples, "intake_received_bytes_total", site=site.name)
    assert received >= 3 * len(files[0])
    assert _value(samples, "intake_forward_latency_seconds_count", site=site.name) == 2
    assert _value(samples, "intake_upload_handling_seconds_count", site=site.name) == 4
    assert ("intake_queue_depth", frozenset({("site", site.name)})) in samples
    assert _value(samples, "intake_queue_depth", site=site.name) == 0
    assert _value(samples, "intake_quarantined", site=site.name) == 0


def test_metrics_show_the_queue_while_orthanc_is_down(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess
) -> None:
    """Queue depth is read from the database at scrape time."""
    intake = make_intake(own_orthanc)
    site = intake.add_site("hospital-b")
    own_orthanc.stop()
    for data in make_study(n_series=1, per_series=3):
        assert intake.upload(site, data).status_code == 200
    assert _value(_samples(intake), "intake_queue_depth", site=site.name) == 3
    own_orthanc.start()
    wait_until(lambda: _value(_samples(intake), "intake_queue_depth", site=site.name) == 0)


def test_metrics_never_show_tokens_passwords_or_patient_data(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess
) -> None:
    intake, site = shared_intake, fresh_site
    files = make_study(n_series=1, per_series=1, patient_id="PATIENT-SECRET-42")
    assert intake.upload(site, files[0]).status_code == 200
    assert intake.upload(site, b"garbage").status_code == 400
    text = httpx.get(f"{intake.admin_url}/metrics").text
    assert site.name in text
    for secret in (site.token, private_orthanc.password, "PATIENT-SECRET-42"):
        assert secret not in text
    assert "1.2.826.0.1.3680043" not in text  # pydicom's UID root: no UID in a label
