"""Fault injection for tests/test_faults.py, tests/test_kill_rounds.py and bench/kill_rounds.py.

- ``HttpProxy``: a small HTTP/1.1 proxy in a background thread, one request per
  connection. A policy decides, per request, to pass it on, to pass it on and answer
  late (a slow Orthanc: the answer comes after the client's timeout), or to answer
  itself (500/503 without asking the upstream). Every exchange is recorded, so the
  proxy is also a passive witness of what a client was really answered.
- ``PostgresCluster``: a private PostgreSQL cluster (initdb + pg_ctl as the postgres
  user) on a free loopback port, which a test may stop and start; the shared server
  on 5432 is never touched.
- ``tmpfs``: a small tmpfs mount (root only; a non-root run fails, it is not skipped).
- ``Attempt``, ``audit``, ``orthanc_contents``, ``upload_rows``: what was sent and
  answered, what Orthanc holds (SHA-256 of the bytes after the 128-byte preamble,
  which the intake zeroes), and what the intake's database says.
- ``run_kill_rounds``: SIGKILL the intake at seeded random moments while a real site
  Orthanc pushes to it (through the witness proxy) and scripted uploaders post.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import random
import re
import select as io_select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pydicom
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url

from app.db.models import Upload
from tests.support.intake import IntakeProcess, Site
from tests.support.loop_thread import LoopThread
from tests.support.orthanc import OrthancProcess, free_port
from tests.support.studies import make_study

PREAMBLE = 128
MIB = 1024 * 1024
_HEAD_LIMIT = 64 * 1024
_READ_CHUNK = 64 * 1024
_UPSTREAM_TIMEOUT = 300.0  # seconds a proxied request may take upstream, at the most


def require_root(what: str) -> None:
    """Fail (never skip: in CI a skip is a failure anyway) when not running as root."""
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root (mount, runuser); run the fault tests as root")


# --------------------------------------------------------------------------- the proxy


@dataclass(frozen=True)
class ProxyRequest:
    """One request as the proxy received it (body de-chunked)."""

    index: int  # order of arrival, from 0
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class Pass:
    """Forward the request and answer with the upstream's answer."""


@dataclass(frozen=True)
class Delay:
    """Forward the request at once, then hold the upstream's answer this long."""

    seconds: float


@dataclass(frozen=True)
class Answer:
    """Answer this status without asking the upstream (Orthanc's error shape)."""

    status: int
    message: str = "injected by the test proxy"


Action = Pass | Delay | Answer
Policy = Callable[[ProxyRequest], Action]


def pass_all(_request: ProxyRequest) -> Action:
    return Pass()


@dataclass(frozen=True)
class Exchange:
    request: ProxyRequest
    action: Action
    upstream_status: int | None  # None: not asked, unreachable, or died before answering
    status: int | None  # what the client was sent; None: the connection was just closed
    body: bytes  # the answer's body (de-chunked) when there was one
    encoding: str = ""  # the answer's Content-Encoding

    def json(self) -> Any:
        body = self.body
        try:
            if self.encoding in ("gzip", "x-gzip"):
                body = gzip.decompress(body)
            elif self.encoding == "deflate":
                body = zlib.decompress(body)
            return json.loads(body)
        except (ValueError, OSError, zlib.error):
            return None


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes | None:
    """The body framed by Content-Length or chunked encoding; None when neither says."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return None


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "transfer-encoding"}


def _head_bytes(first_line: str, headers: dict[str, str], body: bytes) -> bytes:
    kept = [f"{k}: {v}" for k, v in headers.items() if k not in _HOP_BY_HOP]
    kept = [h for h in kept if not h.startswith("content-length:")]
    kept += [f"content-length: {len(body)}", "connection: close"]
    return ("\r\n".join([first_line, *kept]) + "\r\n\r\n").encode("latin-1")


class HttpProxy(LoopThread):
    """An HTTP/1.1 proxy on 127.0.0.1 with a per-request policy, in a background thread.

    Each client connection carries one request; the answer says ``connection: close``.
    When the upstream dies mid-request (a SIGKILLed intake) the client's connection is
    closed without an answer, as the client would see it without the proxy.
    """

    thread_name = "http-proxy"

    def __init__(self, upstream_port: int, policy: Policy = pass_all) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.policy = policy
        self._exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._count = 0
        self._server: asyncio.Server | None = None

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        async with self._server:
            await self._stopping.wait()
        # Connections still being served (a delayed answer) are cut off, cleanly.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self._exchanges.append(exchange)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._one(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or spoke nonsense: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _HEAD_LIMIT:
            return
        first_line, headers = _parse_head(head[:-4])
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await _read_body(reader, headers) or b""
        method, path = first_line.split(" ")[:2]
        with self._lock:
            index = self._count
            self._count += 1
        request = ProxyRequest(index, method, path, headers, body)
        action = self.policy(request)
        if isinstance(action, Answer):
            payload = json.dumps(
                {
                    "HttpError": HTTPStatus(action.status).phrase,
                    "HttpStatus": action.status,
                    "Message": action.message,
                    "Method": method,
                    "Uri": path,
                }
            ).encode()
            writer.write(
                (
                    f"HTTP/1.1 {action.status} {HTTPStatus(action.status).phrase}\r\n"
                    "content-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
                ).encode()
                + payload
            )
            self._record(Exchange(request, action, None, action.status, payload))
            await writer.drain()
            return
        answered = await self._forward(first_line, headers, body)
        if answered is None:
            self._record(Exchange(request, action, None, None, b""))
            return  # closing the connection is all the client learns, as without us
        status, encoding, answer_head, answer_body = answered
        if isinstance(action, Delay):
            await asyncio.sleep(action.seconds)
        self._record(Exchange(request, action, status, status, answer_body, encoding))
        writer.write(answer_head + answer_body)
        await writer.drain()

    async def _forward(
        self, first_line: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes, bytes] | None:
        """The upstream's answer (status, encoding, head, de-chunked body); None if none."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 10
            )
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(_head_bytes(first_line, headers, body) + body)
            await writer.drain()
            return await asyncio.wait_for(self._read_answer(reader), _UPSTREAM_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        except ValueError:
            return None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bytes]:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, headers = _parse_head(head[:-4])
            status = int(status_line.split(" ")[1])
            if status >= 200:
                break  # (a 1xx interim answer is skipped)
        body = await _read_body(reader, headers)
        if body is None:
            body = await reader.read()  # framed by the end of the connection
        encoding = headers.get("content-encoding", "").lower()
        return status, encoding, _head_bytes(status_line, headers, body), body


class FirstN:
    """A policy: ``action`` for the first ``n`` requests that ``match``; Pass otherwise."""

    def __init__(self, n: int, action: Action, match: Callable[[ProxyRequest], bool]) -> None:
        self.n = n
        self.action = action
        self.match = match
        self.used = 0

    def __call__(self, request: ProxyRequest) -> Action:
        if self.used < self.n and self.match(request):
            self.used += 1
            return self.action
        return Pass()


def is_store(request: ProxyRequest) -> bool:
    """A ``POST /instances`` (what the forwarder and an Orthanc peer send)."""
    return request.method == "POST" and request.path.rstrip("/") == "/instances"


# --------------------------------------------------------------------------- PostgreSQL


class CommitTrap:
    """A TCP proxy in front of PostgreSQL that can lose the answer to one ``COMMIT``.

    Armed, the first connection that sends ``INSERT INTO uploads`` and then ``COMMIT``
    has its ``COMMIT`` passed to the server and answered there (the transaction is
    durable), and then both sides are cut before the answer reaches the client, which
    sees a lost connection: an ambiguous commit. With ``refuse_after``, new connections
    are then closed at once until ``refusing`` is cleared (the database "stays down").
    The traffic must be plain (``sslmode=disable``) for the trap to read it.
    """

    _COMMIT = b"COMMIT\x00"  # in a simple Query or a Parse message
    _READY = b"Z\x00\x00\x00\x05"  # ReadyForQuery: the server answered all of it

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.fired = 0
        self.refusing = False
        self._armed = False
        self._refuse_after = False
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()

    def arm(self, *, refuse_after: bool = False) -> None:
        with self._lock:
            self._armed = True
            self._refuse_after = refuse_after

    def url(self, database_url: str) -> str:
        """``database_url`` (on the upstream server) through the trap, in plain text."""
        return (
            make_url(database_url)
            .set(port=self.port, query={"sslmode": "disable", "gssencmode": "disable"})
            .render_as_string(hide_password=False)
        )

    def __enter__(self) -> CommitTrap:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, name="commit-trap", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        inserted = False
        with client, socket.create_connection(("127.0.0.1", self.upstream_port)) as server:
            while not self._stopping.is_set():
                ready, _, _ = io_select.select([client, server], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(_READ_CHUNK)
                    if not data:
                        return
                    if sock is server:
                        client.sendall(data)
                        continue
                    inserted = inserted or b"INSERT INTO uploads" in data
                    server.sendall(data)
                    if inserted and self._COMMIT in data and self._take():
                        self._swallow_answer(server)
                        return  # both sides closed: the client never hears of the COMMIT

    def _take(self) -> bool:
        with self._lock:
            if not self._armed:
                return False
            self._armed = False
            self.fired += 1
            self.refusing = self._refuse_after
            return True

    def _swallow_answer(self, server: socket.socket) -> None:
        server.settimeout(10)
        answer = b""
        while self._READY not in answer:
            chunk = server.recv(_READ_CHUNK)
            if not chunk:
                break
            answer += chunk


def _postgres_bin() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
    )
    if not found:
        pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin")
    return found[-1].parent


class PostgresCluster:
    """A private PostgreSQL cluster on a free loopback port, run as the postgres user.

    Its folder is made under the system temp folder (pytest's own tmp folders are
    private to root, which the postgres user cannot enter) and removed by ``destroy``.
    """

    def __init__(self) -> None:
        require_root("a private PostgreSQL cluster")
        self.bin = _postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="intake-faults-pg-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self._initialised = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done

    def start(self) -> None:
        if not self._initialised:
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            )
            self._initialised = True
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c max_connections=100"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients are disconnected; ``immediate``: as a crash (recovery at start)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        done = subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "status",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.returncode == 0

    def create_database(self, name: str = "intake") -> str:
        """Create a database; its SQLAlchemy URL (trust authentication: no password)."""
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name is ours
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        if self._initialised and self.data.exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if self.running():
                    self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- tmpfs


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` at ``path``; unmounted afterwards, whatever happens."""
    require_root("mounting a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, timeout=30, check=False)
        if done.returncode != 0:  # still busy: detach it now, gone when the last user closes
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=True)


def fill(path: Path, leave_free: int) -> int:
    """Write a filler file until its disk has about ``leave_free`` bytes free; its size."""
    block = bytes(MIB)
    written = 0
    with path.open("wb") as file:
        while (free := shutil.disk_usage(path.parent).free) > leave_free:
            chunk = block[: min(MIB, free - leave_free)]
            try:
                file.write(chunk)
                file.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
            written += len(chunk)
    return written


# --------------------------------------------------------------------------- accounting


def dataset_digest(data: bytes) -> str:
    """SHA-256 of a Part 10 file after its preamble (which the intake zeroes)."""
    return hashlib.sha256(data[PREAMBLE:]).hexdigest()


def sop_uid(data: bytes) -> str:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.SOPInstanceUID)


@dataclass(frozen=True)
class Attempt:
    """One upload as its sender saw it."""

    source: str  # "script" or "peer"
    sop_instance_uid: str
    digest: str  # dataset_digest of what was sent
    status: int | None  # None: no answer (connection refused or closed, timeout)
    receipt: str | None = None
    retry_after: str | None = None

    @property
    def acknowledged(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post(client: httpx.Client, data: bytes, source: str = "script") -> Attempt:
    """POST one file; whatever happens becomes an Attempt."""
    uid, digest = sop_uid(data), dataset_digest(data)
    try:
        answer = client.post("/instances", content=data)
    except httpx.HTTPError:
        return Attempt(source, uid, digest, None)
    receipt = None
    if answer.status_code == 200:
        with contextlib.suppress(ValueError):
            receipt = answer.json().get("IntakeReceipt")
    return Attempt(
        source, uid, digest, answer.status_code, receipt, answer.headers.get("retry-after")
    )


def peer_attempts(exchanges: list[Exchange]) -> list[Attempt]:
    """What an Orthanc peer was answered, per ``POST /instances``, seen by the witness proxy."""
    found = []
    for exchange in exchanges:
        if not is_store(exchange.request) or not exchange.request.body:
            continue
        data = exchange.request.body
        receipt = None
        answer = exchange.json()
        if isinstance(answer, dict):
            receipt = answer.get("IntakeReceipt")
        found.append(Attempt("peer", sop_uid(data), dataset_digest(data), exchange.status, receipt))
    return found


def orthanc_contents(orthanc: OrthancProcess) -> dict[str, str]:
    """SOP Instance UID → dataset_digest of the file Orthanc stores, for every instance."""
    contents: dict[str, str] = {}
    with orthanc.client(timeout=120) as client:
        listing = client.get("/instances", params={"expand": ""})
        listing.raise_for_status()
        for instance in listing.json():
            uid = instance["MainDicomTags"]["SOPInstanceUID"]
            stored = client.get(f"/instances/{instance['ID']}/file")
            stored.raise_for_status()
            contents[uid] = dataset_digest(stored.content)
    return contents


def orthanc_count(orthanc: OrthancProcess) -> int:
    with orthanc.client() as client:
        answer = client.get("/statistics")
    answer.raise_for_status()
    return int(answer.json()["CountInstances"])


@dataclass(frozen=True)
class Row:
    receipt: str
    state: str
    reason: str | None
    detail: str | None
    sop_instance_uid: str | None
    orthanc_status: str | None
    sha256: str | None
    spool_name: str | None


def upload_rows(database_url: str) -> list[Row]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                select(
                    Upload.receipt,
                    Upload.state,
                    Upload.reason,
                    Upload.detail,
                    Upload.sop_instance_uid,
                    Upload.orthanc_status,
                    Upload.sha256,
                    Upload.spool_name,
                ).order_by(Upload.id)
            ).all()
    finally:
        engine.dispose()
    return [Row(*(str(v) if v is not None else None for v in r)) for r in found]  # type: ignore[arg-type]


_FORWARDED = re.compile(r"\bforwarded receipt=(\w+) ")


def forwarded_lines(log_text: str) -> Counter[str]:
    """How many "forwarded receipt=…" lines the intake logged per receipt."""
    return Counter(_FORWARDED.findall(log_text))


@dataclass
class Audit:
    """Acknowledged uploads against what Orthanc holds."""

    attempts: int
    acknowledged: int  # distinct SOP instances that got a 2xx
    found: int  # ...of which Orthanc holds the same bytes
    lost: list[str]  # acknowledged, not in Orthanc
    corrupt: list[str]  # in Orthanc with other bytes than sent (acknowledged or not)
    unacknowledged_present: int  # never got a 2xx, yet fully and correctly in Orthanc
    unacknowledged_absent: int
    extra: list[str]  # in Orthanc, never sent by anyone here

    @property
    def ok(self) -> bool:
        return not self.lost and not self.corrupt and not self.extra

    def summary(self) -> str:
        return (
            f"attempts={self.attempts} acknowledged={self.acknowledged} found={self.found} "
            f"lost={len(self.lost)} corrupt={len(self.corrupt)} "
            f"unacknowledged: present={self.unacknowledged_present} "
            f"absent={self.unacknowledged_absent} extra={len(self.extra)}"
        )


def audit(attempts: list[Attempt], contents: dict[str, str]) -> Audit:
    sent: dict[str, str] = {}
    acked: set[str] = set()
    for attempt in attempts:
        sent[attempt.sop_instance_uid] = attempt.digest
        if attempt.acknowledged:
            acked.add(attempt.sop_instance_uid)
    corrupt = sorted(uid for uid, digest in contents.items() if uid in sent and sent[uid] != digest)
    found = {uid for uid in acked if contents.get(uid) == sent[uid]}
    unacked = set(sent) - acked
    return Audit(
        attempts=len(attempts),
        acknowledged=len(acked),
        found=len(found),
        lost=sorted(acked - set(contents)),
        corrupt=corrupt,
        unacknowledged_present=sum(1 for uid in unacked if contents.get(uid) == sent[uid]),
        unacknowledged_absent=sum(1 for uid in unacked if uid not in contents),
        extra=sorted(set(contents) - set(sent)),
    )


FIGURES_ENV = "INTAKE_FAULT_FIGURES"  # a JSON-lines file the figures are appended to


def record_figures(
    scenario: str,
    result: Audit,
    rows: list[Row],
    rounds: int = 1,
    extra: dict[str, object] | None = None,
) -> dict[str, object]:
    """One row of docs/RELIABILITY.md ("Faults"): printed, and appended to $INTAKE_FAULT_FIGURES.

    An acknowledged upload that Orthanc does not hold is lost unless a row of its SOP
    instance is quarantined with a reason that keeps the file for an admin
    (`spool_file_missing` says the bytes are gone: that counts as lost).
    """
    quarantined = {r.sop_instance_uid: r for r in rows if r.state == "quarantined" and r.reason}
    kept = {uid for uid, r in quarantined.items() if r.reason != "spool_file_missing"}
    figures: dict[str, object] = {
        "scenario": scenario,
        "attempts": result.attempts,
        "acknowledged": result.acknowledged,
        "found": result.found,
        "quarantined": dict(Counter(str(r.reason) for r in quarantined.values())),
        "lost": len([uid for uid in result.lost if uid not in kept]),
        "corrupt": len(result.corrupt),
        "unacknowledged_present": result.unacknowledged_present,
        "rounds": rounds,
        **(extra or {}),
    }
    line = json.dumps(figures, sort_keys=True)
    sys.stdout.write(f"figures: {line}\n")
    if path := os.environ.get(FIGURES_ENV):
        with open(path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
    return figures


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll until ``condition()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = condition()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


class Uploader:
    """Scripted uploads in a thread: each file once, in order, until told to stop."""

    def __init__(
        self, intake: IntakeProcess, site: Site, files: list[bytes], pause: float = 0.0
    ) -> None:
        self.files = files
        self.pause = pause
        self.attempts: list[Attempt] = []
        self.stopping = threading.Event()
        self._url = intake.url
        self._auth = (site.name, site.token)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self._url, auth=self._auth, timeout=60) as client:
            for data in self.files:
                if self.stopping.is_set():
                    return
                attempt = post(client, data)
                with self._lock:
                    self.attempts.append(attempt)
                if self.pause:
                    self.stopping.wait(self.pause)

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def done(self) -> int:
        with self._lock:
            return len(self.attempts)

    def stop(self, timeout: float = 120) -> list[Attempt]:
        self.stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"an uploader did not stop within {timeout}s")
        with self._lock:
            return list(self.attempts)

    def join(self, timeout: float = 300) -> list[Attempt]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"an uploader did not finish within {timeout}s")
        with self._lock:
            return list(self.attempts)


# --------------------------------------------------------------------------- kill rounds


@dataclass(frozen=True)
class KillConfig:
    rounds: int
    seed: int
    scripts: int = 3  # concurrent scripted uploaders
    files_per_script: int = 40  # at most, per round: they post until the kill
    peer_instances: int = 12  # per round, pushed by the site's Orthanc in one job
    kill_after: tuple[float, float] = (0.2, 2.5)  # seconds after the round's load starts
    settle_timeout: float = 240.0


@dataclass
class KillReport:
    config: KillConfig
    backend: str
    rounds_survived: int = 0
    busy_kills: int = 0  # rounds in which uploads were still in flight at the kill
    seconds: float = 0.0
    audit: Audit | None = None
    peer_attempts: int = 0
    script_attempts: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # "source status" → attempts
    states: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)  # by reason
    already_stored: int = 0  # forwarded rows Orthanc answered AlreadyStored (re-deliveries)
    forwarded_twice: list[str] = field(default_factory=list)  # receipts logged twice
    rows_missing: list[str] = field(default_factory=list)  # 2xx receipts without a row
    leftover_files: dict[str, int] = field(default_factory=dict)  # spool folder → count
    orphans_removed: int = 0  # queue/ files without a committed row, removed at start-up

    @property
    def ok(self) -> bool:
        return (
            self.audit is not None
            and self.audit.ok
            and self.rounds_survived == self.config.rounds
            and not self.quarantined
            and self.states.get("received", 0) == 0
            and self.states.get("queued", 0) == 0
            and not self.forwarded_twice
            and not self.rows_missing
            and not any(self.leftover_files.values())
        )

    def summary(self) -> str:
        audit = self.audit.summary() if self.audit else "no audit"
        return (
            f"kill rounds: backend={self.backend} seed={self.config.seed} "
            f"rounds={self.rounds_survived}/{self.config.rounds} busy_kills={self.busy_kills} "
            f"seconds={self.seconds:.0f} | {audit} | peer_attempts={self.peer_attempts} "
            f"script_attempts={self.script_attempts} statuses={dict(self.statuses)} "
            f"states={dict(self.states)} "
            f"quarantined={dict(self.quarantined)} already_stored={self.already_stored} "
            f"forwarded_twice={len(self.forwarded_twice)} rows_missing={len(self.rows_missing)} "
            f"leftover_files={self.leftover_files} orphans_removed={self.orphans_removed}"
        )


def _push(orthanc: OrthancProcess, study_id: str, results: list[int | None]) -> None:
    """The site's synchronous store job to the intake; its HTTP status (None: no answer)."""
    try:
        results.append(orthanc.push_to_peer("intake", [study_id], timeout=180).status_code)
    except httpx.HTTPError:
        results.append(None)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_kill_rounds(
    workdir: Path,
    database_url: str,
    config: KillConfig,
    log: Callable[[str], None] = _say,
) -> KillReport:
    """SIGKILL the intake at random moments under load, restart it, audit at the end.

    Each round: a new study is loaded into the site's Orthanc and pushed to the intake
    with ``/peers/intake/store`` (through a witness proxy that records each answer),
    while ``scripts`` threads post their own new files; after a seeded random delay the
    intake is SIGKILLed, the senders stop, and the intake is started again on the same
    database and spool. Nothing is ever sent twice, so a lost upload cannot be hidden
    by a later copy of it.
    """
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    report = KillReport(config, backend)
    rng = random.Random(config.seed)  # noqa: S311 - reproducible kill moments, not secrets
    log(f"kill rounds: seed={config.seed} rounds={config.rounds} backend={backend}")
    started = time.monotonic()
    private = OrthancProcess(workdir / "private-orthanc", name="private")
    # Start-up removes stale partial files and orphans at once (one process per spool).
    intake = IntakeProcess(
        workdir / "intake",
        database_url,
        orthanc=private,
        env_extra={"INTAKE_ORPHAN_GRACE_SECONDS": "0", "INTAKE_LOG_LEVEL": "INFO"},
    )
    witness: HttpProxy | None = None
    site_orthanc: OrthancProcess | None = None
    script_attempts: list[Attempt] = []
    try:
        private.start()
        intake.start()
        site = intake.add_site("kill-rounds")
        witness = HttpProxy(intake.public_port)
        witness.start()
        peer = {**site.peer, "Url": witness.url + "/"}
        site_orthanc = OrthancProcess(workdir / "site-orthanc", name="site", peers={"intake": peer})
        site_orthanc.start()
        for number in range(1, config.rounds + 1):
            delay = rng.uniform(*config.kill_after)
            study = make_study(n_series=1, per_series=config.peer_instances)
            study_id = ""
            for data in study:
                loaded = site_orthanc.upload(data)
                loaded.raise_for_status()
                study_id = loaded.json()["ParentStudy"]
            scripts = [
                Uploader(intake, site, make_study(1, config.files_per_script)).start()
                for _ in range(config.scripts)
            ]
            pushed: list[int | None] = []
            pusher = threading.Thread(
                target=_push, args=(site_orthanc, study_id, pushed), name="peer-push", daemon=True
            )
            pusher.start()
            time.sleep(delay)
            busy = pusher.is_alive() or any(s.done() < len(s.files) for s in scripts)
            report.busy_kills += busy
            pid = intake.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            for script in scripts:  # told at once: their next post would only be refused
                script.stopping.set()
            intake.kill()  # reaps it
            for script in scripts:
                script_attempts += script.stop()
            pusher.join(240)
            if pusher.is_alive():
                raise AssertionError("the site's push job did not end within 240s")
            intake.start(timeout=120)
            report.rounds_survived += 1
            log(
                f"round {number}/{config.rounds}: killed after {delay:.2f}s "
                f"({'busy' if busy else 'idle'}); push answered {pushed}; "
                f"script attempts so far {len(script_attempts)}"
            )
        # Everything acknowledged must now reach Orthanc: wait for the queue to drain.
        wait_for(
            lambda: not any(r.state in ("queued", "received") for r in upload_rows(database_url)),
            config.settle_timeout,
            "the queue did not drain",
            interval=1.0,
        )
        peers = peer_attempts(witness.exchanges())
        attempts = script_attempts + peers
        report.peer_attempts = len(peers)
        report.script_attempts = len(script_attempts)
        report.statuses = Counter(f"{a.source} {a.status}" for a in attempts)
        report.audit = audit(attempts, orthanc_contents(private))
        rows = upload_rows(database_url)
        report.states = Counter(r.state for r in rows)
        report.quarantined = Counter(
            f"{r.reason}: {r.detail}" for r in rows if r.state == "quarantined"
        )
        report.already_stored = sum(
            1 for r in rows if r.state == "forwarded" and r.orthanc_status == "AlreadyStored"
        )
        log_text = intake.log_text()
        report.orphans_removed = log_text.count("removing spool file")
        lines = forwarded_lines(log_text)
        report.forwarded_twice = sorted(k for k, n in lines.items() if n > 1)
        receipts = {r.receipt for r in rows}
        report.rows_missing = sorted(
            a.receipt
            for a in attempts
            if a.acknowledged and a.receipt and a.receipt not in receipts
        )
        # The forwarder deletes a file just after recording the delivery: allow a moment.
        wait_for(
            lambda: not any((intake.spool / "queue").iterdir()),
            30,
            "queue/ still holds files",
        )
        report.leftover_files = {
            folder: len(list((intake.spool / folder).iterdir())) for folder in ("queue", "tmp")
        }
    finally:
        report.seconds = time.monotonic() - started
        intake.kill()
        if site_orthanc is not None:
            site_orthanc.stop()
        if witness is not None:
            witness.stop()
        private.stop()
    log(report.summary())
    return report
