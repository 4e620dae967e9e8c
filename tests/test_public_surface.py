"""The public listener answers uploads only; site tokens read nothing; secrets never leak."""

from __future__ import annotations

import base64

import httpx
import pytest
from sqlalchemy import create_engine, select, update

from app.db.models import Site as SiteRow
from app.db.models import SiteToken, utcnow
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.shared import shared_intake_fixtures
from tests.support.studies import make_study

# Default settings: the module's shared intake, a site and an admin per test.
intake, site, admin = shared_intake_fixtures()


# Orthanc's REST API for reading, querying, changing and deleting (and the admin routes).
PROBES = [
    ("GET", "/instances"),
    ("GET", "/instances/{id}"),
    ("GET", "/instances/{id}/file"),
    ("GET", "/instances/{id}/tags"),
    ("DELETE", "/instances/{id}"),
    ("PUT", "/instances/{id}/metadata/x"),
    ("GET", "/patients"),
    ("GET", "/studies"),
    ("GET", "/series"),
    ("GET", "/studies/{study}/archive"),
    ("POST", "/tools/find"),
    ("GET", "/tools/now"),
    ("POST", "/tools/execute-script"),
    ("GET", "/changes"),
    ("GET", "/statistics"),
    ("GET", "/peers"),
    ("GET", "/modalities"),
    ("GET", "/jobs"),
    ("GET", "/app/explorer.html"),
    ("GET", "/ui/app/"),
    ("GET", "/dicom-web/studies"),
    ("GET", "/dicom-web/studies/{study}"),
    ("GET", "/dicom-web/studies/{study}/metadata"),
    ("GET", "/dicom-web/studies/{study}/series"),
    ("DELETE", "/dicom-web/studies/{study}"),
    ("GET", "/wado"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
]


@pytest.fixture
def stored(intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess) -> dict[str, str]:
    answer = intake.upload(site, make_study(n_series=1, per_series=1)[0]).json()
    wait_until(lambda: answer["ID"] in private_orthanc.instances())
    return answer  # type: ignore[no-any-return]


def test_no_read_or_delete_route_answers_with_data(
    intake: IntakeProcess, site: Site, stored: dict[str, str], private_orthanc: OrthancProcess
) -> None:
    responses = []
    with intake.client(site) as client:
        for method, template in PROBES:
            path = template.format(id=stored["ID"], study=stored["ParentStudy"])
            response = client.request(method, path, json={} if method in ("POST", "PUT") else None)
            responses.append((method, path, response))
    for method, path, response in responses:
        assert response.status_code in (404, 405), f"{method} {path} -> {response.status_code}"
        assert response.json()["HttpStatus"] == response.status_code
    # The instance is still there: the DELETE reached nothing.
    assert stored["ID"] in private_orthanc.instances()
    everything = "\n".join(f"{r.headers}\n{r.text}" for _, _, r in responses)
    assert private_orthanc.password not in everything
    assert private_orthanc.password not in intake.log_text()
    assert site.token not in intake.log_text()


def _basic(name: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Bearer oit_" + "A" * 49},
        {"Authorization": "Digest whatever"},
    ],
    ids=["none", "garbage-bearer", "bad-checksum", "other-scheme"],
)
def test_unauthenticated_uploads_get_401_with_basic_challenge(
    intake: IntakeProcess, site: Site, headers: dict[str, str]
) -> None:
    response = httpx.post(f"{intake.url}/instances", content=b"x" * 1000, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic realm=")
    assert response.json()["HttpStatus"] == 401


def test_valid_token_with_another_site_name_is_refused(intake: IntakeProcess, site: Site) -> None:
    other = intake.add_site(f"{site.name}-z")  # a name no other test takes
    response = httpx.post(
        f"{intake.url}/instances", content=b"x", headers=_basic(other.name, site.token)
    )
    assert response.status_code == 401


def test_bearer_token_is_accepted(intake: IntakeProcess, site: Site) -> None:
    response = httpx.post(
        f"{intake.url}/instances/",
        content=make_study(n_series=1, per_series=1)[0],
        headers={"Authorization": f"Bearer {site.token}"},
    )
    assert response.status_code == 200, response.text


def test_revoked_token_is_refused(intake: IntakeProcess, site: Site) -> None:
    # This site's tokens only: the intake and its database are shared with other tests.
    site_id = select(SiteRow.id).where(SiteRow.name == site.name).scalar_subquery()
    engine = create_engine(intake.database_url)
    with engine.begin() as conn:
        revoked = conn.execute(
            update(SiteToken).where(SiteToken.site_id == site_id).values(revoked_at=utcnow())
        )
    assert revoked.rowcount == 1
    engine.dispose()
    response = httpx.post(
        f"{intake.url}/instances", content=b"x", headers=_basic(site.name, site.token)
    )
    assert response.status_code == 401


def test_system_needs_a_site_token(intake: IntakeProcess, site: Site) -> None:
    assert httpx.get(f"{intake.url}/system").status_code == 401
    with intake.client(site) as client:
        assert client.get("/system").json()["Site"] == site.name


def test_health_lives_on_the_admin_listener(intake: IntakeProcess) -> None:
    assert httpx.get(f"{intake.admin_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{intake.admin_url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {
        "database": True,
        "orthanc": True,
        "spool": True,
        "forwarder": True,
    }


def test_the_front_page_points_to_the_upload_page_and_says_nothing_of_the_archive(
    intake: IntakeProcess, private_orthanc: OrthancProcess
) -> None:
    """GET / on the public listener: a plain page to /upload, under the pages' CSP."""
    answer = httpx.get(f"{intake.url}/")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert 'href="upload"' in answer.text
    for secret in (private_orthanc.url, str(private_orthanc.port), private_orthanc.name):
        assert secret not in answer.text
    assert "1.10" not in answer.text  # no Orthanc version either


def test_the_admin_listener_root_points_to_its_openapi_docs(intake: IntakeProcess) -> None:
    """GET / on the admin listener names the OpenAPI description, which is really there."""
    answer = httpx.get(f"{intake.admin_url}/")
    assert answer.status_code == 200, answer.text
    pointer = answer.json()
    assert httpx.get(f"{intake.admin_url}{pointer['openapi']}").json()["info"]["title"]
    assert httpx.get(f"{intake.admin_url}{pointer['docs']}").status_code == 200
