"""A real remote Orthanc pushes a study through the intake to the real private Orthanc."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

HARMLESS_PREAMBLE = b"II*\x00 a TIFF header, say".ljust(128, b"\x01")


def _site_orthanc(tmp_path: Path, peer: dict[str, Any]) -> OrthancProcess:
    site = OrthancProcess(tmp_path / "site-orthanc", name="site", peers={"intake": peer})
    site.start()
    return site


def _push_and_check(
    site_orthanc: OrthancProcess,
    private: OrthancProcess,
    study: str,
    by_id: dict[str, bytes],
    compress: bool,
) -> None:
    answer = site_orthanc.push_to_peer("intake", [study], compress=compress)
    assert answer.status_code == 200, answer.text
    assert answer.json().get("FailedInstancesCount", 0) == 0
    wait_until(lambda: set(by_id) <= set(private.instances()), timeout=60)
    for orthanc_id, original in by_id.items():
        stored = private.instance_file(orthanc_id)
        assert stored[128:] == original[128:]
        assert stored[:128] == bytes(128)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_peer_push_with_basic_auth(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    private_orthanc: OrthancProcess,
    tmp_path: Path,
    compress: bool,
) -> None:
    """A multi-series study arrives byte-identical after the (zeroed) preamble."""
    intake, site = shared_intake, fresh_site
    files = make_study(n_series=3, per_series=3)
    files[0] = HARMLESS_PREAMBLE + files[0][128:]
    site_orthanc = _site_orthanc(tmp_path, site.peer)
    try:
        study, by_id = site_orthanc.load(files)
        _push_and_check(site_orthanc, private_orthanc, study, by_id, compress)
    finally:
        site_orthanc.stop()
    assert private_orthanc.password not in intake.log_text()


def test_peer_push_with_bearer_header_and_large_instances(
    fresh_site: Site, private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """HttpHeaders Bearer auth; 2 MiB instances make the peer send Expect: 100-continue."""
    site = fresh_site
    files = make_study(n_series=1, per_series=3, rows=1024, cols=1024)
    assert all(len(f) > 1024 * 1024 for f in files)
    site_orthanc = _site_orthanc(tmp_path, site.peer_bearer)
    try:
        study, by_id = site_orthanc.load(files)
        _push_and_check(site_orthanc, private_orthanc, study, by_id, compress=False)
    finally:
        site_orthanc.stop()


def test_peer_test_button_works_without_revealing_orthanc(
    fresh_site: Site, private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """GET /peers/intake/system on the site relays our minimal /system answer."""
    site = fresh_site
    site_orthanc = _site_orthanc(tmp_path, site.peer)
    try:
        with site_orthanc.client() as client:
            answer = client.get("/peers/intake/system")
    finally:
        site_orthanc.stop()
    assert answer.status_code == 200, answer.text
    assert answer.json()["Name"] == "Orthanc Intake"
    assert "Version" not in answer.json()
    assert private_orthanc.name not in answer.text


def test_orthanc_down_during_push_then_everything_arrives(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """With the private Orthanc stopped, the push still succeeds; all arrives once it is back."""
    intake = make_intake(own_orthanc)
    site = intake.add_site("hospital-b")
    own_orthanc.stop()
    files = make_study(n_series=2, per_series=3)
    site_orthanc = _site_orthanc(tmp_path, site.peer)
    try:
        study, by_id = site_orthanc.load(files)
        answer = site_orthanc.push_to_peer("intake", [study])
        assert answer.status_code == 200, answer.text
    finally:
        site_orthanc.stop()
    own_orthanc.start()
    wait_until(lambda: set(by_id) <= set(own_orthanc.instances()), timeout=60)
    for orthanc_id, original in by_id.items():
        assert own_orthanc.instance_file(orthanc_id) == original
