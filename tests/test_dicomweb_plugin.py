"""Orthanc's own DICOMweb plugin, on a real site Orthanc, pushes studies through the intake.

The plugin's STOW-RS client is a sender nobody on this project wrote: a 73-character
``uuid-uuid`` boundary (past RFC 2046's 70) and a chunked body. Both listeners' ways
of authenticating a site are tried: Bearer in ``HttpHeaders`` and Basic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.shared import shared_intake_fixtures
from tests.support.studies import make_study

intake, site, admin = shared_intake_fixtures()

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _site_orthanc(tmp_path: Path, server: dict[str, Any]) -> OrthancProcess:
    orthanc = OrthancProcess(
        tmp_path / "site-orthanc",
        name="site",
        extra_config={
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"intake": server}},
        },
    )
    orthanc.start()
    return orthanc


def _servers(intake: IntakeProcess, site: Site) -> dict[str, dict[str, Any]]:
    url = f"{intake.peer_url.rstrip('/')}/dicom-web/"
    return {
        "bearer": {"Url": url, "HttpHeaders": {"Authorization": f"Bearer {site.token}"}},
        "basic": {"Url": url, "Username": site.name, "Password": site.token},
    }


def test_the_plugin_is_installed() -> None:
    """The project's setup installs Debian's orthanc-dicomweb: a missing plugin is a failure."""
    assert PLUGIN.is_file()


@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_plugin_stow_pushes_a_multi_series_study(
    intake: IntakeProcess,
    site: Site,
    private_orthanc: OrthancProcess,
    tmp_path: Path,
    auth: str,
) -> None:
    """Every instance reaches the private Orthanc with its bytes after the preamble intact."""
    files = make_study(n_series=3, per_series=4)
    site_orthanc = _site_orthanc(tmp_path, _servers(intake, site)[auth])
    try:
        study, by_id = site_orthanc.load(files)
        with site_orthanc.client(timeout=120) as client:
            pushed = client.post("/dicom-web/servers/intake/stow", json={"Resources": [study]})
        assert pushed.status_code == 200, (pushed.text, site_orthanc.log_text()[-2000:])
        plugin_log = site_orthanc.log_text()
    finally:
        site_orthanc.stop()
    wait_until(lambda: set(by_id) <= set(private_orthanc.instances()), timeout=60)
    for orthanc_id, original in by_id.items():
        stored = private_orthanc.instance_file(orthanc_id)
        assert stored[128:] == original[128:]
    assert "Error" not in plugin_log.split("stow", 1)[-1], plugin_log[-2000:]
