"""HTTPS on the public listener, with curl-like clients and a real Orthanc peer."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHARED_SQLITE_ONLY, ModuleIntakes
from tests.support.certs import make_server_cert
from tests.support.intake import IntakeProcess, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

# The listener's TLS: the database plays no part, so one intake on SQLite serves the module.
pytestmark = SHARED_SQLITE_ONLY


@pytest.fixture(scope="module")
def tls_intake(
    module_intakes: ModuleIntakes, tmp_path_factory: pytest.TempPathFactory
) -> tuple[IntakeProcess, Path]:
    """The module's intake on HTTPS, and the CA that signed its certificate."""
    cert = make_server_cert(tmp_path_factory.mktemp("tls") / "certs")
    intake = module_intakes(tls_certfile=str(cert.cert_file), tls_keyfile=str(cert.key_file))
    return intake, cert.ca_file


def test_upload_over_https(
    tls_intake: tuple[IntakeProcess, Path],
) -> None:
    intake, ca_file = tls_intake
    site = intake.add_site("tls-site")
    assert intake.url.startswith("https://")
    verify = ssl.create_default_context(cafile=str(ca_file))
    response = httpx.post(
        f"{intake.url}/instances",
        content=make_study(n_series=1, per_series=1)[0],
        auth=(site.name, site.token),
        verify=verify,
    )
    assert response.status_code == 200, response.text
    assert site.peer["Url"].startswith("https://")


def test_plain_http_is_not_served_on_the_tls_port(
    tls_intake: tuple[IntakeProcess, Path],
) -> None:
    intake, _ = tls_intake
    plain = intake.url.replace("https://", "http://")
    try:
        response = httpx.get(f"{plain}/system", timeout=5)
    except httpx.HTTPError:
        return
    assert response.status_code == 400


def test_orthanc_peer_push_over_https_with_its_ca_configured(
    tls_intake: tuple[IntakeProcess, Path], private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """Orthanc 1.10.1 needs "HttpsCACertificates" pointing at the CA (the documented trap)."""
    intake, ca_file = tls_intake
    site = intake.add_site("tls-peer")
    sender = OrthancProcess(
        tmp_path / "site-orthanc",
        name="site",
        peers={"intake": site.peer},
        extra_config={"HttpsCACertificates": str(ca_file)},
    )
    sender.start()
    try:
        ids = []
        for data in make_study(n_series=1, per_series=2):
            ids.append(sender.upload(data).json()["ID"])
        answer = sender.push_to_peer("intake", ids)
        assert answer.status_code == 200, answer.text
    finally:
        sender.stop()
    wait_until(lambda: set(ids) <= set(private_orthanc.instances()))
