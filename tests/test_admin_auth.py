"""The admin listener: who gets in, how cheaply, and what it never exposes."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.conftest import SQLITE_ONLY
from tests.support.intake import Admin, IntakeProcess, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.shared import shared_intake_fixtures

# Default settings: the module's shared intake, a site and an admin per test.
intake, site, admin = shared_intake_fixtures()


def test_admin_routes_need_credentials(intake: IntakeProcess, admin: Admin) -> None:
    with intake.admin_client() as anonymous:
        response = anonymous.get("/api/sites")
    assert response.status_code == 401
    # Bearer, not Basic: a browser never prompts, so it never keeps an admin's password.
    assert response.headers["www-authenticate"].startswith("Bearer realm=")
    assert set(response.json()) == {"error", "detail"}


def test_bearer_token_and_basic_password_both_work(intake: IntakeProcess, admin: Admin) -> None:
    with intake.admin_client(admin) as bearer:
        assert bearer.get("/api/sites").status_code == 200
    with intake.admin_client(admin, basic=True) as basic:
        assert basic.get("/api/sites").status_code == 200


def test_wrong_password_and_revoked_token_are_refused(intake: IntakeProcess, admin: Admin) -> None:
    wrong = Admin(admin.name, "not the password at all", admin.token)
    with intake.admin_client(wrong, basic=True) as client:
        assert client.get("/api/sites").status_code == 401
    prefix = admin.token[:10]
    assert intake.cli("admins", "token", admin.name, "--revoke", prefix).returncode == 0
    with intake.admin_client(admin) as client:
        # A token's lookup is cached for AUTH_CACHE_SECONDS (5 s by default).
        wait_until(lambda: client.get("/api/sites").status_code == 401, timeout=10)


def test_openapi_documents_the_admin_api_with_error_shapes(intake: IntakeProcess) -> None:
    schema = httpx.get(f"{intake.admin_url}/openapi.json").json()
    assert schema["info"]["title"] == "Orthanc Intake admin API"
    assert "ErrorBody" in schema["components"]["schemas"]


def test_no_admin_route_answers_on_the_public_listener(intake: IntakeProcess, admin: Admin) -> None:
    schema = httpx.get(f"{intake.admin_url}/openapi.json").json()
    paths = [p for p in schema["paths"] if "{" not in p]
    assert len(paths) >= 3
    headers = {"Authorization": f"Bearer {admin.token}"}
    for path in [*paths, "/openapi.json", "/docs"]:
        response = httpx.get(f"{intake.url}{path}", headers=headers)
        assert response.status_code in (401, 404, 405), path


@SQLITE_ONLY  # the listener's address check, before any database work
def test_admin_allow_list_refuses_other_addresses(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    """With ADMIN_ALLOWED_CIDRS set, the right token from elsewhere gets 403."""
    intake = make_intake(private_orthanc, admin_allowed_cidrs="127.0.0.2/32")
    admin = intake.add_admin()
    headers = {"Authorization": f"Bearer {admin.token}"}

    def get(source: str) -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, headers=headers, timeout=30) as client:
            return client.get(f"{intake.admin_url}/api/sites")

    assert get("127.0.0.2").status_code == 200
    refused = get("127.0.0.3")
    assert refused.status_code == 403
    assert refused.json()["error"] == "admin_address_not_allowed"
    assert httpx.get(f"{intake.admin_url}/healthz").status_code == 200
