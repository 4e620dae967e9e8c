"""ZIP archives on ``POST /instances`` (Orthanc 1.8.2+): bounded reading of their entries.

An archive is spooled whole first (it is data, never trusted), then checked from its
central directory before a single entry is inflated:

- the end record is read by hand, so a directory claiming millions of entries or a
  huge size is refused before ``zipfile`` would load it into memory;
- entries, the sum of their inflated sizes and each entry's compression ratio are
  capped (a "zip bomb" is refused as a whole, nothing of it stored);
- entries may not overlap (the overlapping-entries bomb reuses one compressed
  stream many times); ZIP64, multi-disk and encrypted archives are handled or refused;
- an entry is inflated into its own spool file, one at a time, and zipfile checks
  its CRC-32 and that it stops at its declared size.

Entry names are reported, never used as paths.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from app.dicom.summary import bare_data_set_order, is_part10
from app.errors import ArchiveTooLarge, MalformedArchive, NestedArchive
from app.intake.spool import PREAMBLE, Received, Spool, is_archive

_END = b"PK\x05\x06"
_END_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_END = b"PK\x06\x06"
_MAX_COMMENT = 0xFFFF
_MAX_DIRECTORY_BYTES = 64 * 1024 * 1024
_LOCAL_HEADER = 30  # fixed part of a local file header (APPNOTE 4.3.7)
_RATIO_FLOOR = 1024 * 1024  # entries smaller than this inflated are never ratio bombs
_CHUNK = 1024 * 1024
_HEAD = PREAMBLE + 4


@dataclass(frozen=True)
class Limits:
    max_entries: int
    max_inflated_bytes: int  # all entries together
    max_ratio: float
    max_entry_bytes: int  # one instance


@dataclass(frozen=True)
class Entry:
    index: int
    name: str  # printable, truncated: for answers and logs only
    size: int
    _info: zipfile.ZipInfo


class Skipped(Exception):
    """An entry Orthanc would skip too: not DICOM, or a DICOMDIR. Not an error."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def printable(name: str, limit: int = 255) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in name)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


class Archive:
    """An open, checked archive. Use as a context manager; read entries in order."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self._limits = limits
        self._file = path.open("rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            _check_directory(self._file, size, limits.max_entries)
            try:
                self._zip = zipfile.ZipFile(self._file)
            except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError) as exc:
                raise MalformedArchive(f"the ZIP archive cannot be read: {exc}") from None
            self.entries = self._check_entries()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def _check_entries(self) -> list[Entry]:
        infos = [i for i in self._zip.infolist() if not i.is_dir()]
        if len(infos) > self._limits.max_entries:
            raise ArchiveTooLarge(
                f"the archive holds {len(infos)} entries; the limit is {self._limits.max_entries}"
            )
        total = sum(i.file_size for i in infos)
        if total > self._limits.max_inflated_bytes:
            raise ArchiveTooLarge(
                f"the archive inflates to {total} bytes; the limit is "
                f"{self._limits.max_inflated_bytes}"
            )
        # The whole archive's ratio too: entries under the per-entry floor (1 MiB) are
        # never checked alone, and 10,000 of them would inflate ~10 GiB from ~10 MB.
        archive_bytes = max(os.fstat(self._file.fileno()).st_size, 1)
        if total > _RATIO_FLOOR and total / archive_bytes > self._limits.max_ratio:
            raise ArchiveTooLarge(
                f"the archive inflates {total / archive_bytes:.0f} times its size; the limit "
                f"is {self._limits.max_ratio:g}"
            )
        for info in infos:
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > _RATIO_FLOOR and ratio > self._limits.max_ratio:
                raise ArchiveTooLarge(
                    f"entry {printable(info.filename)!r} inflates {ratio:.0f} times its "
                    f"compressed size; the limit is {self._limits.max_ratio:g}"
                )
        _check_overlaps(self._file, self._zip.infolist(), self._zip.start_dir)
        return [
            Entry(index, printable(info.filename), info.file_size, info)
            for index, info in enumerate(infos)
        ]

    def extract(self, entry: Entry, spool: Spool) -> Received:
        """Inflate one entry into ``spool``'s tmp/ (blocking: run it in a thread).

        Raises Skipped for what Orthanc skips, or an IntakeError for what is refused.
        """
        info = entry._info
        base = entry.name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
        if base.upper() == "DICOMDIR":
            raise Skipped("dicomdir", f"entry {entry.name!r} is a DICOMDIR")
        if info.flag_bits & 0x1:
            raise MalformedArchive(f"entry {entry.name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise MalformedArchive(
                f"entry {entry.name!r} uses compression method {info.compress_type}; "
                "only stored and deflated entries are read"
            )
        if entry.size > self._limits.max_entry_bytes:
            raise ArchiveTooLarge(
                f"entry {entry.name!r} is {entry.size} bytes; the limit for one instance is "
                f"{self._limits.max_entry_bytes}"
            )
        spool.check_free_space()
        target = spool.open_file(max_bytes=self._limits.max_entry_bytes)
        try:
            with self._zip.open(info) as source:
                head = _read_exactly(source, _HEAD)
                if is_archive(head):
                    raise NestedArchive(f"entry {entry.name!r} is itself a ZIP archive")
                # Orthanc reads a bare data set in an archive too; validation decides.
                if not is_part10(head) and bare_data_set_order(head) is None:
                    raise Skipped("not_dicom", f"entry {entry.name!r} is not a DICOM file")
                target.write(head)
                while chunk := source.read(_CHUNK):
                    target.write(chunk)
            return target.finish()
        except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, NotImplementedError) as exc:
            target.abort()  # a bad CRC, a truncated or corrupt stream: the archive's fault
            raise MalformedArchive(f"entry {entry.name!r} cannot be read: {exc}") from None
        except BaseException:
            target.abort()
            raise


def _read_exactly(source: IO[bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = source.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _check_directory(file: BinaryIO, size: int, max_entries: int) -> None:
    """Read the end record ourselves: refuse giant or multi-disk directories early."""
    tail_size = min(size, _END_SIZE + _MAX_COMMENT)
    file.seek(size - tail_size)
    tail = file.read(tail_size)
    at = tail.rfind(_END)
    if at < 0 or len(tail) - at < _END_SIZE:
        raise MalformedArchive("no ZIP end-of-central-directory record")
    disk, cd_disk, _here, entries, cd_size, _cd_offset, _comment = struct.unpack(
        "<4H2LH", tail[at + 4 : at + _END_SIZE]
    )
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:  # ZIP64 (APPNOTE 4.3.14)
        locator = tail[at - 20 : at] if at >= 20 else b""
        if locator[:4] != _ZIP64_LOCATOR:
            raise MalformedArchive("a ZIP64 end record without its locator")
        (end64,) = struct.unpack("<Q", locator[8:16])
        if end64 > size - 56:
            raise MalformedArchive("the ZIP64 end record lies outside the archive")
        file.seek(end64)
        record = file.read(56)
        if record[:4] != _ZIP64_END:
            raise MalformedArchive("no ZIP64 end-of-central-directory record")
        disk, cd_disk, _here, entries, cd_size, _cd_offset = struct.unpack("<2L3Q", record[16:48])
    if disk != 0 or cd_disk != 0:
        raise MalformedArchive("multi-disk (split) archives are not supported")
    if entries > max_entries:
        raise ArchiveTooLarge(f"the archive holds {entries} entries; the limit is {max_entries}")
    if cd_size > min(_MAX_DIRECTORY_BYTES, size):
        raise MalformedArchive(f"the archive's central directory claims {cd_size} bytes")
    file.seek(0)


def _check_overlaps(file: BinaryIO, infos: list[zipfile.ZipInfo], directory_start: int) -> None:
    """Each entry's local header and data lie apart from every other entry's and before
    the directory. Data begins after the local header's own name and extra field (APPNOTE
    4.3.7), whose lengths may differ from the central directory's: an extra field can
    quote the next entries' headers and point them all at one stream."""
    ranges = sorted(
        ((info.header_offset, _data_end(file, info), info) for info in infos),
        key=lambda r: (r[0], r[1]),
    )
    followers = [*ranges[1:], None][: len(ranges)]
    for (_, end, info), after in zip(ranges, followers, strict=True):
        limit = after[0] if after is not None else directory_start
        if end > limit:
            raise MalformedArchive(
                f"entry {printable(info.filename)!r} overlaps "
                + (f"entry {printable(after[2].filename)!r}" if after else "the central directory")
                + "; overlapping entries are refused"
            )


def _data_end(file: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where an entry's compressed data ends, from its own local header."""
    file.seek(info.header_offset)
    header = file.read(_LOCAL_HEADER)
    if len(header) < _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise MalformedArchive(f"entry {printable(info.filename)!r} has no local file header")
    name_length, extra_length = struct.unpack_from("<HH", header, 26)
    return int(info.header_offset + _LOCAL_HEADER + name_length + extra_length + info.compress_size)
