"""For modules whose tests take the default settings: ``intake``, ``site`` and ``admin``
that give the module's shared intake per backend (tests/conftest.py ``shared_intake``)
and a site and an admin of the test's own, so the tests stay independent.

    intake, site, admin = shared_intake_fixtures()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.support.intake import Admin, IntakeProcess, Site


def shared_intake_fixtures() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    @pytest.fixture
    def intake(shared_intake: IntakeProcess) -> IntakeProcess:
        return shared_intake

    @pytest.fixture
    def site(fresh_site: Site) -> Site:
        return fresh_site

    @pytest.fixture
    def admin(fresh_admin: Admin) -> Admin:
        return fresh_admin

    return intake, site, admin
