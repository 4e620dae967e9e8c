"""The private Orthanc, as the forwarder sees it: the only holder of its credentials.

Orthanc closes a kept-alive connection left idle for 1 s (``KeepAliveTimeout`` from
1.11.3; Debian's 1.10.1 does the same, with no setting). The pool lets its connections
go sooner (``orthanc_keepalive_seconds``); a request that still goes out on a pooled
connection as Orthanc closes it is sent again at once on a new connection (``_Exchange``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.errors import OrthancRefused, OrthancUnavailable
from app.orthanc_status import Status
from app.settings import Settings

log = logging.getLogger(__name__)

_READ_CHUNK = 1024 * 1024
_READ_WHOLE = 8 * 1024 * 1024  # a smaller file is read in one go: one thread hand-off
# What a pooled connection that the server has closed raises: the end of the stream
# ("Server disconnected without sending a response") or a reset, on writing or reading
# (httpcore reads on after a failed write, so a reset shows as ReadError). It counts
# only before any answer's head arrived (``_Exchange``). Never a timeout (a slow
# Orthanc), and never ConnectError: a reused connection does not connect, so a
# ConnectError is a new connection failing, a real failure.
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

Body = Callable[[], bytes | AsyncIterator[bytes]]  # made again for a resend


@dataclass(frozen=True)
class StoredInstance:
    """Orthanc's answer to ``POST /instances`` for one instance."""

    id: str
    status: str  # Status.SUCCESS or Status.ALREADY_STORED
    parent_patient: str | None
    parent_study: str | None
    parent_series: str | None


def _small_file(path: Path) -> tuple[int, bytes | None]:
    """The file's size, and its bytes if it is small enough to send from memory."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        return size, (file.read() if size <= _READ_WHOLE else None)


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, _READ_CHUNK):
            yield chunk


def _describe(response: httpx.Response) -> str:
    """Orthanc's own words for an error answer, without echoing anything else."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("Message", "Details") if body.get(k)]
        if parts:
            return f"HTTP {response.status_code}: " + " - ".join(parts)
    return f"HTTP {response.status_code} {response.reason_phrase}"


class _Exchange:
    """One request as httpcore's ``trace`` extension reports it (the extension is httpx's,
    the event names httpcore's): did it open a connection, go out, get an answer's head?"""

    __slots__ = ("answered", "connected", "sent")

    def __init__(self) -> None:
        self.connected = self.sent = self.answered = False

    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.started":
            self.connected = True
        elif event == "http11.send_request_headers.started":
            self.sent = True
        elif event == "http11.receive_response_headers.complete":
            self.answered = True

    @property
    def on_closed_connection(self) -> bool:
        """Sent on a pooled connection that ended without a word of answer: the server had
        closed it. (A transport that reports nothing, such as a test's, never counts.)"""
        return self.sent and not self.connected and not self.answered


class OrthancClient:
    """The private Orthanc over HTTP, and the only holder of its credentials: store an
    instance (resent once on a stale kept-alive connection), read a stored one's MD5, and
    answer the health check. Errors are ForwardError leaves: unavailable or refused."""

    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        auth: httpx.BasicAuth | None = None
        if settings.orthanc_username and settings.orthanc_password:
            auth = httpx.BasicAuth(
                settings.orthanc_username, settings.orthanc_password.get_secret_value()
            )
        self._options: dict[str, Any] = {
            "base_url": settings.orthanc_url,
            "auth": auth,
            "timeout": httpx.Timeout(settings.orthanc_timeout_seconds, connect=10.0),
            "transport": transport,
        }
        self._max_connections = settings.forward_concurrency + 2
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=self._max_connections,
                keepalive_expiry=settings.orthanc_keepalive_seconds,
            ),
            **self._options,
        )
        self._new_connections: httpx.AsyncClient | None = None  # made on first need

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._new_connections is not None:
            await self._new_connections.aclose()

    def _resender(self) -> httpx.AsyncClient:
        """A client that keeps no connection, so a resend always goes on a new one."""
        if self._new_connections is None:
            self._new_connections = httpx.AsyncClient(
                limits=httpx.Limits(
                    max_connections=self._max_connections, max_keepalive_connections=0
                ),
                **self._options,
            )
        return self._new_connections

    async def _request(
        self, method: str, url: str, body: Body | None, headers: dict[str, str] | None
    ) -> httpx.Response:
        """The request, sent once more at once, on a new connection, if it went out on a
        pooled one that Orthanc had closed. Resending a ``POST /instances`` that Orthanc
        may have read is safe: it stores an instance once (``AlreadyStored``, same MD5).
        A new connection that fails is Orthanc failing: the caller counts it."""
        exchange = _Exchange()
        try:
            return await self._client.request(
                method,
                url,
                content=None if body is None else body(),
                headers=headers,
                extensions={"trace": exchange},
            )
        except _STALE as exc:
            if not exchange.on_closed_connection:
                raise
            log.info(
                "Orthanc had closed the kept-alive connection (%s); sending %s %s again on "
                "a new one",
                type(exc).__name__,
                method,
                url,
            )
        return await self._resender().request(
            method, url, content=None if body is None else body(), headers=headers
        )

    async def _send(
        self,
        method: str,
        url: str,
        body: Body | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = await self._request(method, url, body, headers)
        except httpx.TimeoutException as exc:
            raise OrthancUnavailable(f"Orthanc timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise OrthancUnavailable(f"Orthanc unreachable ({type(exc).__name__})") from exc
        if response.status_code == 401:
            # Our credentials, not the file: wait (without limit) for an operator to fix
            # INTAKE_ORTHANC_USERNAME/PASSWORD, rather than quarantine every upload. (A 403
            # is Orthanc refusing this request, e.g. a Lua filter: a refusal like a 400.)
            raise OrthancUnavailable(
                f"Orthanc refused the intake's credentials ({_describe(response)}); "
                "check INTAKE_ORTHANC_USERNAME / INTAKE_ORTHANC_PASSWORD"
            )
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise OrthancUnavailable(_describe(response), answered=True)
        if response.status_code >= 400:
            raise OrthancRefused(_describe(response), answered=True)
        return response

    async def store_instance(self, path: Path) -> StoredInstance:
        """POST one spooled file with its exact Content-Length: read whole if small,
        else streamed from disk (memory stays flat for a 1 GiB instance)."""
        size, data = await asyncio.to_thread(_small_file, path)
        response = await self._send(
            "POST",
            "/instances",
            (lambda: _file_chunks(path)) if data is None else (lambda: data),
            {"Content-Type": "application/dicom", "Content-Length": str(size)},
        )
        try:
            body = response.json()
            return StoredInstance(
                id=str(body["ID"]),
                status=str(body.get("Status", Status.SUCCESS)),
                parent_patient=body.get("ParentPatient"),
                parent_study=body.get("ParentStudy"),
                parent_series=body.get("ParentSeries"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise OrthancUnavailable(
                f"Orthanc answered HTTP {response.status_code} without an instance ID",
                answered=True,
            ) from exc

    async def stored_md5(self, instance_id: str) -> str | None:
        """MD5 of the DICOM file Orthanc keeps for an instance, when it records one."""
        try:
            response = await self._send("GET", f"/instances/{instance_id}/attachments/dicom/md5")
        except OrthancRefused:
            return None  # StoreMD5ForAttachments is off
        return response.text.strip().strip('"').lower() or None

    async def system(self) -> dict[str, Any]:
        response = await self._send("GET", "/system")
        result: dict[str, Any] = response.json()
        return result
