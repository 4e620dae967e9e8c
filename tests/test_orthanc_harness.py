"""The real-Orthanc harness itself: start, store, read back, restart, crash, peer push."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.orthanc import OrthancProcess, free_port
from tests.support.studies import make_study

pytestmark = pytest.mark.orthanc


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    with OrthancProcess(tmp_path_factory.mktemp("private"), name="private") as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, private: OrthancProcess
) -> Iterator[OrthancProcess]:
    peers = {
        "private": {"Url": private.url, "Username": private.username, "Password": private.password},
        "wrong-password": {"Url": private.url, "Username": private.username, "Password": "wrong"},
    }
    with OrthancProcess(tmp_path_factory.mktemp("site"), name="site", peers=peers) as orthanc:
        yield orthanc


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[OrthancProcess]:
    """An Orthanc of its own, for tests that restart or kill it."""
    with OrthancProcess(tmp_path / "orthanc", name="scratch") as orthanc:
        yield orthanc


def test_orthanc_answers_system_on_loopback(private: OrthancProcess) -> None:
    """GET /system answers with our name, the Debian version and the chosen port."""
    with private.client() as client:
        system = client.get("/system").raise_for_status().json()
    assert private.url == f"http://127.0.0.1:{private.port}"
    assert system["Name"] == "private"
    assert system["Version"] == "1.10.1"
    assert system["HttpPort"] == private.port


def test_orthanc_refuses_a_wrong_password(private: OrthancProcess) -> None:
    """Authentication is on: a wrong password is answered 401 with a Basic challenge."""
    response = httpx.get(f"{private.url}/system", auth=(private.username, "wrong"))
    assert response.status_code == httpx.codes.UNAUTHORIZED
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_generated_instance_is_stored_and_read_back_byte_identical(
    private: OrthancProcess,
) -> None:
    """A generated CT instance uploads as Success and comes back byte for byte."""
    (data,) = make_study(n_series=1, per_series=1)
    response = private.upload(data)
    assert response.status_code == httpx.codes.OK
    answer = response.json()
    assert answer["Status"] == "Success"
    assert answer["ID"] in private.instances()
    assert private.instance_file(answer["ID"]) == data


def test_second_upload_of_an_instance_is_already_stored(private: OrthancProcess) -> None:
    """OverwriteInstances is off: the same SOP instance again is AlreadyStored."""
    (data,) = make_study(n_series=1, per_series=1)
    assert private.upload(data).json()["Status"] == "Success"
    assert private.upload(data).json()["Status"] == "AlreadyStored"


def test_restart_keeps_port_and_data(scratch: OrthancProcess) -> None:
    """restart() comes back on the same port with the stored instances."""
    (data,) = make_study(n_series=1, per_series=1)
    orthanc_id = scratch.upload(data).json()["ID"]
    port = scratch.port
    scratch.restart()
    assert scratch.port == port
    assert scratch.is_alive()
    assert scratch.instance_file(orthanc_id) == data


def test_kill_makes_is_alive_false(scratch: OrthancProcess) -> None:
    """kill() is a SIGKILL: the process is gone and is_alive() says so."""
    scratch.kill()
    assert not scratch.is_alive()
    assert scratch.returncode == -9


def test_free_port_is_not_listening() -> None:
    """free_port() hands out a port nothing answers on."""
    port = free_port()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/system", timeout=2)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_peer_push_delivers_every_instance_byte_identical(
    site: OrthancProcess, private: OrthancProcess, compress: bool
) -> None:
    """A synchronous store job from site to private delivers each file unchanged."""
    files = make_study(n_series=2, per_series=3, rows=32, cols=32)
    answers = [site.upload(data).json() for data in files]
    study = answers[0]["ParentStudy"]

    response = site.push_to_peer("private", [study], compress=compress)

    assert response.status_code == httpx.codes.OK
    job = response.json()
    assert job["InstancesCount"] == len(files)
    assert job["FailedInstancesCount"] == 0
    for answer, data in zip(answers, files, strict=True):
        assert private.instance_file(answer["ID"]) == data


def test_peer_push_fails_when_the_peer_refuses(site: OrthancProcess) -> None:
    """A 401 from the peer fails the whole job as 500 'Error in the network protocol'."""
    (data,) = make_study(n_series=1, per_series=1)
    orthanc_id = site.upload(data).json()["ID"]

    response = site.push_to_peer("wrong-password", [orthanc_id])

    assert response.status_code == httpx.codes.INTERNAL_SERVER_ERROR
    assert response.json()["OrthancError"] == "Error in the network protocol"
