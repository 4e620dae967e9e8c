"""The image, really built and run: the Dockerfile built with podman, started against the
suite's real Orthanc on the host, an upload forwarded; its HEALTHCHECK, its secret files,
its user.

Base images cannot be pulled here, so this build (and only this build) puts a stand-in in
place of ``python:3.11-slim-bookworm``: Debian bookworm with Debian's Python, made by
scripts/image-base.sh and cached under /var/cache/orthanc-intake. It is substituted for
that name with ``podman build --build-context``; the Dockerfile is built as it stands. The
build's package index is this machine's pip configuration, handed over as the build secret
``pip.conf`` (``_pip_conf``), as docs/DEPLOYMENT.md describes for any build.

podman runs the way this machine needs it (runc, host networking, explicit ulimits), the
container the way deploy/compose.yml runs the intake: read-only root filesystem with a
tmpfs on /tmp, no capabilities, no new privileges, secrets as read-only files under
/run/secrets. With host networking, both listeners are bound to 127.0.0.1 (the image binds
0.0.0.0 for Docker's port mapping, which must never meet ``--network host``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support import leaks
from tests.support.intake import wait_until
from tests.support.orthanc import OrthancProcess, free_port
from tests.support.studies import make_study

pytestmark = [pytest.mark.image, pytest.mark.orthanc]

ROOT = Path(__file__).resolve().parent.parent
BASE = "python:3.11-slim-bookworm"  # what scripts/image-base.sh stands in for
UID = 10001
# Root's podman (the suite's other system parts need root too; CI runs as root).
PODMAN = [*([] if os.geteuid() == 0 else ["sudo", "-n"]), "podman", "--runtime", "runc"]
LIMITS = ["--network", "host", "--ulimit", "nofile=10000:10000", "--ulimit", "nproc=4096:4096"]
# The parts of a pip configuration that say where packages come from and how to reach
# them. Local paths (file: indexes, find-links, constraint files, a cert file) name this
# host's disk, which the build cannot see: the stand-in carries this host's CA bundle.
PIP_KEYS = (
    "index-url",
    "extra-index-url",
    "trusted-host",
    "timeout",
    "default-timeout",
    "retries",
    "proxy",
)
PIP_URL_KEYS = ("index-url", "extra-index-url")
# pip's own precedence: the environment over an install section over the global one.
PIP_SECTIONS = ("global", "install", ":env:")
# A fixed line in the build's pip.conf: podman's layer cache ignores a secret's content,
# so a layer that once copied the file would keep an earlier run's copy.
PIP_CONF_MARKER = "# orthanc-intake tests/test_image.py: this line must reach no file of the image"


def _podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args[:2])} exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def _pip_conf() -> str:
    """This machine's pip configuration (``pip config list``: its files and ``PIP_*``), the
    keys a build can use, as one pip.conf."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    values: dict[tuple[str, str], str] = {}
    for line in listed.stdout.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        values[section, key] = ast.literal_eval(value)  # pip prints each value's repr
    lines = ["[global]"]
    for key in PIP_KEYS:
        value = next((values[s, key] for s in reversed(PIP_SECTIONS) if (s, key) in values), "")
        if key in PIP_URL_KEYS:
            value = " ".join(u for u in value.split() if urlsplit(u).scheme in ("http", "https"))
        if value:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def _dockerfile_bases() -> set[str]:
    """The images the Dockerfile's stages start from."""
    bases = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            bases.add(words[1])
    return bases


@pytest.fixture(scope="module")
def pip_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build secret ``pip.conf``, with a marker that must never reach the image."""
    path = tmp_path_factory.mktemp("image-build") / "pip.conf"
    path.touch(mode=0o600)
    path.write_text(f"{PIP_CONF_MARKER}\n{_pip_conf()}")
    return path


@pytest.fixture(scope="module")
def image(pip_conf: Path) -> str:
    """The Dockerfile built on the stand-in base, by image ID: no tag that another
    checkout's run could move. podman's layer cache makes unchanged steps free, and
    scripts/image-base.sh caches the stand-in itself."""
    assert _dockerfile_bases() == {BASE}, f"the stand-in replaces {BASE} only"
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image-base.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert made.returncode == 0, made.stderr[-4000:]
    stand_in = made.stdout.split()[-1]
    iidfile = pip_conf.with_name("image-id")
    _podman(
        "build",
        "--pull=never",
        *LIMITS,
        # Docker's image format: the OCI one has no HEALTHCHECK (podman drops it).
        "--format",
        "docker",
        "--build-context",
        f"{BASE}=container-image://{stand_in}",
        "--secret",
        f"id=pip.conf,src={pip_conf}",
        "--iidfile",
        str(iidfile),
        str(ROOT),
        timeout=1200,
    )
    return iidfile.read_text().strip().removeprefix("sha256:")


@dataclass
class Container:
    name: str
    public_port: int
    admin_port: int
    log_path: Path
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def exec(
        self, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        return _podman("exec", *flags, self.name, *argv, check=False)

    def inspect(self) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(_podman("container", "inspect", self.name).stdout)
        return found[0]

    def logs(self) -> str:
        done = _podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def ready(self) -> bool:
        """``/readyz`` answers 200: database, Orthanc (with the password), spool, forwarder."""
        state = self.inspect()["State"]
        assert state["Running"], f"the container exited {state['ExitCode']}:\n{self.logs()[-4000:]}"
        try:
            return httpx.get(f"{self.admin_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def remove(self) -> None:
        self.log_path.write_text(self.logs())
        _podman("rm", "--force", "--time", "0", "--volumes", self.name, check=False)


def _secret_file(folder: Path, name: str, value: str, mode: int) -> Path:
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / name
    path.write_text(value)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def run_container(
    image: str, private_orthanc: OrthancProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Container]]:
    """Start containers of the image on the host's private Orthanc, removed at the end;
    their logs are kept and searched for secrets with the suite's other logs."""
    made: list[Container] = []

    def run(password_mode: int = 0o444, wait: bool = True) -> Container:
        folder = tmp_path_factory.mktemp("container")
        container = Container(
            name=f"intake-test-{uuid.uuid4().hex[:12]}",
            public_port=free_port(),
            admin_port=free_port(),
            log_path=folder / "container.log",
            secrets={"orthanc": private_orthanc.password, "webhook": secrets.token_urlsafe(24)},
        )
        for value in container.secrets.values():
            leaks.remember_secret(value)
        leaks.remember_log(container.log_path)
        files = {
            "orthanc_password": (container.secrets["orthanc"], password_mode),
            "webhook_secret": (container.secrets["webhook"], 0o444),
        }
        mounts = [
            f"--volume={_secret_file(folder / 'secrets', name, value, mode)}:/run/secrets/{name}:ro"
            for name, (value, mode) in files.items()
        ]
        env = {
            "INTAKE_PUBLIC_HOST": "127.0.0.1",
            "INTAKE_ADMIN_HOST": "127.0.0.1",
            "INTAKE_PUBLIC_PORT": str(container.public_port),
            "INTAKE_ADMIN_PORT": str(container.admin_port),
            "INTAKE_ORTHANC_URL": private_orthanc.url,
            "INTAKE_ORTHANC_USERNAME": private_orthanc.username,
            "INTAKE_ORTHANC_PASSWORD_FILE": "/run/secrets/orthanc_password",
            "INTAKE_WEBHOOK_SECRET_FILE": "/run/secrets/webhook_secret",
            "INTAKE_FORWARD_POLL_SECONDS": "0.5",
        }
        _podman(
            "run",
            "--detach",
            "--name",
            container.name,
            *LIMITS,
            # As deploy/compose.yml runs it (Docker's read_only puts no tmpfs on /run).
            "--read-only",
            "--read-only-tmpfs=false",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            *[f"--env={key}={value}" for key, value in env.items()],
            *mounts,
            image,
        )
        made.append(container)
        if wait:
            wait_until(container.ready, timeout=60)
        return container

    yield run
    for container in made:
        container.remove()


@pytest.fixture(scope="module")
def container(run_container: Callable[..., Container]) -> Container:
    """One running container for the tests that only look at it."""
    return run_container()


def test_the_service_and_all_its_processes_run_as_uid_10001(
    image: str, container: Container
) -> None:
    """The image's USER is 10001:10001, and so is every process in the container."""
    user = _podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert user == f"{UID}:{UID}"
    assert container.exec("cat", "/proc/1/cmdline").stdout.split("\0")[-3:-1] == [
        "/opt/venv/bin/orthanc-intake",
        "serve",
    ]
    done = container.exec("sh", "-c", "grep -h -e ^Uid: -e ^Gid: /proc/[0-9]*/status")
    assert done.returncode == 0, done.stderr
    assert {tuple(line.split()[1:]) for line in done.stdout.splitlines()} == {(str(UID),) * 4}


def test_code_and_environment_belong_to_root_and_data_to_the_service(
    container: Container,
) -> None:
    """The service can read its code and virtual environment, not change them; /data
    (the database and the spool, a volume) is its own and closed to others."""
    writable = container.exec(
        "find",
        "/opt/orthanc-intake",
        "/opt/venv",
        "!",
        "-type",
        "l",
        "(",
        "!",
        "-user",
        "0",
        "-o",
        "-perm",
        "-g+w",
        "-o",
        "-perm",
        "-o+w",
        ")",
    )
    assert (writable.returncode, writable.stdout) == (0, ""), writable.stderr
    data = container.exec("stat", "-c", "%u:%g %a", "/data", "/data/spool", "/data/intake.db")
    owners, modes = zip(*(line.split() for line in data.stdout.splitlines()), strict=True)
    assert owners == (f"{UID}:{UID}",) * 3
    assert modes[0] == "750"


def test_an_upload_is_forwarded_to_the_orthanc_on_the_host(
    container: Container, private_orthanc: OrthancProcess
) -> None:
    """A site made with the image's own command uploads; the file reaches Orthanc intact."""
    name = f"site-{uuid.uuid4().hex[:8]}"
    made = container.exec("orthanc-intake", "sites", "add", name, "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    leaks.remember_secret(token)
    [data] = make_study(n_series=1, per_series=1)
    response = httpx.post(f"{container.url}/instances", content=data, auth=(name, token))
    assert response.status_code == 200, response.text
    assert response.json()["Status"] == "Success"
    orthanc_id = response.json()["ID"]
    wait_until(lambda: orthanc_id in private_orthanc.instances(), timeout=30)
    assert private_orthanc.instance_file(orthanc_id) == data


def test_secrets_come_from_files_only(container: Container) -> None:
    """The Orthanc password reaches the service through its file (/readyz, which needs
    Orthanc to accept it, passed), never through the environment or the container's
    configuration."""
    config = json.dumps(container.inspect())
    environ = container.exec("cat", "/proc/1/environ").stdout
    for value in container.secrets.values():
        assert value not in config
        assert value not in environ
    names = {item.split("=", 1)[0] for item in environ.split("\0")}
    assert {"INTAKE_ORTHANC_PASSWORD_FILE", "INTAKE_WEBHOOK_SECRET_FILE"} <= names
    assert not names & {"INTAKE_ORTHANC_PASSWORD", "INTAKE_WEBHOOK_SECRET"}


def test_an_unreadable_secret_file_stops_the_start_and_says_which(
    run_container: Callable[..., Container],
) -> None:
    """A secret file the service's UID cannot read (0400, another owner) ends the start
    with the variable's name and the reason, not the value: why the guide says 0444."""
    container = run_container(password_mode=0o400, wait=False)
    state = wait_until(lambda: (s := container.inspect()["State"])["Status"] == "exited" and s)
    assert state["ExitCode"] != 0
    logs = container.logs()
    assert "INTAKE_ORTHANC_PASSWORD_FILE" in logs
    assert "Permission denied" in logs
    assert container.secrets["orthanc"] not in logs


def test_the_healthcheck_passes_on_a_live_service_and_fails_on_a_closed_port(
    image: str, container: Container
) -> None:
    """The image's HEALTHCHECK (kept: Docker's image format) reports healthy; its command
    exits non-zero when nothing answers on the admin port."""
    done = _podman("healthcheck", "run", container.name, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert container.inspect()["State"]["Health"]["Status"] == "healthy"
    check = json.loads(
        _podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout
    )
    assert check["Test"][0] == "CMD"
    closed = container.exec(*check["Test"][1:], env={"INTAKE_ADMIN_PORT": str(free_port())})
    assert closed.returncode == 1
    assert "Connection refused" in closed.stderr


def test_stop_ends_the_service_cleanly_within_the_grace_period(
    run_container: Callable[..., Container],
) -> None:
    """``podman stop`` sends the image's STOPSIGNAL (SIGTERM): the service stops its
    forwarder and exits 0, long before the grace period would end in SIGKILL."""
    container = run_container()
    started = time.monotonic()
    _podman("stop", "--time", "60", container.name, timeout=90)
    assert time.monotonic() - started < 30
    assert container.inspect()["State"]["ExitCode"] == 0
    assert re.search(r"forwarder process \d+ stopped", container.logs())


def test_the_build_pip_configuration_is_in_no_file_of_the_image(image: str) -> None:
    """The ``pip.conf`` build secret (it may hold an index's credentials) left nothing."""
    found = _podman(
        "run",
        "--rm",
        *LIMITS,
        "--user",
        "0",
        "--entrypoint",
        "grep",
        image,
        "-rlF",
        "--exclude-dir=proc",
        "--exclude-dir=sys",
        "--exclude-dir=dev",
        PIP_CONF_MARKER,
        "/",
        check=False,
    )
    assert (found.returncode, found.stdout) == (1, ""), found.stderr
