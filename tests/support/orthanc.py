"""Real Debian Orthanc processes for tests: one per instance, loopback, its own storage.

Facts about Debian's Orthanc 1.10.1 that shape this module:

- It has no bind-address option: the HTTP server listens on *all* interfaces, and
  ``"RemoteAccessAllowed": false`` only makes it refuse requests that do not come from
  localhost. Tests talk to ``127.0.0.1`` only, and a free port is checked on every
  interface before it is used.
- Without ``--logfile``/``--logdir`` it logs to stderr; stdout and stderr both go to
  ``workdir/orthanc.log`` (appended across restarts), which also keeps whatever the
  process prints when it crashes.
- A port already taken makes it exit at start-up (status 255, "already in use"); an
  automatically chosen port is then replaced and the start retried.
- SIGTERM takes about two seconds (the HTTP server stops on a poll).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx

__all__ = ["ORTHANC_BINARY", "OrthancProcess", "OrthancStartError", "free_port"]

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
_LOOPBACK = "127.0.0.1"
_POLL_SECONDS = 0.05
_STOP_TIMEOUT_SECONDS = 20.0
_KILL_TIMEOUT_SECONDS = 10.0
_PORT_ATTEMPTS = 3
_PORT_IN_USE = "already in use"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class OrthancStartError(RuntimeError):
    """Orthanc exited or did not answer ``GET /system`` in time; carries the log tail."""


def free_port() -> int:
    """Return a TCP port that is free on loopback and on every interface.

    Orthanc 1.10.1 binds all interfaces, so a port free on 127.0.0.1 alone is not enough.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((_LOOPBACK, 0))
            port: int = probe.getsockname()[1]
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as wide,
            contextlib.suppress(OSError),
        ):
            wide.bind(("0.0.0.0", port))  # never listens: only checks the port is free
            return port
    raise OrthancStartError("no free TCP port found on 127.0.0.1")


def refusing_uploads(folder: Path) -> Path:
    """A Lua script for ``LuaScripts``: Orthanc answers every ``POST /instances`` 403."""
    script = folder / "refuse-uploads.lua"
    script.write_text(
        "function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n"
        "  return not (method == 'POST' and uri == '/instances')\n"
        "end\n"
    )
    return script


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL Orthanc if the test process dies first."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class OrthancProcess:
    """A real Debian Orthanc on a free loopback port with its own temp storage."""

    workdir: Path
    name: str = "private"
    username: str = "orthanc-admin"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_config: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _returncode: int | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{_LOOPBACK}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process (negative: killed by that signal), else None."""
        if self._process is not None:
            return self._process.poll()
        return self._returncode

    def config(self) -> dict[str, Any]:
        """Return the JSON configuration written at start."""
        storage = self.workdir / "storage"
        return {
            "Name": self.name,
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [],
            "OverwriteInstances": False,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
            "HttpTimeout": 60,
            "OrthancPeers": self.peers,
            "StableAge": 1,
            **self.extra_config,
        }

    def start(self, timeout: float = 30) -> None:
        """Start Orthanc and return once ``GET /system`` answers 200 with our name."""
        if self._process is not None and self._process.poll() is None:
            raise OrthancStartError(f"Orthanc {self.name!r} is already running")
        self._discard_process()
        auto_port = self.port == 0
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if auto_port:
                self.port = free_port()
            try:
                self._start_once(timeout)
            except OrthancStartError:
                port_taken = _PORT_IN_USE in self._log_tail()
                if auto_port and port_taken and attempt < _PORT_ATTEMPTS:
                    continue
                if auto_port:
                    self.port = 0
                raise
            return

    def stop(self) -> None:
        """SIGTERM, wait up to 20 s, then SIGKILL. Safe to call when not running."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_KILL_TIMEOUT_SECONDS)
        self._discard_process()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=_KILL_TIMEOUT_SECONDS)
        self._discard_process()

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the process to exit; its status, or None if running."""
        if self._process is None:
            return self._returncode
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def restart(self, timeout: float = 30) -> None:
        """Stop (if running) and start again on the same port and storage."""
        self.stop()
        self.start(timeout)

    def is_alive(self) -> bool:
        """True when the process runs and ``GET /system`` answers 200."""
        if self._process is None or self._process.poll() is not None:
            return False
        try:
            with self.client() as client:
                return client.get("/system", timeout=5).status_code == httpx.codes.OK
        except httpx.HTTPError:
            return False

    def client(self, timeout: float = 60) -> httpx.Client:
        """An httpx client on this Orthanc with its basic auth; close it (use ``with``)."""
        return httpx.Client(base_url=self.url, auth=(self.username, self.password), timeout=timeout)

    def upload(self, data: bytes) -> httpx.Response:
        """``POST /instances`` with a raw Part 10 body; the answer is not checked."""
        with self.client() as client:
            return client.post("/instances", content=data)

    def instances(self) -> list[str]:
        with self.client() as client:
            response = client.get("/instances")
        response.raise_for_status()
        ids: list[str] = response.json()
        return ids

    def load(self, files: list[bytes]) -> tuple[str, dict[str, bytes]]:
        """Upload one study's files; its study ID and each instance ID → its bytes."""
        by_id: dict[str, bytes] = {}
        study = ""
        for data in files:
            answer = self.upload(data)
            assert answer.status_code == 200, answer.text
            by_id[answer.json()["ID"]] = data
            study = answer.json()["ParentStudy"]
        return study, by_id

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored file, byte for byte."""
        with self.client() as client:
            response = client.get(f"/instances/{orthanc_id}/file")
        response.raise_for_status()
        return response.content

    def push_to_peer(
        self, peer: str, resources: list[str], compress: bool = False, timeout: float = 120
    ) -> httpx.Response:
        """Run a synchronous store job to ``peer``; the answer is not checked."""
        body = {"Resources": resources, "Synchronous": True, "Compress": compress}
        with self.client(timeout=timeout) as client:
            return client.post(f"/peers/{peer}/store", json=body)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_once(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [str(ORTHANC_BINARY), str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_die_with_parent,  # pytest runs single-threaded here
        )
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / _POLL_SECONDS) + 1):
            if self._process.poll() is not None:
                code = self._process.returncode
                self._discard_process()
                raise OrthancStartError(
                    f"Orthanc {self.name!r} exited with {code} at start:\n{self._log_tail()}"
                )
            if self._answers_as_us():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_SECONDS)
        self.kill()
        raise OrthancStartError(
            f"Orthanc {self.name!r} did not answer within {timeout} s:\n{self._log_tail()}"
        )

    def _answers_as_us(self) -> bool:
        """True when our own Orthanc (not another one on a reused port) answers /system."""
        try:
            with self.client(timeout=2) as client:
                response = client.get("/system")
        except httpx.HTTPError:
            return False
        return response.status_code == httpx.codes.OK and response.json().get("Name") == self.name

    def _discard_process(self) -> None:
        if self._process is not None:
            self._returncode = self._process.poll()
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
