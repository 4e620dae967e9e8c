"""The spool: uploads stream into a temp file and become durable by fsync + rename.

Layout under ``INTAKE_SPOOL_DIR``::

    tmp/         files being received; never trusted, removed at start-up
    queue/       <receipt>.dcm: acknowledged, waiting for the private Orthanc
    quarantine/  <receipt>.dcm: kept for an admin (conflicts, refusals)
    refused/     <receipt>.bin: executable preambles, kept as security evidence

A file is in ``queue/`` only after its bytes were fsync'd, it was renamed there
atomically and the folder was fsync'd; the upload's row is committed after that,
and only then does the site get its 2xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from app.dicom.summary import classify_preamble
from app.errors import (
    ClientTimeout,
    CorruptCompression,
    InstanceTooLarge,
    SpoolFull,
    UnsupportedEncoding,
)

PREAMBLE = 128
_HEAD = PREAMBLE + 4  # preamble + "DICM" (PS3.10 §7.1)
_INFLATE_CHUNK = 1024 * 1024
QUEUE, QUARANTINE, REFUSED, TMP = "queue", "quarantine", "refused", "tmp"


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end


def is_archive(head: bytes) -> bool:
    """True when ``head`` opens a ZIP archive (Orthanc 1.8.2+ takes those on /instances)."""
    return head[:4] in ZIP_MAGIC


@dataclass(frozen=True)
class Received:
    """A fully received body in ``tmp/``: not yet durable."""

    path: Path
    byte_size: int
    sha256: str  # of the bytes as stored, preamble zeroed
    executable_preamble: str | None  # e.g. "ELF": the file was kept as sent
    archive: bool = False  # a ZIP archive, kept byte for byte: its entries are the uploads


class _Sink:
    """Writes the stored form of the body: counts, hashes, zeroes the preamble.

    A body that opens with ZIP magic is an archive: it is kept as sent (its
    "preamble" is archive data) and may grow to ``max_archive_bytes``.
    """

    def __init__(self, file: BinaryIO, max_bytes: int, max_archive_bytes: int | None) -> None:
        self._file = file
        self._max = max_bytes
        self._max_archive = max_archive_bytes
        self._head = bytearray()
        self._headed = False
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.executable_preamble: str | None = None
        self.archive = False

    @property
    def limit(self) -> int:
        if self._max_archive is not None and (self.archive or not self._headed):
            return max(self._max, self._max_archive)
        return self._max

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self._headed:
            self._check_size()
            self._emit(data)
            return
        self._head += data
        if len(self._head) >= _HEAD:
            self._flush_head()

    def close(self) -> None:
        if not self._headed:
            self._flush_head()

    def _check_size(self) -> None:
        if self.size > self.limit:
            what = "archive" if self.archive else "instance"
            raise InstanceTooLarge(f"the {what} is larger than the limit of {self.limit} bytes")

    def _flush_head(self) -> None:
        self._headed = True
        head = self._head
        # ZIP magic followed by "DICM" at 128 is a Part 10 file whose preamble holds ZIP
        # bytes (a polyglot, refused below), never an archive: an instance once answered
        # `[]` as an empty archive, stored nowhere.
        part10 = len(head) >= _HEAD and head[PREAMBLE:_HEAD] == b"DICM"
        self.archive = self._max_archive is not None and is_archive(bytes(head)) and not part10
        self._check_size()
        # Only a Part 10 file has a preamble; anything else is left for validation to refuse.
        if part10:
            # CVE-2019-11687: an executable preamble makes the file a polyglot.
            self.executable_preamble = classify_preamble(bytes(head[:PREAMBLE]))
            if self.executable_preamble is None:
                # Any other content is meaningless to DICOM; the stored file carries zeros.
                head[:PREAMBLE] = bytes(PREAMBLE)
        self._emit(bytes(head))
        self._head = bytearray()

    def _emit(self, data: bytes) -> None:
        self.sha256.update(data)
        try:
            self._file.write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SpoolFull("the intake's spool disk is full") from exc
            raise


class SpoolFile:
    """One file being written into ``tmp/``: ``write`` as bytes come, then ``finish``.

    Whoever opens one calls ``finish`` (it becomes a `Received`) or ``abort``.
    """

    def __init__(self, path: Path, max_bytes: int, max_archive_bytes: int | None) -> None:
        self.path = path
        self._file = path.open("wb")
        self._sink = _Sink(self._file, max_bytes, max_archive_bytes)

    @property
    def size(self) -> int:
        return self._sink.size

    def write(self, data: bytes) -> None:
        self._sink.write(data)

    def finish(self) -> Received:
        """Close and fsync (blocking: call it off the event loop for big files)."""
        try:
            self._sink.close()
            _fsync_file(self._file)
            self._file.close()
        except BaseException:
            self.abort()
            raise
        return Received(
            path=self.path,
            byte_size=self._sink.size,
            sha256=self._sink.sha256.hexdigest(),
            executable_preamble=self._sink.executable_preamble,
            archive=self._sink.archive,
        )

    def abort(self) -> None:
        # Closing flushes what is buffered, which fails again on a full disk: the file is
        # going anyway, and the error that brought us here is the one to report.
        with contextlib.suppress(OSError):
            self._file.close()
        self.path.unlink(missing_ok=True)


class Writer(Protocol):
    def write(self, data: bytes, /) -> object: ...


class _Gunzip:
    """Bounded streaming gzip inflation: never more than one chunk of output at a time."""

    def __init__(self) -> None:
        self._start_member()

    def _start_member(self) -> None:
        self._inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        self._open = False  # a member has started and not reached its end

    def feed(self, data: bytes, sink: Writer) -> None:
        while data:
            self._open = True
            try:
                out = self._inflater.decompress(data, _INFLATE_CHUNK)
            except zlib.error as exc:
                raise CorruptCompression(f"the gzip body is corrupt: {exc}") from exc
            sink.write(out)
            if self._inflater.eof:
                data = self._inflater.unused_data  # concatenated gzip members (RFC 1952 §2.2)
                self._start_member()
                if not data.strip(b"\0"):
                    return
            else:
                data = self._inflater.unconsumed_tail

    def finish(self) -> None:
        if self._open:
            raise CorruptCompression("the gzip body ends before its end-of-stream marker")


def decoder(content_encoding: str | None) -> _Gunzip | None:
    encodings = [e.strip().lower() for e in (content_encoding or "").split(",") if e.strip()]
    encodings = [e for e in encodings if e != "identity"]
    if not encodings:
        return None
    if encodings == ["gzip"] or encodings == ["x-gzip"]:
        return _Gunzip()
    raise UnsupportedEncoding(
        f"Content-Encoding {content_encoding!r} is not supported; send gzip or no encoding"
    )


class Spool:
    """The spool folder: bodies stream into tmp/, become durable in queue/ by fsync and
    rename (and the folder's fsync), move to quarantine/ or refused/, and are removed only
    once no row needs them. Refuses new bodies (507) below ``min_free_bytes``."""

    def __init__(self, root: Path, min_free_bytes: int = 0, node: str = "") -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        # The node whose processes may forward this spool's files (INTAKE_NODE_NAME).
        self.node = node or socket.gethostname()[:64]

    def ensure(self) -> None:
        for name in (TMP, QUEUE, QUARANTINE, REFUSED):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def path(self, folder: str, name: str) -> Path:
        return self.root / folder / name

    def check_free_space(self) -> None:
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise SpoolFull(
                f"the intake's spool has {free} bytes free, under its floor of "
                f"{self.min_free_bytes}; try again later"
            )

    def open_file(self, *, max_bytes: int, max_archive_bytes: int | None = None) -> SpoolFile:
        """A new file in ``tmp/``; ZIP archives allowed up to ``max_archive_bytes`` if set."""
        return SpoolFile(self.root / TMP / f"{uuid.uuid4().hex}.part", max_bytes, max_archive_bytes)

    async def receive(
        self,
        chunks: AsyncIterator[bytes],
        *,
        max_bytes: int,
        content_encoding: str | None,
        idle_timeout: float,
        max_archive_bytes: int | None = None,
        min_rate: int = 0,
    ) -> Received:
        """Stream a body to ``tmp/`` within the byte cap, then fsync it."""
        inflate = decoder(content_encoding)
        self.check_free_space()
        target = self.open_file(max_bytes=max_bytes, max_archive_bytes=max_archive_bytes)
        raw_limit = max(max_bytes, max_archive_bytes or 0)
        raw_size = 0
        try:
            async for chunk in bounded(chunks, idle_timeout, min_rate):
                if raw_size == 0 and inflate is not None and is_archive(chunk):
                    # Orthanc looks for ZIP magic before it gunzips (1.8.2+): so do we.
                    inflate = None
                raw_size += len(chunk)
                if raw_size > raw_limit:
                    raise InstanceTooLarge(
                        f"the body is larger than the limit of {raw_limit} bytes"
                    )
                if inflate is None:
                    target.write(chunk)
                else:
                    inflate.feed(chunk, target)
            if inflate is not None:
                inflate.finish()
            return await asyncio.to_thread(target.finish)
        except BaseException:
            target.abort()
            raise

    def keep(self, received: Path, folder: str, name: str) -> Path:
        """Move a received file into ``folder`` durably (rename + fsync of the folder)."""
        target = self.root / folder / name
        os.replace(received, target)
        _fsync_dir(target.parent)
        return target

    def discard(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def bounded(
    chunks: AsyncIterator[bytes], idle_timeout: float, min_rate: int = 0
) -> AsyncIterator[bytes]:
    """The body's chunks, or ClientTimeout: when none arrives for ``idle_timeout`` seconds,
    or when, past that long, the body has averaged under ``min_rate`` bytes per second
    (a body trickled just inside the idle timeout would otherwise hold a slot for ever)."""
    iterator = aiter(chunks)
    started = time.monotonic()
    size = 0
    while True:
        try:
            # A timer per chunk, not wait_for's task per chunk: that was 12 % of the
            # request path's CPU with 16 clients (docs/PERFORMANCE.md).
            async with asyncio.timeout(idle_timeout):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise ClientTimeout(f"no body bytes arrived for {idle_timeout:g} seconds") from exc
        size += len(chunk)
        elapsed = time.monotonic() - started
        if min_rate and elapsed > idle_timeout and size < min_rate * elapsed:
            raise ClientTimeout(
                f"the body arrives at {size / elapsed:.0f} bytes/s, under the minimum of "
                f"{min_rate} bytes/s"
            )
        yield chunk


def _fsync_file(file: BinaryIO) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SpoolFull("the intake's spool disk is full") from exc
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
