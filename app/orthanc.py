"""The private Orthanc, as the forwarder sees it: the only holder of its credentials."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.errors import OrthancRefused, OrthancUnavailable
from app.settings import Settings

_READ_CHUNK = 1024 * 1024
_READ_WHOLE = 8 * 1024 * 1024  # a smaller file is read in one go: one thread hand-off


@dataclass(frozen=True)
class StoredInstance:
    """Orthanc's answer to ``POST /instances`` for one instance."""

    id: str
    status: str  # "Success" or "AlreadyStored"
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


class OrthancClient:
    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        auth: httpx.BasicAuth | None = None
        if settings.orthanc_username and settings.orthanc_password:
            auth = httpx.BasicAuth(
                settings.orthanc_username, settings.orthanc_password.get_secret_value()
            )
        self._client = httpx.AsyncClient(
            base_url=settings.orthanc_url,
            auth=auth,
            timeout=httpx.Timeout(settings.orthanc_timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_connections=settings.forward_concurrency + 2),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, url, **kwargs)
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
            content=_file_chunks(path) if data is None else data,
            headers={"Content-Type": "application/dicom", "Content-Length": str(size)},
        )
        try:
            body = response.json()
            return StoredInstance(
                id=str(body["ID"]),
                status=str(body.get("Status", "Success")),
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
