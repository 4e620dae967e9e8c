"""The site-side client: send files, folders and ZIP archives to an intake's ``POST /instances``.

It is what a site without an Orthanc runs (``orthanc-intake upload``). It speaks only
Orthanc's upload API, so it works against a plain Orthanc too.
"""

from __future__ import annotations

import os
import random
import ssl
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich import progress as bars
from rich.console import Console

DICM_OFFSET = 128  # PS3.10 §7.1: a 128-byte preamble, then the four bytes "DICM"
ZIP_MAGIC = b"PK\x03\x04"  # a ZIP local file header (APPNOTE.TXT §4.3.7)
DICOM_TYPE = "application/dicom"  # PS3.18 §8.7.3.3.2
ZIP_TYPE = "application/zip"
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504, 507})
# Retry-After is honoured up to this; a site at its daily quota fails after --retries instead
# of the command sleeping until midnight.
MAX_WAIT_SECONDS = 60.0
_CHUNK_BYTES = 1 << 16
_COUNTED = ("accepted", "duplicates", "quarantined", "rejected", "skipped", "failed")


@dataclass(frozen=True)
class Item:
    """One file to send as one request body."""

    path: Path
    size: int
    content_type: str


@dataclass(frozen=True)
class Problem:
    """A file (or ZIP entry) that was rejected, skipped or not delivered, and why."""

    path: str
    status: int | None
    reason: str
    detail: str = ""


@dataclass
class Report:
    """What became of a run; ``files`` and ``bytes`` count the files the server answered."""

    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    rejected: list[Problem] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    failed: list[Problem] = field(default_factory=list)
    not_sent: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    retries: int = 0
    auth_error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.auth_error is not None:
            return 3
        # A quarantined file (same SOP Instance UID, other bytes) needs a person too.
        trouble = self.quarantined or self.rejected or self.failed or self.not_sent
        return 1 if trouble else 0

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["error"] = data.pop("auth_error")
        return data

    def summary(self) -> str:
        lines = [f"Sent {self.files} file(s), {self.bytes} bytes, in {self.seconds:.1f} s."]
        for name in (*_COUNTED, "not_sent", "retries"):
            value = getattr(self, name)
            count = len(value) if isinstance(value, list) else value
            lines.append(f"  {name.replace('_', ' ') + ':':<13}{count}")
        for name in ("rejected", "failed", "skipped"):
            problems: list[Problem] = getattr(self, name)
            if problems:
                lines += [f"{name.capitalize()}:", *(f"  {_describe(p)}" for p in problems)]
        return "\n".join(lines)


def _describe(problem: Problem) -> str:
    status = f" ({problem.status})" if problem.status is not None else ""
    detail = f": {problem.detail}" if problem.detail else ""
    return f"{problem.path}: {problem.reason}{status}{detail}"


def instances_url(url: str) -> httpx.URL:
    """``{url}/instances``, keeping a path prefix whether or not ``url`` ends with a slash."""
    base = httpx.URL(url)
    if base.scheme not in ("http", "https") or not base.host:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    if base.userinfo:
        # Credentials go in --site/--token, never in a URL that ends up in logs and errors.
        raise ValueError("the URL must not carry credentials; use --site and --token")
    return base.copy_with(path=base.path.rstrip("/") + "/instances", query=None, fragment=None)


def sniff(path: Path) -> str | None:
    """The Content-Type to send ``path`` with, from its first 132 bytes; None if neither."""
    with path.open("rb") as f:
        head = f.read(DICM_OFFSET + 4)
    if head.startswith(ZIP_MAGIC):
        return ZIP_TYPE
    return DICOM_TYPE if head[DICM_OFFSET:] == b"DICM" else None


def collect(paths: Iterable[Path], report: Report) -> list[Item]:
    """The files to send, folders walked in sorted order; what is left out goes to ``report``.

    A file named on the command line is sent as given (the server judges it); inside a
    folder, only DICOM Part 10 files and ZIP archives are sent.
    """
    items: list[Item] = []
    for given in paths:
        if not given.is_dir():
            items.append(Item(given, given.stat().st_size, sniff(given) or DICOM_TYPE))
            continue
        # os.walk does not follow symlinked folders, so the walk stays inside the tree.
        for path in sorted(Path(d, name) for d, _, names in os.walk(given) for name in names):
            found = _in_folder(path)
            if isinstance(found, Item):
                items.append(found)
            else:
                report.skipped.append(Problem(str(path), None, found))
    return items


def _in_folder(path: Path) -> Item | str:
    """The item for a file found in a folder, or why it is left out."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            # A symlink could lead out of the tree; a FIFO would block the read.
            return "not a regular file"
        # PS3.10 §8.6: the media index, not an instance; Orthanc would refuse it too.
        if path.name.upper() == "DICOMDIR":
            return "DICOMDIR (a media index, not an instance)"
        kind = sniff(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return Item(path, info.st_size, kind) if kind else "not DICOM (no DICM at byte 128)"


def retry_delay(attempt: int, retry_after: float | None, base: float = 1.0) -> float:
    """Seconds before try ``attempt + 1``: exponential with jitter, at least Retry-After."""
    backoff = base * 2.0**attempt
    jitter = random.random()  # noqa: S311 - spreading retries, not cryptography
    if retry_after is None:
        return min(MAX_WAIT_SECONDS, backoff * (0.5 + jitter / 2))
    # Files told the same Retry-After must not all come back at the same instant.
    return min(MAX_WAIT_SECONDS, retry_after + backoff * jitter)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    # RFC 9110 §10.2.3 also allows an HTTP date; only intakes' seconds are honoured.
    return float(value) if value.isdigit() else None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


@dataclass
class _Sender:
    """Sends items over one client; the worker threads share it, so counts take the lock."""

    client: httpx.Client
    endpoint: httpx.URL
    report: Report
    bar: bars.Progress
    task: bars.TaskID
    retries: int
    backoff: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: threading.Event = field(default_factory=threading.Event)

    def send(self, item: Item) -> bool:
        """Send ``item`` until it gets a final answer; False if the server was never reached."""
        for attempt in range(self.retries + 1):
            if self.stopped.is_set():
                with self.lock:
                    self.report.not_sent += 1
                return True
            sent = [0]
            try:
                response = self.client.post(
                    self.endpoint,
                    content=self._chunks(item, sent),
                    headers={"Content-Type": item.content_type, "Content-Length": str(item.size)},
                )
            except httpx.TransportError as exc:
                retry_after = None
                failure = Problem(str(item.path), None, type(exc).__name__, str(exc))
            else:
                if response.status_code not in TRANSIENT_STATUSES:
                    self._finish(item, response)
                    return True
                retry_after, failure = _retry_after(response), _problem(item, response)
            self.bar.advance(self.task, -sent[0])  # those bytes will be sent again
            if attempt == self.retries:
                break
            with self.lock:
                self.report.retries += 1
            self.stopped.wait(retry_delay(attempt, retry_after, self.backoff))
        with self.lock:
            self.report.failed.append(failure)
            self.bar.update(self.task, done=self.report.files + len(self.report.failed))
        return failure.status is not None

    def _chunks(self, item: Item, sent: list[int]) -> Iterator[bytes]:
        # Streamed: a multi-gigabyte series never sits in memory.
        with item.path.open("rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                sent[0] += len(chunk)
                self.bar.advance(self.task, len(chunk))
                yield chunk

    def _finish(self, item: Item, response: httpx.Response) -> None:
        body = _json(response)
        with self.lock:
            self.report.files += 1
            self.report.bytes += item.size
            self.bar.update(self.task, done=self.report.files + len(self.report.failed))
            if response.status_code == 401:
                detail = body.get("Details", "") if isinstance(body, dict) else ""
                self.report.auth_error = detail or "the server refused the site name or token"
                self.stopped.set()  # every further file would be refused the same way
            elif response.status_code == 200 and isinstance(body, list):
                # A ZIP: one answer per DICOM entry, in archive order.
                for n, answer in enumerate(body, 1):
                    entry = answer.get("IntakeEntry") if isinstance(answer, dict) else None
                    self._count(f"{item.path}!{entry}" if entry else f"{item.path} #{n}", answer)
            elif response.status_code == 200 and isinstance(body, dict):
                self._count(str(item.path), body)
            elif 400 <= response.status_code < 500:
                self.report.rejected.append(_problem(item, response))
            else:  # the server's fault, not the file's: a 500, or a 200 that is not JSON
                self.report.failed.append(_problem(item, response))

    def _count(self, label: str, answer: Any) -> None:
        answer = answer if isinstance(answer, dict) else {}
        state, status = answer.get("IntakeState"), answer.get("Status")
        if state == "quarantined" or status == "FilteredOut":  # held, not in the archive
            self.report.quarantined += 1
        elif state == "duplicate" or (state is None and status == "AlreadyStored"):
            self.report.duplicates += 1
        elif status in ("Success", "AlreadyStored"):
            self.report.accepted += 1
        else:
            code = answer.get("HttpStatus", 200)
            reason = str(answer.get("IntakeReason") or status or "unexpected answer")
            problem = Problem(label, code, reason, str(answer.get("Details", "")))
            # A ZIP's "try later" entries (429, 507...): sending the archive again sends them.
            failed = code in TRANSIENT_STATUSES
            (self.report.failed if failed else self.report.rejected).append(problem)


def _problem(item: Item, response: httpx.Response) -> Problem:
    body = _json(response)
    if isinstance(body, dict):
        reason = str(body.get("Message") or response.reason_phrase)
        return Problem(str(item.path), response.status_code, reason, str(body.get("Details", "")))
    # Not the intake's answer (a proxy's HTML page, say): a little of it helps more than none.
    return Problem(
        str(item.path), response.status_code, response.reason_phrase, response.text[:200]
    )


def upload(
    paths: Iterable[Path],
    url: str,
    site: str,
    token: str,
    *,
    concurrency: int = 4,
    retries: int = 5,
    timeout: float = 60.0,
    cacert: Path | None = None,
    progress: bool = False,
    backoff: float = 1.0,
    transport: httpx.BaseTransport | None = None,
) -> Report:
    """Send every DICOM file and ZIP archive under ``paths``; never raises for a server's no."""
    started = time.monotonic()
    endpoint = instances_url(url)
    report = Report()
    items = collect(paths, report)
    verify = ssl.create_default_context(cafile=str(cacert)) if cacert else True
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    console = Console(stderr=True)
    bar = bars.Progress(
        bars.TextColumn("{task.fields[done]}/{task.fields[files]} files"),
        bars.BarColumn(),
        bars.DownloadColumn(),
        bars.TransferSpeedColumn(),
        console=console,
        disable=not (progress and console.is_terminal),
    )
    with (
        httpx.Client(
            auth=(site, token), timeout=timeout, verify=verify, limits=limits, transport=transport
        ) as client,
        bar,
    ):
        task = bar.add_task("upload", total=sum(i.size for i in items), done=0, files=len(items))
        sender = _Sender(client, endpoint, report, bar, task, retries, backoff)
        # The first file goes alone: wrong credentials or a wrong URL then cost one
        # request (and one failed-login count at the intake) instead of N.
        if items and not sender.send(items[0]):
            sender.stopped.set()
        # Threads rather than asyncio: the sync client streams a plain generator from disk,
        # and the pool is what bounds the files in flight (one connection each).
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            try:
                for _ in pool.map(sender.send, items[1:]):
                    pass
            except BaseException:
                sender.stopped.set()  # Ctrl-C: the workers skip what is left, so leaving is quick
                raise
    # Threads finish in any order; sorted lists read the same from one run to the next.
    report.rejected.sort(key=lambda p: p.path)
    report.failed.sort(key=lambda p: p.path)
    report.seconds = time.monotonic() - started
    return report
