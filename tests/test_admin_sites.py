"""The admin API manages sites exactly as the CLI does, through the same service layer.

Every test runs on the module's shared intake (one per backend) with a site and an admin
of its own, so what it reads back from a listing is scoped to its own site.
"""

from __future__ import annotations

import io
import uuid

import httpx
import pydicom

from tests.support.intake import Admin, IntakeProcess, Site, wait_until
from tests.support.studies import make_study


def test_create_rotate_revoke_over_the_api(
    shared_intake: IntakeProcess, fresh_admin: Admin
) -> None:
    """A site made through the API uploads; rotation overlaps; revocation ends a token."""
    intake = shared_intake
    name = f"api-site-{uuid.uuid4().hex[:12]}"
    with intake.admin_client(fresh_admin) as api:
        created = api.post("/api/sites", json={"name": name, "label": "first"})
        assert created.status_code == 201, created.text
        first = created.json()
        assert first["site"] == name
        assert first["orthanc_peer"]["Username"] == name
        # The same entries as `sites add` prints: a Timeout for large instances, a DICOMweb
        # server, and the warning that a 127.0.0.1 URL is of no use to a remote site.
        assert first["orthanc_peer"]["Timeout"] == first["dicomweb_server"]["Timeout"] == 300
        assert first["dicomweb_server"] == {
            "Url": f"{intake.peer_url}dicom-web/",
            "HttpHeaders": {"Authorization": f"Bearer {first['token']}"},
            "Timeout": 300,
        }
        assert any("INTAKE_PUBLIC_URL is unset" in w for w in first["warnings"])
        site = Site(name, first["token"], first["orthanc_peer"], first["orthanc_peer_bearer"])
        assert intake.upload(site, make_study(1, 1)[0]).status_code == 200

        rotated = api.post(f"/api/sites/{name}/rotate", json={"grace_days": 1}).json()
        new = Site(name, rotated["token"], rotated["orthanc_peer"], rotated["orthanc_peer_bearer"])
        assert intake.upload(new, make_study(1, 1)[0]).status_code == 200
        assert intake.upload(site, make_study(1, 1)[0]).status_code == 200

        shown = api.get(f"/api/sites/{name}").json()
        assert shown["name"] == name
        assert shown["status"] == "active"
        assert len(shown["tokens"]) == 2
        assert first["token"] not in str(shown)
        old_prefix = shown["tokens"][0]["prefix"]
        revoked = api.post(f"/api/sites/{name}/revoke", json={"token_prefix": old_prefix})
        assert revoked.json() == {"revoked": 1}
    # This intake process forgets its cache at once on an admin change.
    assert intake.upload(site, make_study(1, 1)[0]).status_code == 401
    assert intake.upload(new, make_study(1, 1)[0]).status_code == 200


def test_policy_disable_delete_and_errors(
    shared_intake: IntakeProcess, fresh_admin: Admin, fresh_site: Site
) -> None:
    intake, site = shared_intake, fresh_site
    with intake.admin_client(fresh_admin) as api:
        policy = api.patch(
            f"/api/sites/{site.name}/policy",
            json={"allowed_modalities": ["mr"], "instances_per_minute": 50},
        ).json()["policy"]
        assert policy["allowed_modalities"] == ["MR"]
        ct = make_study(1, 1)[0]
        refused = intake.upload(site, ct)
        assert refused.status_code == 403
        assert "CT" in refused.json()["Details"]
        # Refused after validation: the log keeps the file's UIDs with the reason.
        study_uid = str(pydicom.dcmread(io.BytesIO(ct)).StudyInstanceUID)
        mine = {"study_uid": study_uid, "site": site.name}
        logged = api.get("/api/uploads", params=mine).json()["items"]
        assert [(u["state"], u["reason"]) for u in logged] == [("rejected", "content_not_allowed")]
        cleared = api.patch(
            f"/api/sites/{site.name}/policy", json={"allowed_modalities": None}
        ).json()["policy"]
        assert cleared["allowed_modalities"] == []
        assert intake.upload(site, make_study(1, 1)[0]).status_code == 200

        assert api.post(f"/api/sites/{site.name}/disable").json()["status"] == "disabled"
        assert intake.upload(site, make_study(1, 1)[0]).status_code == 401
        assert api.post(f"/api/sites/{site.name}/enable").json()["status"] == "active"
        assert intake.upload(site, make_study(1, 1)[0]).status_code == 200

        missing = api.get(f"/api/sites/nope-{uuid.uuid4().hex[:12]}")
        assert missing.status_code == 404
        assert missing.json()["error"] == "not_found"
        dup = api.post("/api/sites", json={"name": site.name})
        assert dup.status_code == 409
        bad = api.patch(f"/api/sites/{site.name}/policy", json={"allowed_cidrs": ["300.1.1.1"]})
        assert bad.status_code == 400
        assert "300.1.1.1" in bad.json()["detail"]
        invalid = api.patch(f"/api/sites/{site.name}/policy", json={"bytes_per_day": 0})
        assert invalid.status_code == 422
        assert invalid.json()["error"] == "invalid_request"

        # The module's other sites share the listing: only this site's entries count.
        def listed(**params: str) -> list[tuple[str, str]]:
            found = api.get("/api/sites", params=params).json()
            return [(s["name"], s["status"]) for s in found if s["name"] == site.name]

        assert listed() == listed(include_deleted="true") == [(site.name, "active")]
        deleted = api.delete(f"/api/sites/{site.name}").json()
        assert deleted["status"] == "deleted"
        assert listed() == []
        assert listed(include_deleted="true") == [(site.name, "deleted")]
    assert intake.upload(site, make_study(1, 1)[0]).status_code == 401


def test_cli_changes_reach_a_running_intake_within_the_cache_time(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """A revocation made by another process (the CLI) applies within AUTH_CACHE_SECONDS."""
    intake, site = shared_intake, fresh_site
    assert intake.upload(site, make_study(1, 1)[0]).status_code == 200
    assert intake.cli("sites", "revoke", site.name, "--all").returncode == 0
    wait_until(
        lambda: (
            httpx.post(
                f"{intake.url}/instances", content=b"x", auth=(site.name, site.token)
            ).status_code
            == 401
        ),
        timeout=10,
    )
