"""POST /instances end to end: a real intake process forwarding to a real Orthanc."""

from __future__ import annotations

from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def test_upload_answers_like_orthanc_and_arrives(
    intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess
) -> None:
    """A raw upload gets Orthanc's answer shape, and the file reaches the private Orthanc."""
    data = make_study(n_series=1, per_series=1)[0]
    response = intake.upload(
        site, data, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["Status"] == "Success"
    assert body["Path"] == f"/instances/{body['ID']}"
    assert set(body) >= {"ID", "ParentPatient", "ParentSeries", "ParentStudy", "Path", "Status"}
    wait_until(lambda: body["ID"] in private_orthanc.instances(), timeout=30)
    assert private_orthanc.instance_file(body["ID"]) == data
