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
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.dicom import classify_preamble
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


@dataclass(frozen=True)
class Received:
    """A fully received body in ``tmp/``: not yet durable."""

    path: Path
    byte_size: int
    sha256: str  # of the bytes as stored, preamble zeroed
    executable_preamble: str | None  # e.g. "ELF": the file was kept as sent


class _Sink:
    """Writes the stored form of the body: counts, hashes, zeroes the preamble."""

    def __init__(self, file: BinaryIO, max_bytes: int) -> None:
        self._file = file
        self._max = max_bytes
        self._head = bytearray()
        self._headed = False
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.executable_preamble: str | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self._max:
            raise InstanceTooLarge(f"the instance is larger than the limit of {self._max} bytes")
        if self._headed:
            self._emit(data)
            return
        self._head += data
        if len(self._head) >= _HEAD:
            self._flush_head()

    def close(self) -> None:
        if not self._headed:
            self._flush_head()

    def _flush_head(self) -> None:
        self._headed = True
        head = self._head
        # Only a Part 10 file has a preamble; anything else is left for validation to refuse.
        if len(head) >= _HEAD and head[PREAMBLE:_HEAD] == b"DICM":
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


class _Gunzip:
    """Bounded streaming gzip inflation: never more than one chunk of output at a time."""

    def __init__(self) -> None:
        self._start_member()

    def _start_member(self) -> None:
        self._inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        self._open = False  # a member has started and not reached its end

    def feed(self, data: bytes, sink: _Sink) -> None:
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


def _decoder(content_encoding: str | None) -> _Gunzip | None:
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
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes

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

    async def receive(
        self,
        chunks: AsyncIterator[bytes],
        *,
        max_bytes: int,
        content_encoding: str | None,
        idle_timeout: float,
    ) -> Received:
        """Stream a body to ``tmp/`` within the byte cap, then fsync it."""
        decoder = _decoder(content_encoding)
        self.check_free_space()
        path = self.root / TMP / f"{uuid.uuid4().hex}.part"
        raw_size = 0
        try:
            with path.open("wb") as file:
                sink = _Sink(file, max_bytes)
                iterator = aiter(chunks)
                while True:
                    try:
                        chunk = await asyncio.wait_for(anext(iterator), idle_timeout)
                    except StopAsyncIteration:
                        break
                    except TimeoutError as exc:
                        raise ClientTimeout(
                            f"no body bytes arrived for {idle_timeout:g} seconds"
                        ) from exc
                    raw_size += len(chunk)
                    if raw_size > max_bytes:
                        raise InstanceTooLarge(
                            f"the body is larger than the limit of {max_bytes} bytes"
                        )
                    if decoder is None:
                        sink.write(chunk)
                    else:
                        decoder.feed(chunk, sink)
                if decoder is not None:
                    decoder.finish()
                sink.close()
                await asyncio.to_thread(_fsync_file, file)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Received(
            path=path,
            byte_size=sink.size,
            sha256=sink.sha256.hexdigest(),
            executable_preamble=sink.executable_preamble,
        )

    def keep(self, received: Path, folder: str, name: str) -> Path:
        """Move a received file into ``folder`` durably (rename + fsync of the folder)."""
        target = self.root / folder / name
        os.replace(received, target)
        _fsync_dir(target.parent)
        return target

    def discard(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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
