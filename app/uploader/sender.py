"""The site-side client: send files, folders and ZIP archives to an intake's ``POST /instances``.

It is what a site without an Orthanc runs (``orthanc-intake upload``). It speaks only
Orthanc's upload API, so it works against a plain Orthanc too. What a run comes to, and
how it is said, is ``app/uploader/report.py``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import ssl
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich import progress as bars
from rich.console import Console

from app.dicom.summary import PREAMBLE_BYTES, bare_data_set_order, is_part10
from app.orthanc_status import STORED, Status
from app.uploader.report import Problem, Report, Unreached, explain, files

__all__ = ["Item", "Problem", "Report", "collect", "instances_url", "retry_delay", "upload"]

ZIP_MAGIC = b"PK\x03\x04"  # a ZIP local file header (APPNOTE.TXT §4.3.7)
DICOM_TYPE = "application/dicom"  # PS3.18 §8.7.3.3.2
ZIP_TYPE = "application/zip"
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504, 507})
# Retry-After is honoured up to this; a site at its daily quota fails after --retries instead
# of the command sleeping until midnight.
MAX_WAIT_SECONDS = 60.0
_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Item:
    """One file to send as one request body."""

    path: Path
    size: int
    content_type: str


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
    """The Content-Type to send ``path`` with, from its first 132 bytes; None if neither.

    DICOM is a Part 10 file or a bare data set, as the intake and Orthanc take them."""
    with path.open("rb") as f:
        head = f.read(PREAMBLE_BYTES + 4)
    if head.startswith(ZIP_MAGIC):
        return ZIP_TYPE
    return DICOM_TYPE if is_part10(head) or bare_data_set_order(head) else None


def collect(paths: Iterable[Path], report: Report) -> list[Item]:
    """The files to send, folders walked in sorted order; what is left out goes to ``report``.

    A file named on the command line is sent as given (the server judges it); inside a
    folder, only DICOM files (Part 10, or a bare data set) and ZIP archives are sent.
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
    return (
        Item(path, info.st_size, kind)
        if kind
        else "not DICOM (no DICM at byte 128, no data set at byte 0)"
    )


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


class _Stopped(Exception):
    """Raised from a body being streamed when the run stops: the request is abandoned."""


@dataclass(eq=False)
class _Body:
    """One attempt's request body, streamed from disk, and how far it has gone."""

    item: Item
    sender: _Sender
    sent: int = 0
    complete: bool = False  # every byte handed over: only the answer is awaited

    def __iter__(self) -> Iterator[bytes]:
        # Streamed: a multi-gigabyte series never sits in memory.
        with self.item.path.open("rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                if self.sender.stopped.is_set():
                    raise _Stopped  # Ctrl-C: a large file must not hold the run up
                self.sent += len(chunk)
                self.sender.bar.advance(self.sender.task, len(chunk))
                yield chunk
        self.complete = True


@dataclass
class _Sender:
    """Sends items over one client; the worker threads share it, so counts take the lock.

    Every item ends taken (``report.files``), rejected, failed, or not at all: those are
    counted in ``settled``, and what is left when the run ends was not sent.
    """

    client: httpx.Client
    endpoint: httpx.URL
    url: str  # as given, for messages
    site: str
    timeout: float
    report: Report
    bar: bars.Progress
    task: bars.TaskID
    retries: int
    backoff: float
    settled: int = 0
    bodies: set[_Body] = field(default_factory=set)  # the requests on their way
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: threading.Event = field(default_factory=threading.Event)

    def awaiting(self) -> int:
        """Requests whose body is all sent, waiting for the intake's answer."""
        with self.lock:
            return sum(body.complete for body in self.bodies)

    def send(self, item: Item) -> Unreached | None:
        """Send ``item`` until it gets a final answer; why not, if the intake was never reached."""
        for attempt in range(self.retries + 1):
            if self.stopped.is_set():
                return None
            body, unreached = _Body(item, self), None
            try:
                response = self._post(body)
            except _Stopped:
                self.bar.advance(self.task, -body.sent)
                return None
            except httpx.TransportError as exc:
                retry_after, unreached = None, explain(exc, self.url, self.timeout)
                failure = Problem(
                    str(item.path), None, unreached.reason, unreached.raw, body.sent, item.size
                )
            else:
                if response.status_code not in TRANSIENT_STATUSES:
                    self._finish(item, response, body.sent)
                    return None
                retry_after, failure = _retry_after(response), _problem(item, response, body.sent)
            self.bar.advance(self.task, -body.sent)  # those bytes will be sent again
            if attempt == self.retries or (unreached is not None and not unreached.transient):
                break
            with self.lock:
                self.report.retries += 1
            self.stopped.wait(retry_delay(attempt, retry_after, self.backoff))
        if self.stopped.is_set():
            return None  # not a failure of its own: Ctrl-C or a refused token ended the wait
        with self.lock:
            self.report.failed.append(failure)
            self._settle()
        return unreached

    def _post(self, body: _Body) -> httpx.Response:
        with self.lock:
            self.bodies.add(body)
        try:
            return self.client.post(
                self.endpoint,
                content=body,
                headers={
                    "Content-Type": body.item.content_type,
                    "Content-Length": str(body.item.size),
                },
            )
        finally:
            with self.lock:
                self.bodies.discard(body)

    def _settle(self) -> None:
        self.settled += 1
        self.bar.update(self.task, done=self.settled)

    def _finish(self, item: Item, response: httpx.Response, sent: int) -> None:
        body = _json(response)
        with self.lock:
            if response.status_code == 401:
                # Every further file would be refused the same way: stop, and count this
                # one as not sent (it was not taken).
                detail = body.get("Details", "") if isinstance(body, dict) else ""
                self.report.stopped = "token"
                self.report.error = (
                    f"the intake refused the token for site {self.site!r} "
                    f"(401: {detail or 'unknown site or token'}): "
                    "check --token (or INTAKE_UPLOAD_TOKEN) and --site"
                )
                self.stopped.set()
                return
            self._settle()
            if response.status_code == 200 and isinstance(body, list | dict):
                self.report.files += 1
                self.report.bytes += item.size
            if response.status_code == 200 and isinstance(body, list):
                # A ZIP: one answer per DICOM entry, in archive order.
                for n, answer in enumerate(body, 1):
                    entry = answer.get("IntakeEntry") if isinstance(answer, dict) else None
                    self._count(f"{item.path}!{entry}" if entry else f"{item.path} #{n}", answer)
            elif response.status_code == 200 and isinstance(body, dict):
                self._count(str(item.path), body)
            elif 400 <= response.status_code < 500:
                self.report.rejected.append(_problem(item, response, sent))
            else:  # the server's fault, not the file's: a 500, or a 200 that is not JSON
                self.report.failed.append(_problem(item, response, sent))

    def _count(self, label: str, answer: Any) -> None:
        answer = answer if isinstance(answer, dict) else {}
        state, status = answer.get("IntakeState"), answer.get("Status")
        if state == "quarantined" or status == Status.FILTERED_OUT:  # held, not in the archive
            self.report.quarantined += 1
        elif state == "duplicate" or (state is None and status == Status.ALREADY_STORED):
            self.report.duplicates += 1
        elif status in STORED:
            # The intake answers once the file is durable, before it forwards it: "queued"
            # (docs/UPLOADS.md). A plain Orthanc says no state: it has stored the file.
            self.report.accepted += 1
            self.report.stored += state is None
        else:
            code = answer.get("HttpStatus", 200)
            reason = str(answer.get("IntakeReason") or status or "unexpected answer")
            problem = Problem(label, code, reason, str(answer.get("Details", "")))
            # A ZIP's "try later" entries (429, 507...): sending the archive again sends them.
            failed = code in TRANSIENT_STATUSES
            (self.report.failed if failed else self.report.rejected).append(problem)


def _problem(item: Item, response: httpx.Response, sent: int) -> Problem:
    body = _json(response)
    path, status = str(item.path), response.status_code
    if isinstance(body, dict):
        reason = str(body.get("Message") or response.reason_phrase)
        return Problem(path, status, reason, str(body.get("Details", "")), sent, item.size)
    # Not the intake's answer (a proxy's HTML page, say): a little of it helps more than none.
    return Problem(path, status, response.reason_phrase, response.text[:200], sent, item.size)


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
    """Send every DICOM file and ZIP archive under ``paths``; never raises for a server's no.

    Ctrl-C does not raise either: the run stops (a body being sent is abandoned, answers
    on their way are awaited) and the report says what was taken, ``stopped`` "interrupted".
    """
    started = time.monotonic()
    endpoint = instances_url(url)
    report = Report()
    verify = ssl.create_default_context(cafile=str(cacert)) if cacert else True
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = httpx.Client(
        auth=(site, token), timeout=timeout, verify=verify, limits=limits, transport=transport
    )
    bar = _progress_bar(progress)
    try:
        items = collect(paths, report)
        report.total = len(items)
        with client, bar:
            task = bar.add_task(
                "upload", total=sum(i.size for i in items), done=0, files=len(items)
            )
            sender = _Sender(
                client, endpoint, url, site, timeout, report, bar, task, retries, backoff
            )
            try:
                _send_all(sender, items, concurrency)
            finally:
                report.not_sent = len(items) - sender.settled
    except KeyboardInterrupt:
        report.stopped = "interrupted"
    finally:
        client.close()
    # Threads finish in any order; sorted lists read the same from one run to the next.
    report.rejected.sort(key=lambda p: p.path)
    report.failed.sort(key=lambda p: p.path)
    report.seconds = time.monotonic() - started
    return report


def _progress_bar(wanted: bool) -> bars.Progress:
    console = Console(stderr=True)
    return bars.Progress(
        bars.TextColumn("{task.fields[done]}/{task.fields[files]} files"),
        bars.BarColumn(),
        bars.DownloadColumn(),
        bars.TransferSpeedColumn(),
        console=console,
        disable=not (wanted and console.is_terminal),
    )


def _send_all(sender: _Sender, items: list[Item], concurrency: int) -> None:
    # The first file goes alone: wrong credentials or a wrong URL then cost one
    # request (and one failed-login count at the intake) instead of N.
    if items and (unreached := sender.send(items[0])) is not None:
        sender.report.stopped = "unreachable"
        sender.report.error, sender.report.error_detail = unreached.sentence, unreached.raw
        return
    # Threads rather than asyncio: the sync client streams a plain generator from disk,
    # and the pool is what bounds the files in flight (one connection each).
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        for _ in pool.map(sender.send, items[1:]):
            pass
    except KeyboardInterrupt:
        sender.stopped.set()  # bodies being sent stop at their next chunk; the rest wait
        with _second_interrupt_quits():
            if awaiting := sender.awaiting():
                sender.bar.console.print(
                    f"Stopping: waiting for the intake's answer to {files(awaiting)} already "
                    "sent (Ctrl-C again to quit at once).",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            pool.shutdown(wait=True)
        raise
    finally:
        pool.shutdown(wait=True)


@contextlib.contextmanager
def _second_interrupt_quits() -> Iterator[None]:
    """While the run winds down after Ctrl-C, a second Ctrl-C ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a signal handler
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
