"""TLS settings, certificate reload without restart, and mutual TLS bound to sites."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.conftest import SQLITE_ONLY, ModuleIntakes
from tests.support.certs import ClientCert, make_client_certs, make_server_cert
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def _server_cert_serial(port: int, ca_file: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _handshake(port: int, context: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version() or ""


def _mtls_client(ca_file: Path, cert: ClientCert | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(cert.cert_file, cert.key_file)
    return context


def _policy(intake: IntakeProcess, site: Site, *options: str) -> None:
    done = intake.cli("sites", "policy", site.name, *options, "--json")
    assert done.returncode == 0, done.stderr


def test_only_tls_1_2_and_1_3_are_offered(mtls: Mtls) -> None:
    intake, ca_file, _, _ = mtls  # a client certificate is optional there
    modern = ssl.create_default_context(cafile=str(ca_file))
    assert _handshake(intake.public_port, modern) == "TLSv1.3"
    tls12 = ssl.create_default_context(cafile=str(ca_file))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _handshake(intake.public_port, tls12) == "TLSv1.2"
    old = ssl.create_default_context(cafile=str(ca_file))
    old.set_ciphers("ALL:@SECLEVEL=0")  # this client would speak TLS 1.1; the server won't
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    # The server answers a TLS 1.1 ClientHello with an alert or by hanging up (EOF); a client
    # that could not even try would fail with "no protocols available" instead.
    with pytest.raises(ssl.SSLError, match=r"(?i)protocol version|unsupported protocol|EOF"):
        _handshake(intake.public_port, old)


@SQLITE_ONLY  # the listener's certificate: the database plays no part
def test_a_renewed_certificate_is_served_without_a_restart(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """SIGHUP, or just new files (checked every second here): new handshakes, new cert."""
    first = make_server_cert(tmp_path / "first")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(first.cert_file.parent / name, live / name)
    intake = make_intake(
        private_orthanc,
        tls_certfile=str(live / "server.pem"),
        tls_keyfile=str(live / "server.key"),
        tls_reload_check_seconds="3600",
    )
    site = intake.add_site("renewing")
    pid = intake.pid
    assert pid is not None
    before = _server_cert_serial(intake.public_port, first.ca_file)

    second = make_server_cert(tmp_path / "second")
    for name in ("server.key", "server.pem"):
        shutil.copy(second.cert_file.parent / name, live / name)
    os.kill(pid, signal.SIGHUP)
    after = wait_until(lambda: _serial_or_none(intake.public_port, second.ca_file), timeout=20)
    assert after != before
    assert intake.pid == pid  # the same process: nothing restarted
    response = httpx.post(
        f"{intake.url}/instances",
        content=make_study(1, 1)[0],
        auth=(site.name, site.token),
        verify=ssl.create_default_context(cafile=str(second.ca_file)),
    )
    assert response.status_code == 200


def _serial_or_none(port: int, ca_file: Path) -> int | None:
    """The served certificate's serial once it verifies against ``ca_file``."""
    try:
        return _server_cert_serial(port, ca_file)
    except (OSError, ssl.SSLError):
        return None


@SQLITE_ONLY  # the listener's certificate: the database plays no part
def test_a_broken_renewal_keeps_the_current_certificate(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    server = make_server_cert(tmp_path / "certs")
    intake = make_intake(
        private_orthanc,
        tls_certfile=str(server.cert_file),
        tls_keyfile=str(server.key_file),
        tls_reload_check_seconds="1",
    )
    before = _server_cert_serial(intake.public_port, server.ca_file)
    server.key_file.write_text("not a key")  # a renewal caught half-way
    wait_until(lambda: "certificate not reloaded" in intake.log_text(), timeout=20)
    assert _server_cert_serial(intake.public_port, server.ca_file) == before


Mtls = tuple[IntakeProcess, Path, dict[str, ClientCert], ClientCert]


@pytest.fixture(scope="module")
def mtls(module_intakes: ModuleIntakes, tmp_path_factory: pytest.TempPathFactory) -> Mtls:
    """One intake per backend asking for client certificates (optional), shared by the
    module's tests that neither renew its certificate nor need another mode."""
    root = tmp_path_factory.mktemp("mtls")
    server = make_server_cert(root / "server")
    client_ca, certs = make_client_certs(root / "clients", ["site-a", "site-b"])
    _, rogue = make_client_certs(root / "rogue", ["site-a"])
    intake = module_intakes(
        tls_certfile=str(server.cert_file),
        tls_keyfile=str(server.key_file),
        tls_client_cafile=str(client_ca),
        tls_client_cert="optional",
    )
    return intake, server.ca_file, certs, rogue["site-a"]


def test_a_site_bound_to_a_certificate_needs_it_as_well_as_its_token(
    mtls: Mtls,
) -> None:
    intake, ca_file, certs, _ = mtls
    site = intake.add_site("bound")
    _policy(intake, site, "--client-cert-sha256", certs["site-a"].sha256.upper())
    data = make_study(1, 1)[0]

    def post(cert: ClientCert | None) -> httpx.Response:
        return httpx.post(
            f"{intake.url}/instances",
            content=data,
            auth=(site.name, site.token),
            verify=_mtls_client(ca_file, cert),
        )

    missing = post(None)
    assert missing.status_code == 403
    assert "must present its client certificate" in missing.json()["Details"]
    other = post(certs["site-b"])
    assert other.status_code == 403
    assert "not the one bound" in other.json()["Details"]
    assert post(certs["site-a"]).status_code == 200
    # The token stays the first factor: the right certificate with a wrong token is 401.
    wrong_token = httpx.post(
        f"{intake.url}/instances",
        content=data,
        auth=(site.name, "oit_" + "A" * 49),
        verify=_mtls_client(ca_file, certs["site-a"]),
    )
    assert wrong_token.status_code == 401


def test_certificates_from_another_ca_fail_the_handshake(
    mtls: Mtls,
) -> None:
    intake, ca_file, _, rogue = mtls
    # (TLS 1.3 reports a refused client certificate on the first read, not the handshake.)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{intake.url}/system", verify=_mtls_client(ca_file, rogue))


def test_required_mode_refuses_connections_without_a_certificate(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    server = make_server_cert(tmp_path / "server")
    client_ca, certs = make_client_certs(tmp_path / "clients", ["site-a"])
    intake = make_intake(
        private_orthanc,
        tls_certfile=str(server.cert_file),
        tls_keyfile=str(server.key_file),
        tls_client_cafile=str(client_ca),
    )
    site = intake.add_site("anyone-with-a-cert")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{intake.url}/system", verify=_mtls_client(server.ca_file, None))
    answer = httpx.get(
        f"{intake.url}/system",
        auth=(site.name, site.token),
        verify=_mtls_client(server.ca_file, certs["site-a"]),
    )
    assert answer.status_code == 200


def test_an_orthanc_peer_pushes_with_its_client_certificate(
    mtls: Mtls,
    private_orthanc: OrthancProcess,
    tmp_path: Path,
) -> None:
    """Orthanc's peer options CertificateFile / CertificateKeyFile, against a bound site."""
    intake, ca_file, certs, _ = mtls
    site = intake.add_site("orthanc-mtls")
    _policy(intake, site, "--client-cert", str(certs["site-a"].cert_file))  # from the PEM
    peer = {
        **site.peer,
        "CertificateFile": str(certs["site-a"].cert_file),
        "CertificateKeyFile": str(certs["site-a"].key_file),
    }
    sender = OrthancProcess(
        tmp_path / "site-orthanc",
        name="site",
        peers={"intake": peer, "intake-no-cert": site.peer},
        extra_config={"HttpsCACertificates": str(ca_file)},
    )
    sender.start()
    try:
        ids = [sender.upload(d).json()["ID"] for d in make_study(n_series=1, per_series=2)]
        refused = sender.push_to_peer("intake-no-cert", ids)
        assert refused.status_code != 200
        answer = sender.push_to_peer("intake", ids)
        assert answer.status_code == 200, answer.text
    finally:
        sender.stop()
    wait_until(lambda: set(ids) <= set(private_orthanc.instances()), timeout=60)
