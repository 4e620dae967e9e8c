"""docs/TROUBLESHOOTING.md's table, pinned: what a real site Orthanc shows for each cause.

Orthanc 1.10.1 hides the intake's answer from whoever pressed "send": a 401, 404 or 413
becomes a 500 whose Message names no status; the status is in the site Orthanc's own
log. Each row here is one row of the guide, so the guide stays true.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.intake import IntakeProcess
from tests.support.orthanc import OrthancProcess, free_port
from tests.support.studies import make_study

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
NETWORK = "Error in the network protocol"
NOT_ALLOWED = "This HTTP status is not allowed in a REST API"


# cause → (peer entry from (intake URL, site, token), store Message, /system Message, log)
CASES: dict[str, tuple[Any, str, str, str]] = {
    "wrong-token": (
        lambda url, site, _token: {"Url": url, "Username": site, "Password": "oit_wrong"},
        NETWORK,
        NOT_ALLOWED,
        "received HTTP status 401 (Unauthorized)",
    ),
    "no-credentials": (lambda url, _site, _token: {"Url": url}, NETWORK, NOT_ALLOWED, "401"),
    "wrong-path": (
        lambda url, site, token: {"Url": url + "orthanc/", "Username": site, "Password": token},
        NETWORK,
        NOT_ALLOWED,
        "received HTTP status 404 (Not Found)",
    ),
    "too-large": (
        lambda url, site, token: {"Url": url, "Username": site, "Password": token},
        NETWORK,
        "",  # /system works: only the store fails
        "received HTTP status 413 (Request Entity Too Large)",
    ),
    "intake-unreachable": (
        lambda _url, site, token: {
            "Url": f"http://127.0.0.1:{free_port()}/",
            "Username": site,
            "Password": token,
        },
        NETWORK,
        NETWORK,
        "Couldn't connect to server",
    ),
}


@dataclass(frozen=True)
class Shown:
    store: httpx.Response
    system: httpx.Response
    stow: httpx.Response
    log: str  # what the site Orthanc logged for this cause alone


@pytest.fixture(scope="module")
def shown(
    tmp_path_factory: pytest.TempPathFactory, private_orthanc: OrthancProcess
) -> Iterator[dict[str, Shown]]:
    """One site Orthanc with a peer and a DICOMweb server per cause, against one intake
    that takes instances of at most 3000 bytes (so every study is too large for it)."""
    workdir = tmp_path_factory.mktemp("troubleshooting")
    intake = IntakeProcess(
        workdir / "intake",
        f"sqlite:///{workdir / 'intake.db'}",
        orthanc=private_orthanc,
        env_extra={"INTAKE_MAX_INSTANCE_BYTES": "3000"},
    )
    intake.start()
    site = intake.add_site("hospital-t")
    peers = {
        cause: build(intake.peer_url, site.name, site.token) for cause, (build, *_) in CASES.items()
    }
    servers = {
        cause: {k: v for k, v in peer.items() if k != "Url"} | {"Url": peer["Url"] + "dicom-web/"}
        for cause, peer in peers.items()
    }
    orthanc = OrthancProcess(
        workdir / "site-orthanc",
        name="site",
        peers=peers,
        extra_config={"Plugins": [PLUGIN], "DicomWeb": {"Servers": servers}},
    )
    orthanc.start()
    found: dict[str, Shown] = {}
    try:
        study = orthanc.upload(make_study(n_series=1, per_series=1)[0]).json()["ParentStudy"]
        with orthanc.client() as client:
            for cause in CASES:
                before = len(orthanc.log_text())
                store = client.post(f"/peers/{cause}/store", json={"Resources": [study]})
                system = client.get(f"/peers/{cause}/system")
                stow = client.post(f"/dicom-web/servers/{cause}/stow", json={"Resources": [study]})
                found[cause] = Shown(store, system, stow, orthanc.log_text()[before:])
        yield found
    finally:
        orthanc.stop()
        intake.kill()


@pytest.mark.parametrize("cause", sorted(CASES))
def test_what_the_site_orthanc_shows(shown: dict[str, Shown], cause: str) -> None:
    """The peer store's answer, the peer test's answer, and the site log's line."""
    _build, store_message, system_message, log_line = CASES[cause]
    store, system, stow, log = (
        shown[cause].store,
        shown[cause].system,
        shown[cause].stow,
        shown[cause].log,
    )
    assert (store.status_code, store.json()["Message"]) == (500, store_message)
    if system_message:
        assert (system.status_code, system.json()["Message"]) == (500, system_message)
    else:
        assert system.status_code == 200, system.text
    # The DICOMweb plugin says less still: a bare "plugin engine" 500 whatever the cause.
    assert (stow.status_code, stow.json()["Message"]) == (
        500,
        "Error encountered within the plugin engine",
    )
    assert log_line in log, log
