"""Multipart bodies (``multipart/form-data``, ``multipart/related``), streamed part by part.

python-multipart's streaming parser splits the body as it arrives; each kept part is
written into its own spool file through the same sink as a raw upload (size cap,
preamble zeroing, hashing). Nothing is accepted until the whole body has parsed: a
body that breaks off or is malformed costs its parts and stores none of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import InstanceTooLarge, MalformedMultipart, TooManyParts, UnsupportedMediaType
from app.intake.spool import Received, Spool, SpoolFile, bounded, decoder

_MAX_HEADERS = 16
_MAX_HEADER_LINE = 8 * 1024
# RFC 2046 §5.1.1 says 1 to 70 characters, but real senders go past it: Orthanc's DICOMweb
# plugin sends a 73-character "uuid-uuid". Liberal here, yet bounded: python-multipart
# looks for the boundary in every chunk, so its length is a cost per byte received.
MAX_BOUNDARY_CHARS = 256


@dataclass(frozen=True)
class Limits:
    max_parts: int
    max_part_bytes: int  # one instance
    max_archive_bytes: int | None  # a part that is a ZIP archive; None: archives not taken
    max_body_bytes: int


@dataclass(frozen=True)
class Part:
    index: int
    filename: str | None
    content_type: str | None
    file: Received | None  # None: the part was not kept (a form field, another media type)


@dataclass(frozen=True)
class MediaType:
    """A parsed Content-Type: ``multipart/related; type="application/dicom"; boundary=…``."""

    name: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str | None) -> MediaType:
        name, params = parse_options_header(value or "")
        return cls(
            name.decode("latin-1").lower(),
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()},
        )

    def boundary(self) -> str:
        boundary = self.params.get("boundary", "")
        if not 0 < len(boundary) <= MAX_BOUNDARY_CHARS:
            raise UnsupportedMediaType(
                f"{self.name} needs a boundary of 1 to {MAX_BOUNDARY_CHARS} characters"
            )
        return boundary


Keep = Callable[[MediaType, str | None], bool]  # (part's media type, filename) -> store it?


class _Reader:
    """The parser's callbacks: headers per part, then its bytes into a spool file."""

    def __init__(self, spool: Spool, limits: Limits, keep: Keep) -> None:
        self._spool = spool
        self._limits = limits
        self._keep = keep
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._current: SpoolFile | None = None
        self._meta: tuple[str | None, str | None] = (None, None)
        self.count = 0
        self.ended = False
        self.done: list[tuple[int, str | None, str | None, SpoolFile | None]] = []
        self.open: list[SpoolFile] = []

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.count += 1
        if self.count > self._limits.max_parts:
            raise TooManyParts(f"the body has more than {self._limits.max_parts} parts")
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        disposition = MediaType.parse(self._headers.get("content-disposition"))
        filename = disposition.params.get("filename") or None
        declared = self._headers.get("content-type")
        media = MediaType.parse(declared) if declared else MediaType("")
        self._meta = (filename, declared)
        if self._keep(media, filename):
            self._spool.check_free_space()
            self._current = self._spool.open_file(
                max_bytes=self._limits.max_part_bytes,
                max_archive_bytes=self._limits.max_archive_bytes,
            )
            self.open.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.write(data[start:end])

    def _part_end(self) -> None:
        self.done.append((self.count - 1, *self._meta, self._current))
        self._current = None

    def _end(self) -> None:
        self.ended = True


async def receive(
    spool: Spool,
    chunks: AsyncIterator[bytes],
    boundary: str,
    *,
    limits: Limits,
    keep: Keep,
    content_encoding: str | None,
    idle_timeout: float,
    min_rate: int = 0,
) -> list[Part]:
    """Every part of the body, kept ones spooled (not yet durable); or an IntakeError."""
    reader = _Reader(spool, limits, keep)
    parser = MultipartParser(
        boundary,
        reader.callbacks(),  # type: ignore[arg-type]  # a plain dict of the documented names
        max_header_count=_MAX_HEADERS,
        max_header_size=_MAX_HEADER_LINE,
    )
    inflate = decoder(content_encoding)
    parsed = _Counted(parser, limits.max_body_bytes)  # a gzip body is capped once inflated too
    received: list[Part] = []
    size = 0
    spool.check_free_space()
    try:
        async for chunk in bounded(chunks, idle_timeout, min_rate):
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise InstanceTooLarge(
                    f"the body is larger than the limit of {limits.max_body_bytes} bytes"
                )
            try:
                if inflate is None:
                    parsed.write(chunk)
                else:
                    inflate.feed(chunk, parsed)
            except MultipartParseError as exc:
                raise MalformedMultipart(f"the multipart body does not parse: {exc}") from None
            await _finish_done(reader, received)
        if inflate is not None:
            inflate.finish()
        if not reader.ended:
            raise MalformedMultipart("the multipart body ends before its closing boundary")
        await _finish_done(reader, received)
    except BaseException:
        for part in received:
            if part.file is not None:
                spool.discard(part.file.path)
        for file in reader.open:
            file.abort()
        raise
    return received


class _Counted:
    def __init__(self, parser: MultipartParser, limit: int) -> None:
        self._parser = parser
        self._limit = limit
        self._size = 0

    def write(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise InstanceTooLarge(f"the body inflates past the limit of {self._limit} bytes")
        self._parser.write(data)


async def _finish_done(reader: _Reader, received: list[Part]) -> None:
    while reader.done:
        index, filename, content_type, file = reader.done.pop(0)
        stored = None
        if file is not None:
            reader.open.remove(file)
            try:
                stored = await asyncio.to_thread(file.finish)
            except BaseException:
                file.abort()
                raise
        received.append(Part(index, filename, content_type, stored))
