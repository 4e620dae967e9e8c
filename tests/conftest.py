"""Fixtures: real Orthanc processes, real intake processes, SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.db import migrations
from tests.support import leaks, postgres
from tests.support.intake import Admin, IntakeProcess, Site
from tests.support.orthanc import OrthancProcess

BACKENDS = ["sqlite", "postgresql"]
# For a test whose subject plays no part in the database (a listener, a page, a file system).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
# The same for a test on the module's shared intakes: only their SQLite instance (the same
# parameter, so the same cached intake as the module's tests on both backends use).
SHARED_SQLITE_ONLY = pytest.mark.parametrize("module_intakes", ["sqlite"], indirect=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: every test here uses real components. And no
    secret the suite handed out may appear in any intake log it produced.

    Under pytest-xdist (`make test` runs ``-n``) each worker searches the logs of the
    services it started and hands its findings to the controller (`workeroutput`), which
    judges the whole run here, as a run without workers judges its own."""
    config = session.config
    mine = leaks.SUITE.findings()  # warnings written after the last test: at shutdown
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller judges
        config.workeroutput["leaks"] = mine.as_dict()
        return
    _RUN_FINDINGS.add(mine)
    total = _RUN_FINDINGS
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped:
        if reporter:
            reporter.write_line(f"CI: {skipped} test(s) skipped; skips fail the run here", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if total.warned:
        if reporter:
            for line in total.warned:
                reporter.write_line(f"Python warning in a service log: {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if reporter and total.logs:
        reporter.write_line(
            f"secrets in logs: {len(total.found)} ({total.secrets} secrets, {total.logs} logs read)"
        )
    if total.found:
        if reporter:
            for line in total.found:
                reporter.write_line(f"secret leaked into a log: {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_RUN_FINDINGS = leaks.Findings()  # the workers' (pytest_testnodedown) and this process's


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """An xdist worker is done: keep what it found in its logs (see pytest_sessionfinish).
    A worker that died before its session ended sends nothing; xdist fails the run."""
    found = getattr(node, "workeroutput", {}).get("leaks")
    if found is not None:
        _RUN_FINDINGS.add(leaks.Findings(**found))


@pytest.fixture(autouse=True)
def _no_python_warnings_in_service_logs() -> Iterator[None]:
    """A test during which a service wrote a Python warning to its log fails."""
    yield
    found = leaks.SUITE.new_warnings()
    if found:
        pytest.fail("Python warnings in a service log:\n" + "\n".join(found), pytrace=False)


class Templates:
    """One database per backend migrated once per run by the real alembic migrations;
    each test gets a copy (a copied SQLite file, PostgreSQL's CREATE DATABASE … TEMPLATE),
    so a test pays no migration and every test still starts from the migrations' schema."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._urls: dict[str, str] = {}

    def url(self, backend: str) -> str:
        if backend not in self._urls:
            if backend == "sqlite":
                url = f"sqlite:///{self._folder / 'template.db'}"
            else:
                url = postgres.create_database()
            migrations.upgrade(url)
            self._urls[backend] = url
        return self._urls[backend]

    def copy(self, backend: str, folder: Path) -> str:
        template = self.url(backend)
        if backend != "sqlite":
            return postgres.create_database(template)
        target = folder / "intake.db"
        with (
            contextlib.closing(sqlite3.connect(template.removeprefix("sqlite:///"))) as src,
            contextlib.closing(sqlite3.connect(target)) as dst,
        ):
            src.backup(dst)  # the whole database, its WAL included
        return f"sqlite:///{target}"

    def drop_copy(self, backend: str, url: str) -> None:
        if backend != "sqlite":
            postgres.drop_database(url)

    def drop(self) -> None:
        for backend, url in self._urls.items():
            if backend != "sqlite":
                postgres.drop_database(url)


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Templates]:
    made = Templates(tmp_path_factory.mktemp("templates"))
    yield made
    made.drop()


@pytest.fixture(params=BACKENDS)
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, templates: Templates
) -> Iterator[str]:
    """A database at the newest schema on each backend in turn (a copy of the template)."""
    url = templates.copy(request.param, tmp_path)
    try:
        yield url
    finally:
        if request.param != "sqlite":
            postgres.drop_database(url)


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend in turn: for the migrations' own tests."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'intake.db'}"
        return
    url = postgres.create_database()
    try:
        yield url
    finally:
        postgres.drop_database(url)


@pytest.fixture(scope="session")
def private_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """One real private Orthanc for the session; tests that stop it use their own."""
    with OrthancProcess(tmp_path_factory.mktemp("private-orthanc"), name="private") as orthanc:
        yield orthanc


@pytest.fixture
def own_orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    """A private Orthanc this test may stop, kill and restart."""
    orthanc = OrthancProcess(tmp_path / "own-orthanc", name="private")
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.kill()  # its storage is thrown away: no clean shutdown to wait for


@pytest.fixture
def make_intake(database_url: str, tmp_path: Path) -> Iterator[Callable[..., IntakeProcess]]:
    """Build intake processes on this test's database; all are stopped at the end."""
    made: list[IntakeProcess] = []

    def make(orthanc: OrthancProcess | None, start: bool = True, **env: str) -> IntakeProcess:
        process = IntakeProcess(
            tmp_path / f"intake-{len(made)}",
            database_url,
            orthanc=orthanc,
            env_extra={f"INTAKE_{k.upper()}": v for k, v in env.items()},
        )
        made.append(process)
        if start:
            process.start()
        return process

    yield make
    for process in made:
        process.kill()


@pytest.fixture
def intake(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> IntakeProcess:
    return make_intake(private_orthanc)


ModuleIntakes = Callable[..., IntakeProcess]


@pytest.fixture(scope="module", params=BACKENDS)
def module_intakes(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    private_orthanc: OrthancProcess,
    templates: Templates,
) -> Iterator[ModuleIntakes]:
    """A module's shared intakes on one backend, one per set of settings:
    ``module_intakes(auth_cache_seconds="1")`` starts that intake on first use and hands
    the same one to every later test of the module that asks for those settings.
    ``orthanc=None`` gives one without an Orthanc (its forwards never arrive)."""
    made: dict[tuple[object, ...], tuple[IntakeProcess, str]] = {}

    def get(orthanc: OrthancProcess | None = private_orthanc, **env: str) -> IntakeProcess:
        key = (id(orthanc), *sorted(env.items()))
        if key not in made:
            workdir = tmp_path_factory.mktemp(f"module-intake-{request.param}")
            url = templates.copy(request.param, workdir)
            process = IntakeProcess(
                workdir / "intake",
                url,
                orthanc=orthanc,
                env_extra={f"INTAKE_{k.upper()}": v for k, v in env.items()},
            )
            made[key] = process, url
            process.start()
        return made[key][0]

    yield get
    for process, url in made.values():
        process.kill()
        templates.drop_copy(request.param, url)


@pytest.fixture(scope="module")
def shared_intake(module_intakes: ModuleIntakes) -> IntakeProcess:
    """One intake per backend for a module's tests that take the default settings; each
    test makes its own site (``fresh_site``), so they stay independent of each other."""
    return module_intakes()


@pytest.fixture
def fresh_site(shared_intake: IntakeProcess) -> Site:
    """A site of its own on the shared intake."""
    return shared_intake.add_site(f"site-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def fresh_admin(shared_intake: IntakeProcess) -> Admin:
    """An admin of its own on the shared intake."""
    return shared_intake.add_admin(f"admin-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def site(intake: IntakeProcess) -> Site:
    return intake.add_site("hospital-a")


@pytest.fixture
def admin(intake: IntakeProcess) -> Admin:
    return intake.add_admin()
