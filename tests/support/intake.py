"""The intake as a real process: `python -m app serve` on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

import httpx
from sqlalchemy.orm import Session

from app.access import admins, sites
from app.db import migrations
from app.db.sessions import make_engine, make_sessionmaker
from tests.support import leaks
from tests.support.orthanc import OrthancProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
# Logged by the forwarder's own process, or by the service when it runs the forwarder.
_FORWARDER_STARTED = re.compile(r"forwarder (process \d+ )?started")


class IntakeStartError(RuntimeError):
    pass


@dataclass
class Site:
    name: str
    token: str
    peer: dict[str, Any]
    peer_bearer: dict[str, Any]


@dataclass
class Admin:
    name: str
    password: str
    token: str


@dataclass
class IntakeProcess:
    workdir: Path
    database_url: str
    orthanc: OrthancProcess | None = None
    env_extra: dict[str, str] = field(default_factory=dict)
    public_port: int = 0
    admin_port: int = 0
    _proc: subprocess.Popen[bytes] | None = None
    _log_offset: int = 0

    @property
    def url(self) -> str:
        scheme = "https" if "INTAKE_TLS_CERTFILE" in self.env_extra else "http"
        return f"{scheme}://127.0.0.1:{self.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def log_path(self) -> Path:
        return self.workdir / "intake.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
        env.update(
            {
                # A home of its own: a developer's var/intake.env never reaches a test.
                "INTAKE_HOME": str(self.workdir),
                "INTAKE_DATABASE_URL": self.database_url,
                "INTAKE_SPOOL_DIR": str(self.spool),
                "INTAKE_PUBLIC_HOST": "127.0.0.1",
                "INTAKE_PUBLIC_PORT": str(self.public_port),
                "INTAKE_ADMIN_PORT": str(self.admin_port),
                "INTAKE_SPOOL_MIN_FREE_BYTES": "0",
                "INTAKE_FORWARD_RETRY_BASE_SECONDS": "0.2",
                "INTAKE_FORWARD_RETRY_MAX_SECONDS": "1",
                "INTAKE_FORWARD_POLL_SECONDS": "0.5",
                "INTAKE_VALIDATION_WORKERS": "1",
                "INTAKE_LOG_LEVEL": "DEBUG",
                # Every warning shown, once per place (DeprecationWarning and ResourceWarning
                # too), by the service and the processes it starts: one in its log fails the
                # test (tests/conftest.py), as pyproject.toml's "error" does in the tests'
                # own process. Not "error": a warning raised where a broad `except` logs and
                # carries on would go unseen, and the service would not run as it does in
                # production. The one exception: multiprocessing's resource tracker outlives
                # a service the test kills (SIGKILL, as a crash) and says it cleans up the
                # semaphores the dead process held, which is what it is there for.
                "PYTHONWARNINGS": (
                    "default,ignore:resource_tracker:UserWarning:multiprocessing.resource_tracker"
                ),
            }
        )
        if self.orthanc is not None:
            env["INTAKE_ORTHANC_URL"] = self.orthanc.url
            env["INTAKE_ORTHANC_USERNAME"] = self.orthanc.username
            env["INTAKE_ORTHANC_PASSWORD"] = self.orthanc.password
        else:
            env["INTAKE_ORTHANC_URL"] = f"http://127.0.0.1:{free_port()}"
        env.update(self.env_extra)
        return env

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app", *args],
            env=self.env(),
            cwd=ROOT,
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    @property
    def peer_url(self) -> str:
        """The URL `sites add` prints for this intake (Settings.peer_url)."""
        public_url = self.env_extra.get("INTAKE_PUBLIC_URL")
        return public_url.rstrip("/") + "/" if public_url else f"{self.url}/"

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session on this intake's database, migrated first (as `serve` does)."""
        migrations.upgrade(self.database_url)
        engine = make_engine(self.database_url)
        try:
            with make_sessionmaker(engine)() as session:
                yield session
        finally:
            engine.dispose()

    def add_site(self, name: str) -> Site:
        """A site and its first token, through the domain layer the CLI calls (`sites.add`):
        in-process, a second each cheaper than a CLI process. tests/test_cli.py tests the CLI."""
        days = float(self.env_extra.get("INTAKE_TOKEN_LIFETIME_DAYS", "365"))
        with self.session() as session:
            created = sites.add(session, name, None, timedelta(days=days))
        leaks.remember_secret(created.token)
        peers = sites.site_snippets(self.peer_url, created.site, created.token)
        return Site(
            created.site, created.token, peers["orthanc_peer"], peers["orthanc_peer_bearer"]
        )

    def add_admin(self, name: str = "admin", password: str = "a long admin password") -> Admin:
        """An admin account and a Bearer token for it (the PHP app's way in), in-process."""
        with self.session() as session:
            admins.add(session, name, password)
            token = admins.issue_token(session, name).token
        leaks.remember_secret(password)
        leaks.remember_secret(token)
        return Admin(name, password, token)

    def admin_client(self, admin: Admin | None = None, *, basic: bool = False) -> httpx.Client:
        """A client on the admin listener: Bearer token by default, or Basic, or none."""
        headers: dict[str, str] = {}
        auth: tuple[str, str] | None = None
        if admin is not None and basic:
            auth = (admin.name, admin.password)
        elif admin is not None:
            headers["Authorization"] = f"Bearer {admin.token}"
        return httpx.Client(base_url=self.admin_url, auth=auth, headers=headers, timeout=60)

    def start(self, timeout: float = 60) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        leaks.remember_log(self.log_path)
        if self.orthanc is not None:
            leaks.remember_secret(self.orthanc.password)
        # A port chosen here can be taken before the intake binds it (by any outgoing
        # connection's ephemeral port): then choose again, as tests.support.orthanc does.
        choose = not self.public_port, not self.admin_port
        for attempt in range(3):
            if choose[0]:
                self.public_port = free_port()
            if choose[1]:
                self.admin_port = free_port()
            try:
                self._start_once(timeout)
                return
            except IntakeStartError as exc:
                if attempt == 2 or not any(choose) or "address already in use" not in str(exc):
                    raise

    def _start_once(self, timeout: float) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            env=self.env(),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise IntakeStartError(f"intake exited {self._proc.returncode}:\n{self.log_tail()}")
            # Up once it answers and its forwarder runs (its own process starts beside
            # the listeners): a test then meets neither a 503 /readyz nor its start-up.
            started = _FORWARDER_STARTED.search(self._log_since(offset)) is not None
            try:
                if started and httpx.get(f"{self.admin_url}/healthz", timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise IntakeStartError(f"intake did not answer in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def forwarder_pids(self) -> list[int]:
        """The service's forwarder processes (``python -m app.forwarding.process``)."""
        return [pid for pid in children(self.pid) if b"app.forwarding.process" in _cmdline(pid)]

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _log_since(self, offset: int) -> str:
        """What this start wrote to the (appended) log: not the whole file every poll."""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def client(self, site: Site | None = None, **kwargs: Any) -> httpx.Client:
        auth = (site.name, site.token) if site else None
        return httpx.Client(base_url=self.url, auth=auth, timeout=60, **kwargs)

    def upload(self, site: Site, data: bytes, **kwargs: Any) -> httpx.Response:
        with self.client(site) as client:
            return client.post("/instances", content=data, **kwargs)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def children(pid: int | None) -> list[int]:
    """The processes ``pid`` started (from /proc); none for a process that is not running."""
    found: list[int] = []
    if pid is None:
        return found
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in tasks.read_text().split()]
    return found


def is_alive(pid: int) -> bool:
    """Running, or stopped: neither gone nor a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def peak_rss(pid: int) -> int:
    """A process's high-water mark of resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def current_rss(pid: int) -> int:
    """Resident memory now (VmRSS), in bytes; 0 when the process is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Start VmHWM afresh from the current RSS (Linux 4.0+, clear_refs 5); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def wait_until(condition: Any, timeout: float = 60, interval: float = 0.2) -> Any:
    """Poll ``condition()`` until it returns something truthy, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
